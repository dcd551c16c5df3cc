"""The ``tep_fault`` standard model: 22-class fault diagnosis on the Tennessee Eastman Process."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..base import FederatedData, PartitionConfig, StandardTask
from . import source
from .dataset import DEFAULT_WINDOW, SCHEMA, to_windows
from .loss import build_loss
from .metrics import classification_metrics, macro_f1
from .model import build_model


class TEPFaultTask(StandardTask):
    """Fault diagnosis (normal + faults 1-21) from windows of the 52 TEP process variables.

    Args:
        window: consecutive samples per input window (3 minutes apart).
        stride: step between window starts when building datasets.
    """

    name = "tep_fault"
    schema = SCHEMA
    main_metric = "macro_f1"
    greater_is_better = True
    supports_ghost = True
    num_classes = source.NUM_CLASSES

    def __init__(self, window: int = DEFAULT_WINDOW, stride: int = 1) -> None:
        self.window = int(window)
        self.stride = int(stride)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Real TEP runs split into factories; see :mod:`standard_models.tep_fault.source`."""
        return source.generate(num_factories, seed, partition)

    def to_dataset(self, df: pd.DataFrame) -> TensorDataset:
        """Flattened, standardised windows and the fault label of each window's last sample."""
        return to_windows(df, self.window, self.stride)

    def build_model(self) -> nn.Module:
        """A fresh MLP over one window."""
        return build_model(self.window)

    def loss_fn(self) -> nn.Module:
        """Mean cross-entropy."""
        return build_loss()

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``macro_f1`` (main) and ``accuracy``."""
        return classification_metrics(outputs, target)

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """``macro_f1`` alone."""
        return macro_f1(outputs, target)
