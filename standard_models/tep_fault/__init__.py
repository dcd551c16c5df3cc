"""Tennessee Eastman Process fault diagnosis on real benchmark data (Russell, Chiang, Braatz)."""

from .task import TEPFaultTask

__all__ = ["TEPFaultTask"]
