"""Metrics for moulding defect prediction.

``pr_auc`` alone, for scoring many models, is the shared :func:`standard_models.metrics.pr_auc`.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from ..metrics import pr_auc

__all__ = ["defect_metrics", "pr_auc"]


def defect_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Average precision (``pr_auc``, the main metric) plus F1, precision and recall at p=0.5.

    Precision-recall AUC rather than ROC AUC: with a few percent positives, ROC AUC looks good
    even for models that flood the line with false alarms. ``pr_auc`` is NaN when ``target``
    holds no defect at all, because it is undefined there.
    """
    y = target.numpy().astype(np.int64)
    prob = torch.sigmoid(logits).numpy()
    pred = (prob >= 0.5).astype(np.int64)
    average_precision = float(average_precision_score(y, prob)) if y.any() else float("nan")
    return {
        "pr_auc": average_precision,
        "f1": float(f1_score(y, pred, zero_division=0)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
    }
