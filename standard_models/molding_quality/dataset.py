"""Schema of an injection-moulding factory file and its conversion to tensors.

One row per shot: the recorded process channels (units in the column names) and the label
``defect`` (1 = rejected part). Inputs are standardised with fixed physical reference ranges
(:data:`~standard_models.molding_quality.source.REFERENCE`), never with statistics of any
factory's data, so all parties scale identically and nothing about a factory leaks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from ..base import Column, Schema
from .source import FEATURES, LABEL, REFERENCE

SCHEMA = Schema(
    columns=(
        *(Column(name, "float") for name in FEATURES),
        Column(LABEL, "int", low=0, high=1),
    )
)
CENTER = np.array([c for c, _ in REFERENCE.values()])
HALF_RANGE = np.array([h for _, h in REFERENCE.values()])


def to_tensors(df: pd.DataFrame) -> TensorDataset:
    """x: float32 ``(n, 11)`` standardised channels; y: int64 ``defect``."""
    if len(df) == 0:
        raise ValueError("the frame holds no shots")
    x = (df[list(FEATURES)].to_numpy(dtype=np.float64) - CENTER) / HALF_RANGE
    y = df[LABEL].to_numpy(dtype=np.int64, copy=True)
    return TensorDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y))
