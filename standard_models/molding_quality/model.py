"""Network for moulding defect prediction: a small MLP giving one defect logit per shot."""

from __future__ import annotations

from ..common import MLP
from .source import FEATURES


def build_model(hidden: tuple[int, ...] = (64, 64)) -> MLP:
    """MLP ``11 -> 64 -> 64 -> 1`` with LayerNorm and GELU; output shape ``(batch,)`` logits."""
    return MLP(len(FEATURES), 1, hidden=hidden, layer_norm=True, squeeze_output=True)
