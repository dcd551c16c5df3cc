"""Metrics for Tennessee Eastman fault diagnosis."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Macro-F1 over the classes present in ``target`` (the main metric) and accuracy.

    Macro-F1 weighs every fault equally, which matters more in diagnosis than accuracy: a rare
    fault misread as normal is the costly mistake. Averaging over the classes present keeps a
    factory's local evaluation meaningful when it has seen only some faults.
    """
    y = target.numpy()
    pred = logits.argmax(dim=1).numpy()
    labels = np.unique(y)
    return {
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
    }
