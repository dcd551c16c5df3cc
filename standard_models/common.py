"""Building blocks shared by the task folders: locating an installed data package, windowing,
fixed standardisation, the MLP and the weighted binary cross-entropy of the defect tasks.

Kept in one place so every task windows its time series the same way (windows never cross a
run or a gap in the time index) and every network is built from the same Opacus-friendly
layers (Linear, per-sample LayerNorm, activation; never BatchNorm, whose batch statistics mix
samples and break per-sample privacy accounting).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn


def package_folder(package: str, missing: str) -> Path:
    """Root folder of the installed ``package`` whose files a task's data source reads.

    Raises ``RuntimeError`` with ``missing`` (which names the package and how to install it)
    when the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(missing)
    return Path(next(iter(spec.submodule_search_locations)))


def window_end_indices(
    group_codes: np.ndarray, order: np.ndarray, window: int, stride: int = 1
) -> np.ndarray:
    """Row indices at which a window of ``window`` consecutive samples ends.

    Rows must already be sorted by group then order. A new block starts at every change of
    group and wherever ``order`` does not advance by exactly 1 (a gap in the recording), so a
    window never spans two runs or a gap. Within a block, windows start every ``stride`` rows.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be positive, got {window} and {stride}")
    n = len(order)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    idx = np.arange(n)
    is_start = np.ones(n, dtype=bool)
    is_start[1:] = (group_codes[1:] != group_codes[:-1]) | (np.diff(order) != 1)
    block_start = np.maximum.accumulate(np.where(is_start, idx, 0))
    pos = idx - block_start
    valid = (pos >= window - 1) & ((pos - (window - 1)) % stride == 0)
    return idx[valid]


def grouped_windows(
    df: pd.DataFrame,
    group_col: str,
    order_col: str,
    feature_cols: Sequence[str],
    target_col: str,
    window: int,
    stride: int,
    center: np.ndarray,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised windows ``(n, window, features)``, the target at each window's last row and,
    per window, the index of its group (sorted order, ``0..g-1``).

    Windows come out sorted by group, so each group's windows are contiguous: the layout
    :class:`~standard_models.base.UnitDataset` needs when a group (a run, a machine) is the
    privacy unit. Groups too short for one window get no index.
    """
    ordered = df.sort_values([group_col, order_col], kind="stable")
    codes, _ = pd.factorize(ordered[group_col])
    order = ordered[order_col].to_numpy(dtype=np.int64)
    ends = window_end_indices(codes, order, window, stride)
    values = (ordered[list(feature_cols)].to_numpy(dtype=np.float64) - center) / scale
    values = values.astype(np.float32)
    steps = ends[:, None] - (window - 1) + np.arange(window)[None, :]
    x = values[steps] if len(ends) else np.zeros((0, window, len(feature_cols)), np.float32)
    y = ordered[target_col].to_numpy()[ends].copy()
    _, groups = np.unique(codes[ends], return_inverse=True)
    return x, y, groups.astype(np.int64).reshape(-1)


class MLP(nn.Module):
    """Feed-forward net on a flattened input: [Linear -> LayerNorm -> activation] x k -> Linear.

    The LayerNorm has no learnable gain or bias by default (``norm_affine=False``): it still
    keeps every sample's hidden activations on a fixed scale, which heavy-tailed inputs need
    (a TEP fault moves variables by up to 100 reference standard deviations), but every
    trainable layer is then a ``Linear``, so DP-SGD clips per sample in one backward pass
    (:mod:`fl_client.clipping`). A learnable LayerNorm needs Opacus's per-sample gradients for
    its parameters, which makes each DP step several times slower. ``squeeze_output`` returns
    shape ``(batch,)`` for a single output (binary logit or regression value).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (128, 128),
        layer_norm: bool = True,
        norm_affine: bool = False,
        activation: str = "gelu",
        dropout: float = 0.0,
        squeeze_output: bool = False,
    ) -> None:
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        if squeeze_output and out_features != 1:
            raise ValueError("squeeze_output needs out_features == 1")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if layer_norm:
                layers.append(nn.LayerNorm(h, elementwise_affine=norm_affine))
            layers.append(acts[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.squeeze_output = squeeze_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten everything but the batch axis and apply the network."""
        out = self.net(x.flatten(1))  # keeps an empty Poisson batch [0, features]
        return out.squeeze(-1) if self.squeeze_output else out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (reported in docs and checked by tests)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class WeightedBCELoss(nn.Module):
    """Binary cross-entropy on a defect logit, taking the dataset's integer 0/1 labels.

    ``pos_weight`` up-weights the defective (positive) class. Every sample's loss depends only
    on its own logit and label, and ``reduction`` is a plain attribute, so Opacus ghost
    clipping can set it to ``"none"`` to obtain per-sample losses.
    """

    def __init__(self, pos_weight: float, reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (shape ``(batch,)``) against 0/1 ``target``."""
        return F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), pos_weight=self.pos_weight, reduction=self.reduction
        )
