"""Metrics for solar-cell defect detection, built on :mod:`standard_models.metrics`.

The binary helpers (average precision, counts, F1 and balanced accuracy at a threshold, the
best-F1 threshold) are shared with the moulding task and importable from here as well.
"""

from __future__ import annotations

import torch

from ..metrics import balanced_accuracy_at, best_f1_threshold, confusion, f1_at, pr_auc

__all__ = [
    "balanced_accuracy_at",
    "best_f1_threshold",
    "confusion",
    "defect_metrics",
    "f1_at",
    "pr_auc",
]


def defect_metrics(
    logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0
) -> dict[str, float]:
    """``pr_auc`` (main), and ``f1``, ``balanced_accuracy``, ``precision``, ``recall`` at
    the logit ``threshold`` (0: probability 0.5, balanced by the loss's ``pos_weight``)."""
    tp, fp, fn, _ = confusion(logits, target, threshold)
    return {
        "pr_auc": pr_auc(logits, target),
        "f1": f1_at(logits, target, threshold),
        "balanced_accuracy": balanced_accuracy_at(logits, target, threshold),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
    }
