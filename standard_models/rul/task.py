"""The ``rul`` standard model: remaining-useful-life regression from run-to-failure data."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..base import FederatedData, PartitionConfig, PrivacyUnit, StandardTask
from . import source
from .dataset import DEFAULT_WINDOW, SCHEMA, to_machine_units, to_windows
from .loss import build_loss
from .metrics import rul_metrics
from .model import build_model


class RULTask(StandardTask):
    """Predict a machine's remaining useful life (cycles, capped at 125) from a window.

    Args:
        window: consecutive cycles per input window.
        stride: step between window starts in :meth:`to_dataset` (evaluation sets); training
            sets follow the privacy unit (:meth:`to_train_dataset`).

    Privacy unit: ``window`` by default (``window`` consecutive cycles of one machine, training
    windows not overlapping, so each cycle is in exactly one training example), or
    ``machine`` (a machine's whole history, trained with unit-level DP-SGD).
    """

    name = "rul"
    schema = SCHEMA
    main_metric = "rmse"
    greater_is_better = False
    supports_ghost = True
    rul_cap = source.RUL_CAP
    privacy_unit = PrivacyUnit(
        "window",
        "A maintenance log records a machine cycle by cycle, and a stretch of its operation is "
        "what a firm would call one record, so the unit is one non-overlapping window of "
        "consecutive cycles (30 by default), which also covers every single cycle in it.",
    )
    coarser_units = (
        PrivacyUnit(
            "machine",
            "A machine's whole run-to-failure history; a firm that treats each machine as one "
            "record hides whether a given machine took part at all.",
        ),
    )

    def __init__(self, window: int = DEFAULT_WINDOW, stride: int = 1) -> None:
        self.window = int(window)
        self.stride = int(stride)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Synthetic run-to-failure units; see :mod:`standard_models.rul.source`."""
        return source.generate(num_factories, seed, partition)

    def to_dataset(self, df: pd.DataFrame) -> TensorDataset:
        """Flattened, standardised windows and the scaled RUL at each window's last cycle."""
        return to_windows(df, self.window, self.stride)

    def _unit_dataset(self, df: pd.DataFrame, unit: str) -> Dataset:
        """Non-overlapping windows (``window``) or every window grouped by machine."""
        if unit == "machine":
            return to_machine_units(df, self.window)
        return to_windows(df, self.window, stride=self.window)

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
