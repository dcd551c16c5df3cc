"""The ``rul`` standard model: remaining-useful-life regression from run-to-failure data."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..base import FederatedData, PartitionConfig, StandardTask
from . import source
from .dataset import DEFAULT_WINDOW, SCHEMA, to_windows
from .loss import build_loss
from .metrics import rul_metrics
from .model import build_model


class RULTask(StandardTask):
    """Predict a machine's remaining useful life (cycles, capped at 125) from a window.

    Args:
        window: consecutive cycles per input window.
        stride: step between window starts when building datasets.
    """

    name = "rul"
    schema = SCHEMA
    main_metric = "rmse"
    greater_is_better = False
    supports_ghost = True
    rul_cap = source.RUL_CAP

    def __init__(self, window: int = DEFAULT_WINDOW, stride: int = 1) -> None:
        self.window = int(window)
        self.stride = int(stride)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Synthetic run-to-failure units; see :mod:`standard_models.rul.source`."""
        return source.generate(num_factories, seed, partition)

    def to_dataset(self, df: pd.DataFrame) -> TensorDataset:
        """Flattened, standardised windows and the scaled RUL at each window's last cycle."""
        return to_windows(df, self.window, self.stride)

    def build_model(self) -> nn.Module:
        """A fresh MLP over one window."""
        return build_model(self.window)

    def loss_fn(self) -> nn.Module:
        """Mean squared error on the scaled target."""
        return build_loss()

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``rmse`` (main) and ``mae`` in cycles."""
        return rul_metrics(outputs, target)

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """``rmse`` alone."""
        return rul_metrics(outputs, target)["rmse"]
