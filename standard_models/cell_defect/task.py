"""The ``cell_defect`` standard model: defective solar cells in electroluminescence images.

Data licence: the ELPV images are CC BY-NC-SA 4.0 (non-commercial; the package's code is
Apache-2.0); cite Buerhop-Lutz et al. (EU PVSEC 2018) and Deitsch et al. (Solar Energy 2019;
Machine Vision and Applications 2021). See :mod:`standard_models.cell_defect.source`.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..base import FederatedData, PartitionConfig, PrivacyUnit, StandardTask
from . import source
from .dataset import make_schema, to_tensors
from .loss import DEFAULT_POS_WEIGHT, build_loss
from .metrics import defect_metrics, pr_auc
from .model import build_model


class CellDefectTask(StandardTask):
    """Call a solar cell defective (expert defect probability >= 0.5) from its EL image.

    The main metric is ``pr_auc`` (average precision of the defect score); ``f1``,
    ``balanced_accuracy``, ``precision`` and ``recall`` are reported at the logit
    ``threshold`` (0 by default: with ``pos_weight`` both classes weigh the same in the loss).
    :func:`~standard_models.cell_defect.metrics.best_f1_threshold` chooses a threshold on
    validation outputs for reports that score the test set at it.

    Args:
        image_size: side of the downsampled square images (the files' images must match).
        pos_weight: weight of defective cells in the loss.
        threshold: logit at and above which a cell is called defective.
    """

    name = "cell_defect"
    schema = make_schema(source.DEFAULT_IMAGE_SIZE)
    main_metric = "pr_auc"
    greater_is_better = True
    # Ghost clipping would be correct but slower: Opacus has no ghost norm sampler for Conv2d,
    # so it materialises per-sample convolution gradients anyway and adds a second backward
    # pass (DP epoch 2.35x the non-private one, against 1.49x with per-sample hooks, in
    # experiments.bench_dp). False makes training fall back to "hooks".
    supports_ghost = False
    privacy_unit = PrivacyUnit(
        "image",
        "One inspected cell's electroluminescence image is one record of a plant's inspection "
        "log and one training example, so per-example DP-SGD protects each image; the up to 60 "
        "cells of one module are separate records, covered only by group privacy.",
    )

    def __init__(
        self,
        image_size: int = source.DEFAULT_IMAGE_SIZE,
        pos_weight: float = DEFAULT_POS_WEIGHT,
        threshold: float = 0.0,
    ) -> None:
        self.image_size = int(image_size)
        self.pos_weight = float(pos_weight)
        self.threshold = float(threshold)
        if self.image_size != source.DEFAULT_IMAGE_SIZE:
            self.schema = make_schema(self.image_size)

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """ELPV cells split into plants; see :mod:`standard_models.cell_defect.source`."""
        return source.generate(num_factories, seed, partition, self.image_size)

    def to_dataset(self, df: pd.DataFrame) -> TensorDataset:
        """Scaled ``(n, 1, size, size)`` images and the 0/1 defect label."""
        return to_tensors(df, self.image_size)

    def build_model(self) -> nn.Module:
        """A fresh small CNN."""
        return build_model(self.image_size)

    def loss_fn(self) -> nn.Module:
        """Mean binary cross-entropy with ``pos_weight``."""
        return build_loss(self.pos_weight)

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """``pr_auc`` (main), ``f1``, ``balanced_accuracy``, ``precision``, ``recall``."""
        return defect_metrics(outputs, target, self.threshold)

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """``pr_auc`` alone."""
        return pr_auc(outputs, target)
