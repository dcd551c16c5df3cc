"""The ``molding_quality`` standard model: defect prediction for injection moulding."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..base import FederatedData, PartitionConfig, PrivacyUnit, StandardTask
from . import source
from .dataset import SCHEMA, to_tensors
from .loss import DEFAULT_POS_WEIGHT, build_loss
from .metrics import defect_metrics, pr_auc
from .model import build_model


class MoldingQualityTask(StandardTask):
    """Predict whether a shot is defective from its recorded process channels.

    Args:
        pos_weight: weight of defective shots in the loss.

    Privacy unit: ``shot``; each row is one shot and one training example.
    """

    name = "molding_quality"
    schema = SCHEMA
    main_metric = "pr_auc"
    greater_is_better = True
    supports_ghost = True
    privacy_unit = PrivacyUnit(
        "shot",
        "Each row is one injection cycle that produced one part, the record a moulding shop "
        "keeps per part, and shots are independent training examples, so per-example DP-SGD "
        "protects each shot.",
    )

    def __init__(self, pos_weight: float = DEFAULT_POS_WEIGHT) -> None:
        self.pos_weight = float(pos_weight)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Synthetic shots; see :mod:`standard_models.molding_quality.source`."""
        return source.generate(num_factories, seed, partition)

    def to_dataset(self, df: pd.DataFrame) -> TensorDataset:
        """Standardised channels and the 0/1 defect label."""
        return to_tensors(df)

    def build_model(self) -> nn.Module:
        """A fresh small MLP."""
        return build_model()

    def loss_fn(self) -> nn.Module:
        """Mean binary cross-entropy with ``pos_weight``."""
        return build_loss(self.pos_weight)

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``pr_auc`` (main), ``f1``, ``precision`` and ``recall``."""
        return defect_metrics(outputs, target)

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """``pr_auc`` alone."""
        return pr_auc(outputs, target)
