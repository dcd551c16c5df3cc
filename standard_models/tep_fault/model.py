"""Network for Tennessee Eastman fault diagnosis: an MLP over a flattened window."""

from __future__ import annotations

from ..common import MLP
from .dataset import DEFAULT_WINDOW
from .source import NUM_CLASSES, NUM_VARIABLES


def build_model(window: int = DEFAULT_WINDOW, hidden: tuple[int, ...] = (128,)) -> MLP:
    """MLP ``window*52 -> 128 -> 22`` with a parameter-free LayerNorm and GELU (~37k parameters).

    One hidden layer over a 5-sample window was the most accurate under DP-SGD among the
    widths, depths and windows tried (deeper or wider nets need more noise-free signal than a
    factory's few thousand windows give); every trainable layer is a ``Linear``.
    """
    return MLP(window * NUM_VARIABLES, NUM_CLASSES, hidden=hidden, layer_norm=True)
