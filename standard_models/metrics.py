"""Binary-classification metrics of the defect tasks, in plain numpy (checked against scikit-learn).

Both defect tasks (moulding shots, solar cells) rank parts by a defect score, so the average
precision and the counts at a threshold are written once here. Contribution scoring evaluates
hundreds of models a round, so the counts are computed directly instead of through
scikit-learn, whose input checks cost more than the computation.
"""

from __future__ import annotations

import numpy as np
import torch

Scores = torch.Tensor | np.ndarray


def _arrays(scores: Scores, target: Scores) -> tuple[np.ndarray, np.ndarray]:
    s = scores.detach().double().numpy() if isinstance(scores, torch.Tensor) else scores
    y = target.numpy() if isinstance(target, torch.Tensor) else target
    return np.asarray(s, dtype=np.float64).reshape(-1), np.asarray(y).astype(np.int64).reshape(-1)


def _thresholds(score: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores ranked high to low, the last rank of each distinct score, true positives there.

    Tied scores form one threshold: calling every part at or above ``ranked[last[k]]``
    defective calls ``last[k] + 1`` parts and finds ``tps[k]`` defects.
    """
    order = np.argsort(-score, kind="mergesort")
    ranked, hits = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tps = np.cumsum(hits)[last].astype(np.float64)
    return ranked, last, tps


def pr_auc(scores: Scores, target: Scores) -> float:
    """Average precision of ``scores`` (logits or probabilities); ``nan`` without defects.

    The step-wise sum of scikit-learn's ``average_precision_score``: tied scores form one
    threshold; precision at each threshold times the recall gained there.
    """
    score, y = _arrays(scores, target)
    if not y.any():
        return float("nan")
    _, last, tps = _thresholds(score, y)
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def confusion(scores: Scores, target: Scores, threshold: float) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` when a score ``>= threshold`` is called defective."""
    score, y = _arrays(scores, target)
    pred = score >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    return tp, fp, fn, len(y) - tp - fp - fn


def f1_at(scores: Scores, target: Scores, threshold: float) -> float:
    """F1 of the defective class at ``threshold`` (0 when there is no true or called defect)."""
    tp, fp, fn, _ = confusion(scores, target, threshold)
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def balanced_accuracy_at(scores: Scores, target: Scores, threshold: float) -> float:
    """Mean of the recalls of both classes at ``threshold`` (over the classes present)."""
    tp, fp, fn, tn = confusion(scores, target, threshold)
    pairs = ((tp, tp + fn), (tn, tn + fp))
    recalls = [hit / total for hit, total in pairs if total]
    return float(np.mean(recalls)) if recalls else float("nan")


def best_f1_threshold(scores: Scores, target: Scores) -> float:
    """The score threshold with the highest F1 on this set (the lowest such threshold on ties).

    Meant for the validation set; the test set is then scored at the chosen threshold, so
    the reported F1 is not fitted to the test labels.
    """
    score, y = _arrays(scores, target)
    if not y.any():
        return float("inf")
    ranked, last, tps = _thresholds(score, y)
    called = (last + 1).astype(np.float64)
    f1 = 2 * tps / (called + y.sum())
    return float(ranked[last[int(np.argmax(f1))]])
