"""Training criterion for solar-cell defect detection."""

from __future__ import annotations

from ..common import WeightedBCELoss

# Non-defective / defective cells in the training blocks (about 69% / 31%): with this weight
# both classes carry equal total weight, so a logit of 0 is a balanced decision threshold.
DEFAULT_POS_WEIGHT = 2.2


def build_loss(pos_weight: float = DEFAULT_POS_WEIGHT) -> WeightedBCELoss:
    """Binary cross-entropy with ``pos_weight`` on defective cells, ``reduction="mean"``."""
    return WeightedBCELoss(pos_weight)
