"""Metrics for moulding defect prediction."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score


def defect_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Average precision (``pr_auc``, the main metric) plus F1, precision and recall at p=0.5.

    Precision-recall AUC rather than ROC AUC: with a few percent positives, ROC AUC looks good
    even for models that flood the line with false alarms. ``pr_auc`` is NaN when ``target``
    holds no defect at all, because it is undefined there.
    """
    y = target.numpy().astype(np.int64)
    prob = torch.sigmoid(logits).numpy()
    pred = (prob >= 0.5).astype(np.int64)
    pr_auc = float(average_precision_score(y, prob)) if y.any() else float("nan")
    return {
        "pr_auc": pr_auc,
        "f1": float(f1_score(y, pred, zero_division=0)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
    }
