"""Defective solar cells in electroluminescence images (ELPV data set, CC BY-NC-SA 4.0)."""

from .task import CellDefectTask

__all__ = ["CellDefectTask"]
