"""The ``tep_fault`` standard model: 22-class fault diagnosis on the Tennessee Eastman Process."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..base import FederatedData, PartitionConfig, PrivacyUnit, WindowedTask
from . import source
from .dataset import DEFAULT_WINDOW, SCHEMA, to_run_units, to_windows
from .loss import build_loss
from .metrics import classification_metrics, macro_f1, macro_f1_batch
from .model import build_model


class TEPFaultTask(WindowedTask):
    """Fault diagnosis (normal + faults 1-21) from windows of the 52 TEP process variables.

    Args:
        window: consecutive samples per input window (3 minutes apart; 5 by default).
        stride: step between window starts in :meth:`to_dataset` (evaluation sets); training
            sets follow the privacy unit (:meth:`to_train_dataset`).

    Privacy unit: ``window`` by default (``window`` consecutive samples of one run, training
    windows not overlapping, so each raw sample is in exactly one training example), or
    ``run`` (a whole recording, trained with unit-level DP-SGD).
    """

    name = "tep_fault"
    schema = SCHEMA
    main_metric = "macro_f1"
    greater_is_better = True
    supports_ghost = True
    num_classes = source.NUM_CLASSES
    privacy_unit = PrivacyUnit(
        "window",
        "A plant logs its process as consecutive 3-minute samples and what it would not want "
        "told is what the process did over a stretch of time, so the unit is one "
        "non-overlapping window of consecutive samples (15 minutes by default), which also "
        "covers every single sample in it.",
    )
    coarser_units = (
        PrivacyUnit(
            "run",
            "A run is one whole recording of the process (a campaign, a shift sequence); a "
            "firm that treats a run as one record hides whether any run took part.",
        ),
    )

    default_window = DEFAULT_WINDOW
    windows = staticmethod(to_windows)
    recording_units = staticmethod(to_run_units)
    network = staticmethod(build_model)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Real TEP runs split into factories; see :mod:`standard_models.tep_fault.source`."""
        return source.generate(num_factories, seed, partition)

    def loss_fn(self) -> nn.Module:
        """Mean cross-entropy."""
        return build_loss()

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``macro_f1`` (main) and ``accuracy``."""
        return classification_metrics(outputs, target)

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """``macro_f1`` alone."""
        return macro_f1(outputs, target)

    def main_scores(self, outputs: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """``macro_f1`` of each output set of a batch, in one count."""
        return macro_f1_batch(outputs, target)
