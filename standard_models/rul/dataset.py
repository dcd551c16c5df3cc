"""Schema of a run-to-failure factory file and its conversion to windows.

One row per unit and cycle: ``unit_id``, ``cycle`` (1, 2, ...), operating settings
``op_1..op_3``, sensors ``s_01..s_14`` and the target ``rul`` in cycles. The network sees a
window of ``window`` consecutive cycles and predicts the RUL at the window's last cycle,
scaled to ``rul / 125`` so that the loss (and DP clipping) works on values of order one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from ..base import Column, Schema, UnitDataset
from ..common import grouped_windows
from .source import CYCLE, FEATURE_CENTER, FEATURE_SCALE, FEATURES, LABEL, RUL_CAP, UNIT

SCHEMA = Schema(
    columns=(
        Column(UNIT, "str"),
        Column(CYCLE, "int", low=0),
        *(Column(name, "float") for name in FEATURES),
        Column(LABEL, "float", low=0),
    )
)
DEFAULT_WINDOW = 30


def to_windows(
    df: pd.DataFrame, window: int = DEFAULT_WINDOW, stride: int = 1
) -> TensorDataset:
    """Windows of ``window`` consecutive cycles per ``unit_id``.

    x: float32 ``(n, window * 17)`` standardised with the fixed reference of
    :mod:`standard_models.rul.source`; y: float32 ``min(rul, 125) / 125`` at the last cycle
    (values above the cap, e.g. from uncapped plant records, are capped here). Raises
    ``ValueError`` when no unit is long enough for one window.
    """
    x, y, _ = grouped_windows(
        df, UNIT, CYCLE, FEATURES, LABEL, window, stride, FEATURE_CENTER, FEATURE_SCALE
    )
    if len(x) == 0:
        raise ValueError(f"no unit_id holds {window} consecutive cycles; no window to build")
    target = np.minimum(y.astype(np.float64), RUL_CAP) / RUL_CAP
    return TensorDataset(
        torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(target.astype(np.float32))
    )


def to_machine_units(df: pd.DataFrame, window: int = DEFAULT_WINDOW) -> UnitDataset:
    """Every stride-1 window of :func:`to_windows`, grouped by ``unit_id`` (one unit per machine).

    For unit-level DP-SGD with a machine's whole run-to-failure history as the privacy unit.
    Raises ``ValueError`` when no machine is long enough for one window.
    """
    x, y, machines = grouped_windows(
        df, UNIT, CYCLE, FEATURES, LABEL, window, 1, FEATURE_CENTER, FEATURE_SCALE
    )
    if len(x) == 0:
        raise ValueError(f"no unit_id holds {window} consecutive cycles; no window to build")
    target = np.minimum(y.astype(np.float64), RUL_CAP) / RUL_CAP
    return UnitDataset(
        torch.from_numpy(x.reshape(len(x), -1)),
        torch.from_numpy(target.astype(np.float32)),
        torch.from_numpy(machines),
        unit="machine",
    )
