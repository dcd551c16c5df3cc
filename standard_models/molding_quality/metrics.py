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


def pr_auc(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Average precision alone (``nan`` without defects), for scoring many models.

    The same step-wise sum as scikit-learn's ``average_precision_score`` (tied scores form one
    threshold; a test checks equality), in a few numpy operations: scikit-learn's input checks
    cost more than the computation when contribution scoring evaluates hundreds of models.
    """
    y = target.numpy().astype(np.int64)
    if not y.any():
        return float("nan")
    score = logits.double().numpy()
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))
