"""Injection-moulding defect prediction on synthetic, physics-inspired shot data."""

from .task import MoldingQualityTask

__all__ = ["MoldingQualityTask"]
