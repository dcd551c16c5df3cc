"""Metrics for Tennessee Eastman fault diagnosis."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Macro-F1 over the classes present in ``target`` (the main metric) and accuracy.

    Macro-F1 weighs every fault equally, which matters more in diagnosis than accuracy: a rare
    fault misread as normal is the costly mistake. Averaging over the classes present keeps a
    factory's local evaluation meaningful when it has seen only some faults.
    """
    y = target.numpy()
    pred = logits.argmax(dim=1).numpy()
    return {"macro_f1": macro_f1(logits, target), "accuracy": float(accuracy_score(y, pred))}


def macro_f1(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Macro-F1 over the classes present in ``target``, from one confusion-matrix count.

    Equal to scikit-learn's ``f1_score(average="macro", labels=present, zero_division=0)``
    (a test checks it), without its input validation, which cost more than the count itself
    when contribution scoring evaluates hundreds of models a round.
    """
    y = target.numpy().astype(np.int64)
    pred = logits.argmax(dim=1).numpy().astype(np.int64)
    labels = np.unique(y)
    size = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    counts = np.bincount(y * size + pred, minlength=size * size).reshape(size, size)
    tp = np.diag(counts)[labels].astype(np.float64)
    fp = counts[:, labels].sum(axis=0) - tp
    fn = counts[labels, :].sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1.mean()) if len(labels) else 0.0
