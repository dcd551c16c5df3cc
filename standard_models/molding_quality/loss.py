"""Training criterion for moulding defect prediction."""

from __future__ import annotations

from ..common import WeightedBCELoss

# Up-weights the rare defective shots (a few percent) so that the decision threshold 0.5 is
# not ignored by the optimiser.
DEFAULT_POS_WEIGHT = 5.0


def build_loss(pos_weight: float = DEFAULT_POS_WEIGHT) -> WeightedBCELoss:
    """Binary cross-entropy with ``pos_weight`` on defective shots, ``reduction="mean"``."""
    return WeightedBCELoss(pos_weight)
