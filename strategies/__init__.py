"""Aggregation strategies built on Flower's, update validation, and per-round factory reports."""
