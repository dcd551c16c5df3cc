"""The ``rul`` standard model: remaining-useful-life regression from run-to-failure data."""

from __future__ import annotations

import torch
from torch import nn

from ..base import FederatedData, PartitionConfig, PrivacyUnit, WindowedTask
from . import source
from .dataset import DEFAULT_WINDOW, SCHEMA, to_machine_units, to_windows
from .loss import build_loss
from .metrics import rul_metrics
from .model import build_model


class RULTask(WindowedTask):
    """Predict a machine's remaining useful life (cycles, capped at 125) from a window.

    Args:
        window: consecutive cycles per input window (30 by default).
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

    default_window = DEFAULT_WINDOW
    windows = staticmethod(to_windows)
    recording_units = staticmethod(to_machine_units)
    network = staticmethod(build_model)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Synthetic run-to-failure units; see :mod:`standard_models.rul.source`."""
        return source.generate(num_factories, seed, partition)

    def loss_fn(self) -> nn.Module:
        """Mean squared error on the scaled target."""
        return build_loss()

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``rmse`` (main) and ``mae`` in cycles."""
        return rul_metrics(outputs, target)

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """``rmse`` alone."""
        return rul_metrics(outputs, target)["rmse"]
