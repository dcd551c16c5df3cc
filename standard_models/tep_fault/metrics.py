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
    return float(macro_f1_batch(logits.unsqueeze(0), target)[0])


def macro_f1_batch(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """:func:`macro_f1` of each of ``m`` output sets ``(m, N, C)`` against one ``target``.

    One argmax and one count for the whole batch (a confusion matrix per output set, from one
    ``bincount``): contribution scoring scores a thousand output mixtures a round, and per
    call the class list, the argmax and the count cost more than the arithmetic.
    """
    y = target.numpy().astype(np.int64)
    m = logits.shape[0]
    if m == 0:
        return np.zeros(0)
    pred = logits.argmax(dim=2).numpy().astype(np.int64)  # (m, N)
    labels = np.unique(y)
    size = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    offsets = np.arange(m, dtype=np.int64)[:, None] * (size * size)
    counts = np.bincount((offsets + y * size + pred).ravel(), minlength=m * size * size)
    counts = counts.reshape(m, size, size)
    if not len(labels):
        return np.zeros(m)
    diag = np.diagonal(counts, axis1=1, axis2=2)  # (m, size)
    tp = diag[:, labels].astype(np.float64)
    fp = counts[:, :, labels].sum(axis=1) - tp
    fn = counts[:, labels, :].sum(axis=2) - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    # Row by row: a reduction along the axis of a 2-D array can round differently from the
    # same reduction of one row, and a batch must score exactly as its items one at a time.
    return np.array([row.mean() for row in f1])
