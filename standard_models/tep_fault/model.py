"""Network for Tennessee Eastman fault diagnosis: an MLP over a flattened window."""

from __future__ import annotations

from ..common import MLP
from .source import NUM_CLASSES, NUM_VARIABLES


def build_model(window: int = 10, hidden: tuple[int, ...] = (128, 128)) -> MLP:
    """MLP ``window*52 -> 128 -> 128 -> 22`` with LayerNorm and GELU (about 86k parameters).

    Small enough for an epoch over a factory's ~3k windows in well under a second on a CPU,
    and built only from layers that Opacus ghost clipping handles.
    """
    return MLP(window * NUM_VARIABLES, NUM_CLASSES, hidden=hidden, layer_norm=True)
