"""Pure helpers that split a pooled data set into factories.

Every task builds its factories with the same three non-IID knobs of
:class:`~standard_models.base.PartitionConfig`, so their meaning is identical across tasks:

* label skew: :func:`dirichlet_split` draws, for every class, the share each factory receives
  from ``Dirichlet(alpha)`` (Hsu, Qi and Brown, 2019); small ``alpha`` leaves each factory with
  few classes;
* quantity skew: :func:`size_weights` draws factory sizes from a log-normal with
  ``sigma = quantity_skew``; 0 gives equal sizes;
* feature skew: :func:`apply_feature_shift` gives each factory a per-sensor offset and gain
  (calibration differences between plants), deterministic in ``(seed, factory)``.

All randomness flows through :func:`rng_for`, which derives an independent stream per purpose,
so that e.g. changing ``feature_shift`` leaves the assignment of rows to factories unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .base import PartitionConfig

SCHEMES: tuple[str, ...] = ("natural", "dirichlet", "iid")

# Stream identifiers for rng_for: one per purpose, shared by all tasks.
STREAM_PROFILES = 1
STREAM_SAMPLES = 2
STREAM_PARTITION = 3
STREAM_SIZES = 4
STREAM_SHIFT = 5
STREAM_VALIDATION = 6
STREAM_TEST = 7


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator for ``seed`` and a purpose path such as ``(STREAM_SHIFT, 3)``."""
    return np.random.default_rng([int(seed), *(int(s) for s in stream)])


def check_generate_args(num_factories: int, seed: int, partition: PartitionConfig) -> None:
    """Reject arguments no task can honour, with a message naming the offending value."""
    if int(num_factories) < 1:
        raise ValueError(f"num_factories must be at least 1, got {num_factories}")
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if partition.scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {partition.scheme!r}; choose one of {SCHEMES}")
    if not partition.alpha > 0:
        raise ValueError(f"alpha must be positive, got {partition.alpha}")
    if not partition.quantity_skew >= 0:
        raise ValueError(f"quantity_skew must be non-negative, got {partition.quantity_skew}")
    if not partition.feature_shift >= 0:
        raise ValueError(f"feature_shift must be non-negative, got {partition.feature_shift}")


def size_weights(num_parts: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Relative factory sizes: log-normal with ``sigma`` (0 gives equal shares); sums to 1."""
    if sigma <= 0:
        return np.full(num_parts, 1.0 / num_parts)
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_parts)
    return weights / weights.sum()


def allocate(total: int, weights: Sequence[float] | np.ndarray, minimum: int = 0) -> np.ndarray:
    """Split the integer ``total`` proportionally to ``weights`` (largest-remainder rounding).

    Every part receives at least ``minimum`` when ``total`` allows it; the extra items are
    taken from the largest parts, so the result always sums to ``total``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be a non-empty vector of non-negative numbers")
    raw = w / w.sum() * total
    counts = np.floor(raw).astype(np.int64)
    short = int(total - counts.sum())
    if short > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    minimum = min(int(minimum), total // len(w))
    for i in np.flatnonzero(counts < minimum):
        need = minimum - counts[i]
        while need > 0:
            donor = int(np.argmax(counts))
            take = min(need, counts[donor] - minimum)
            counts[donor] -= take
            counts[i] += take
            need -= take
    return counts


def iid_split(
    num_items: int, weights: Sequence[float] | np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffle ``num_items`` indices and cut them into parts sized by ``weights``."""
    counts = allocate(num_items, weights, minimum=1)
    order = rng.permutation(num_items)
    cuts = np.cumsum(counts)[:-1]
    return [np.sort(part) for part in np.split(order, cuts)]


def _dirichlet_draw(num_parts: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    q = rng.dirichlet(np.full(num_parts, float(alpha)))
    if not np.isfinite(q).all() or q.sum() <= 0:  # underflow at tiny alpha: all mass on one
        q = np.zeros(num_parts)
        q[rng.integers(num_parts)] = 1.0
    return q


def dirichlet_split(
    labels: Sequence[int] | np.ndarray,
    num_parts: int,
    alpha: float,
    rng: np.random.Generator,
    weights: Sequence[float] | np.ndarray | None = None,
    min_items: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split of item indices: class ``c`` goes to parts in ``Dirichlet(alpha)`` shares.

    ``weights`` (e.g. from :func:`size_weights`) multiply every class's shares, which adds
    quantity skew on top of label skew. Draws are repeated until every part holds at least
    ``min_items`` items; if that never happens, items are moved from the largest parts.
    """
    labels = np.asarray(labels)
    w = np.full(num_parts, 1.0) if weights is None else np.asarray(weights, dtype=np.float64)
    classes = np.unique(labels)
    min_items = min(int(min_items), len(labels) // num_parts)
    parts: list[list[int]] = []
    for _ in range(max_tries):
        parts = [[] for _ in range(num_parts)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            q = _dirichlet_draw(num_parts, alpha, rng) * w
            q = q / q.sum() if q.sum() > 0 else np.full(num_parts, 1.0 / num_parts)
            cuts = np.round(np.cumsum(q)[:-1] * len(idx)).astype(np.int64)
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_items:
            break
    else:
        for p in range(num_parts):
            while len(parts[p]) < min_items:
                donor = max(range(num_parts), key=lambda i: len(parts[i]))
                parts[p].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def contiguous_bounds(length: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, stop)`` bounds of ``pieces`` near-equal contiguous pieces of ``range(length)``."""
    edges = np.linspace(0, length, pieces + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def feature_shift_params(
    num_features: int, strength: float, seed: int, factory_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (in reference-scale units) and gains of one factory's sensors.

    offset ~ N(0, strength), gain = exp(N(0, strength / 4)); both are 0 and 1 when
    ``strength`` is 0. Deterministic in ``(seed, factory_index)``.
    """
    if strength <= 0:
        return np.zeros(num_features), np.ones(num_features)
    rng = rng_for(seed, STREAM_SHIFT, factory_index)
    offsets = rng.normal(0.0, strength, size=num_features)
    gains = np.exp(rng.normal(0.0, strength / 4.0, size=num_features))
    return offsets, gains


def apply_feature_shift(
    df: pd.DataFrame,
    columns: Sequence[str],
    center: Sequence[float] | np.ndarray,
    scale: Sequence[float] | np.ndarray,
    strength: float,
    seed: int,
    factory_index: int,
) -> pd.DataFrame:
    """A copy of ``df`` as if factory ``factory_index``'s sensors were calibrated differently.

    ``x' = center + gain * (x - center) + offset * scale`` per column, with the task's fixed
    standardisation ``center``/``scale``: ``strength`` is thus measured in the model's input
    units and means the same for a temperature in degrees and a flow in m3/h in every task.
    ``strength = 0`` returns an unchanged copy.
    """
    out = df.copy()
    if strength <= 0:
        return out
    offsets, gains = feature_shift_params(len(columns), strength, seed, factory_index)
    center_arr = np.asarray(center, dtype=np.float64)
    scale_arr = np.asarray(scale, dtype=np.float64)
    values = out[list(columns)].to_numpy(dtype=np.float64)
    shifted = center_arr + gains * (values - center_arr) + offsets * scale_arr
    out[list(columns)] = shifted
    return out
