"""Network for RUL regression: an MLP over a flattened window of cycles."""

from __future__ import annotations

from ..common import MLP
from .source import FEATURES


def build_model(window: int = 30, hidden: tuple[int, ...] = (128, 64)) -> MLP:
    """MLP ``window*17 -> 128 -> 64 -> 1`` with LayerNorm and GELU (about 74k parameters).

    Output shape ``(batch,)``: the RUL divided by 125.
    """
    return MLP(window * len(FEATURES), 1, hidden=hidden, layer_norm=True, squeeze_output=True)
