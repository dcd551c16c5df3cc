"""Schema of a Tennessee Eastman factory file and its conversion to windows.

A factory file holds one row per sample: ``run_id`` (a contiguous recording), ``t`` (sample
index, 3 minutes apart), the 52 process variables and the label ``fault`` (0 = normal,
1..21 = fault number). A fault is recognised from how variables evolve, so the network sees a
window of ``window`` consecutive samples and predicts the label of the window's last sample.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import TensorDataset

from ..base import Column, Schema, UnitDataset
from ..common import grouped_windows
from .source import FEATURES, LABEL, NUM_CLASSES, RUN, TIME, reference_stats

SCHEMA = Schema(
    columns=(
        Column(RUN, "str"),
        Column(TIME, "int", low=0),
        *(Column(name, "float") for name in FEATURES),
        Column(LABEL, "int", low=0, high=NUM_CLASSES - 1),
    )
)
DEFAULT_WINDOW = 5


def to_windows(
    df: pd.DataFrame, window: int = DEFAULT_WINDOW, stride: int = 1
) -> TensorDataset:
    """Windows of ``window`` consecutive samples per ``run_id`` (sorted by ``t``).

    x: float32 ``(n, window * 52)``, standardised with the normal-operation reference
    statistics; y: int64 label of each window's last sample. Windows never cross a run or a
    gap in ``t``. Raises ``ValueError`` when no run is long enough for one window.
    """
    mean, std = reference_stats()
    x, y, _ = grouped_windows(df, RUN, TIME, FEATURES, LABEL, window, stride, mean, std)
    if len(x) == 0:
        raise ValueError(
            f"no run_id holds {window} consecutive samples; the frame yields no window"
        )
    return TensorDataset(
        torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(y.astype("int64"))
    )


def to_run_units(df: pd.DataFrame, window: int = DEFAULT_WINDOW) -> UnitDataset:
    """Every stride-1 window of :func:`to_windows`, grouped by ``run_id`` (one unit per run).

    For unit-level DP-SGD with a whole recording as the privacy unit. Raises ``ValueError``
    when no run is long enough for one window.
    """
    mean, std = reference_stats()
    x, y, runs = grouped_windows(df, RUN, TIME, FEATURES, LABEL, window, 1, mean, std)
    if len(x) == 0:
        raise ValueError(
            f"no run_id holds {window} consecutive samples; the frame yields no window"
        )
    return UnitDataset(
        torch.from_numpy(x.reshape(len(x), -1)),
        torch.from_numpy(y.astype("int64")),
        torch.from_numpy(runs),
        unit="run",
    )
