"""Training criterion for solar-cell defect detection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Non-defective / defective cells in the training blocks (about 69% / 31%): with this weight
# both classes carry equal total weight, so a logit of 0 is a balanced decision threshold.
DEFAULT_POS_WEIGHT = 2.2


class CellDefectLoss(nn.Module):
    """Binary cross-entropy on a defect logit, taking the dataset's integer labels.

    ``pos_weight`` up-weights defective cells. Every sample's loss depends only on its own
    logit and label, and ``reduction`` is a plain attribute, so Opacus ghost clipping can set
    it to ``"none"`` to obtain per-sample losses.
    """

    def __init__(self, pos_weight: float = DEFAULT_POS_WEIGHT, reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (shape ``(batch,)``) against 0/1 ``target``."""
        return F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), pos_weight=self.pos_weight, reduction=self.reduction
        )


def build_loss(pos_weight: float = DEFAULT_POS_WEIGHT) -> CellDefectLoss:
    """The criterion with ``reduction="mean"``."""
    return CellDefectLoss(pos_weight=pos_weight)
