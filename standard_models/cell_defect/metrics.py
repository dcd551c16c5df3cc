"""Metrics for solar-cell defect detection, in plain numpy (checked against scikit-learn).

Contribution scoring evaluates hundreds of models a round, so the counts are computed directly
instead of through scikit-learn, whose input checks cost more than the computation.
"""

from __future__ import annotations

import numpy as np
import torch


def _arrays(scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray):
    s = scores.detach().double().numpy() if isinstance(scores, torch.Tensor) else scores
    y = target.numpy() if isinstance(target, torch.Tensor) else target
    return np.asarray(s, dtype=np.float64).reshape(-1), np.asarray(y).astype(np.int64).reshape(-1)


def pr_auc(scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> float:
    """Average precision of ``scores`` (logits or probabilities); ``nan`` without defects.

    The step-wise sum of scikit-learn's ``average_precision_score``: tied scores form one
    threshold; precision at each threshold times the recall gained there.
    """
    score, y = _arrays(scores, target)
    if not y.any():
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def confusion(
    scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, threshold: float
) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` when a score ``>= threshold`` is called defective."""
    score, y = _arrays(scores, target)
    pred = score >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    return tp, fp, fn, len(y) - tp - fp - fn


def f1_at(
    scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, threshold: float
) -> float:
    """F1 of the defective class at ``threshold`` (0 when there is no true or called defect)."""
    tp, fp, fn, _ = confusion(scores, target, threshold)
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def balanced_accuracy_at(
    scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, threshold: float
) -> float:
    """Mean of the recalls of both classes at ``threshold`` (over the classes present)."""
    tp, fp, fn, tn = confusion(scores, target, threshold)
    pairs = ((tp, tp + fn), (tn, tn + fp))
    recalls = [hit / total for hit, total in pairs if total]
    return float(np.mean(recalls)) if recalls else float("nan")


def best_f1_threshold(
    scores: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray
) -> float:
    """The score threshold with the highest F1 on this set (the lowest such threshold on ties).

    Meant for the validation set; the test set is then scored at the chosen threshold, so
    the reported F1 is not fitted to the test labels.
    """
    score, y = _arrays(scores, target)
    if not y.any():
        return float("inf")
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits)[last].astype(np.float64)
    called = (last + 1).astype(np.float64)
    f1 = 2 * tps / (called + y.sum())
    return float(ranked[last[int(np.argmax(f1))]])


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
