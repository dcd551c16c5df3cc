"""Remaining-useful-life regression on synthetic run-to-failure histories (C-MAPSS-like)."""

from .task import RULTask

__all__ = ["RULTask"]
