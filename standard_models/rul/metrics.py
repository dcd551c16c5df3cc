"""Metrics for RUL regression, reported in cycles."""

from __future__ import annotations

import torch

from .source import RUL_CAP


def rul_metrics(pred_scaled: torch.Tensor, target_scaled: torch.Tensor) -> dict[str, float]:
    """RMSE (the main metric) and MAE in cycles, from scaled predictions and targets.

    Predictions are clipped to ``[0, 125]`` cycles first, since the target lives there.
    """
    pred = pred_scaled.double().clamp(0.0, 1.0) * RUL_CAP
    target = target_scaled.double() * RUL_CAP
    err = pred - target
    return {
        "rmse": float(err.pow(2).mean().sqrt().item()),
        "mae": float(err.abs().mean().item()),
    }
