"""Rules that keep contribution pay from being gamed by noise or by copies.

Shapley-family scores answer "how much did the validation metric gain from this update?". Under
differential privacy every honest update is mostly noise, so a round's score of a factory that
sent pure noise can be positive by chance, and a factory that copies another's data doubles that
data's weight in FedAvg and so the pair's pay. The two rules here act on what the server already
has each round (the accepted updates, the global model, each factory's claimed size and its
per-round scores); both are pure numpy functions, tested without Flower.

**No pay for noise** (:func:`alignment_statistic`, :func:`noise_test`). A pure-noise update
``delta_i = w_i - w`` of any norm is, under the DP mechanism the factories run, an isotropic
Gaussian vector independent of everyone else's update. Its cosine with the round's consensus
(the weighted mean update of the *other* accepted factories) is then distributed as the cosine of
a uniformly random direction in ``d`` dimensions, whatever its norm:
``t = cos * sqrt((d - 1) / (1 - cos**2))`` follows Student's t with ``d - 1`` degrees of freedom
(about N(0, 1) at the parameter counts of the standard models). An honest update carries the
clipped gradient signal its data shares with the others, so its ``t`` is positive. Over a
factory's rounds, the one-sided Stouffer statistic ``Z = sum_r z_r / sqrt(R)`` (``z_r`` the
normal quantile of round ``r``'s ``t``) is N(0, 1) for a noise sender; a factory is paid only if
``Z`` exceeds the ``1 - alpha`` quantile. A noise free-rider is then paid with probability
``alpha`` per run (default ``1e-3``), independent of how large its noise is; an honest factory
whose update is indistinguishable from noise (tiny data under heavy DP) is withheld too, which is
the price of the rule and is measured in the contribution benchmark. The rule is blind to an
update that copies the previous round's global step (aligned without any data): that is a copy of
the federation's own work, which :func:`duplicate_groups` does not catch either.

**No gain from copies** (:func:`duplicate_groups`, :func:`split_group_credit`). Two factories
training on the same records from the same global model send updates whose *data-dependent
parts* coincide; honest factories with data of the same kind share only the population part.
Subtracting the round's consensus removes the shared population part, and the residuals'
cosine between two factories is then small for independent data (their DP noise and sampling
are independent) and large for copied data. A pair is flagged when the residual cosine is
both far above the null of independent noise (``t``-statistic as above) and above a floor
``min_cosine``; pairs flagged in at least ``min_fraction`` of the rounds both took part in
join one group (connected components). :func:`split_group_credit` then treats each group as one
factory: its members' summed score is replaced by their mean (what one copy of the shared data is
worth when both copies are present), split equally among the members.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

State = Mapping[str, np.ndarray]

DEFAULT_ALPHA = 1e-3
"""Probability that a pure-noise sender is paid in one run under :func:`noise_test`."""


def flat_deltas(
    updates: Sequence[State], reference: State, keys: Sequence[str] | None = None
) -> np.ndarray:
    """``updates[i] - reference`` flattened over ``keys`` (default: the reference's), one row each.

    Only floating-point arrays count: integer buffers (counters) carry no gradient signal.
    """
    names = [
        k
        for k in (keys if keys is not None else list(reference))
        if np.issubdtype(np.asarray(reference[k]).dtype, np.floating)
    ]
    if not names:
        raise ValueError("the reference model has no floating-point arrays to compare")
    ref = np.concatenate([np.asarray(reference[k], dtype=np.float64).ravel() for k in names])
    rows = [
        np.concatenate([np.asarray(u[k], dtype=np.float64).ravel() for k in names]) - ref
        for u in updates
    ]
    return np.stack(rows) if rows else np.zeros((0, ref.size))


def _cosine_t(cos: np.ndarray, dim: int) -> np.ndarray:
    """Student-t statistic (``dim - 1`` degrees of freedom) of cosines with a random direction."""
    cos = np.clip(cos, -1.0 + 1e-15, 1.0 - 1e-15)
    return cos * np.sqrt((dim - 1) / (1.0 - cos**2))


def _t_to_z(t: np.ndarray, dim: int) -> np.ndarray:
    """The standard normal quantile with the same upper tail as ``t`` under ``t_{dim-1}``."""
    return -stats.norm.ppf(stats.t.sf(t, df=max(dim - 1, 1)))


def alignment_statistic(deltas: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Each update's alignment with the others' weighted mean, as a standard normal score.

    Args:
        deltas: ``(n, d)`` updates minus the global model they were trained from
            (:func:`flat_deltas`).
        weights: each update's aggregation weight (FedAvg: its ``num-examples``).

    Returns:
        ``z`` of shape ``(n,)``: N(0, 1) for an update that is isotropic noise independent of
        the others, positive for an update that points where the others do. A factory alone in
        its round, or whose update or the others' mean is zero, gets 0 (no evidence).
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n, dim = deltas.shape
    if w.shape != (n,) or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"need {n} finite positive weights, got {list(weights)}")
    out = np.zeros(n)
    if n < 2 or dim < 2:
        return out
    total = w @ deltas
    for i in range(n):
        others = (total - w[i] * deltas[i]) / (w.sum() - w[i])
        na, nb = np.linalg.norm(deltas[i]), np.linalg.norm(others)
        if na == 0 or nb == 0:
            continue
        cos = float(deltas[i] @ others) / (na * nb)
        out[i] = float(_t_to_z(_cosine_t(np.array([cos]), dim), dim)[0])
    return out


@dataclass(frozen=True)
class NoiseVerdict:
    """The noise test's outcome for one factory over the rounds it took part in.

    z: the Stouffer statistic over its rounds (N(0, 1) for a pure-noise sender).
    rounds: rounds it took part in.
    paid: whether its contribution is distinguishable from noise at the test's level.
    """

    z: float
    rounds: int
    paid: bool


def noise_test(
    round_z: Mapping[str, Sequence[float]], alpha: float = DEFAULT_ALPHA
) -> dict[str, NoiseVerdict]:
    """One-sided Stouffer test per factory: is its update more aligned than noise would be?

    Args:
        round_z: per factory, its :func:`alignment_statistic` of every round it took part in.
        alpha: the probability that a pure-noise sender passes (is paid), in ``(0, 1)``.

    Returns:
        Per factory, a :class:`NoiseVerdict`; a factory with no rounds is not paid.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    threshold = float(stats.norm.isf(alpha))
    out = {}
    for fid, zs in round_z.items():
        arr = np.asarray(list(zs), dtype=np.float64)
        if arr.size == 0:
            out[fid] = NoiseVerdict(0.0, 0, False)
            continue
        z = float(arr.sum() / math.sqrt(arr.size))
        out[fid] = NoiseVerdict(z, int(arr.size), z > threshold)
    return out


def withhold_unproven(
    scores: Mapping[str, float], verdicts: Mapping[str, NoiseVerdict]
) -> dict[str, float]:
    """``scores`` with every factory the noise test did not pass set to 0 (never negative pay).

    A factory missing from ``verdicts`` is withheld as well: no evidence, no pay.
    """
    return {
        fid: (float(v) if fid in verdicts and verdicts[fid].paid else min(float(v), 0.0))
        for fid, v in scores.items()
    }


def residual_cosines(deltas: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Pairwise cosines of the updates after removing the round's weighted mean update.

    Returns an ``(n, n)`` symmetric matrix with ones on the diagonal (zeros where a residual
    is zero). Removing the mean removes the part every honest factory shares, so what is left
    is each factory's own data signal plus its DP noise.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    mean = (w @ deltas) / w.sum()
    res = deltas - mean
    norms = np.linalg.norm(res, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = res / safe[:, None]
    cos = unit @ unit.T
    cos[norms == 0, :] = 0.0
    cos[:, norms == 0] = 0.0
    np.fill_diagonal(cos, 1.0)
    return cos


def duplicate_pairs(
    deltas: np.ndarray,
    weights: Sequence[float],
    *,
    min_cosine: float = 0.5,
    alpha: float = DEFAULT_ALPHA,
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of one round whose residual updates are near-duplicates.

    A pair is flagged when its residual cosine (:func:`residual_cosines`) exceeds ``min_cosine``
    and its t-statistic is significant at ``alpha`` after a Bonferroni correction over the
    round's pairs, i.e. far above what independent DP noise allows.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    n, dim = deltas.shape
    if n < 3 or dim < 2:  # with two players the residuals are opposite by construction
        return []
    cos = residual_cosines(deltas, weights)
    pairs = n * (n - 1) // 2
    z_needed = float(stats.norm.isf(alpha / pairs))
    iu, ju = np.triu_indices(n, k=1)
    z = _t_to_z(_cosine_t(cos[iu, ju], dim), dim)
    hit = (cos[iu, ju] > min_cosine) & (z > z_needed)
    return [(int(i), int(j)) for i, j in zip(iu[hit], ju[hit], strict=True)]


def duplicate_groups(
    round_pairs: Sequence[tuple[Sequence[str], Sequence[tuple[int, int]]]],
    min_fraction: float = 0.5,
) -> list[frozenset[str]]:
    """Groups of factories flagged as copies of each other over a run.

    Args:
        round_pairs: per round, the round's factory ids (in update order) and its flagged
            :func:`duplicate_pairs`.
        min_fraction: a pair joins a group when it was flagged in at least this fraction of the
            rounds in which both factories took part.

    Returns:
        The groups of two or more factories (connected components of the flagged pairs),
        each a frozenset, sorted by their smallest id.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    together: dict[tuple[str, str], int] = {}
    flagged: dict[tuple[str, str], int] = {}
    for ids, pairs in round_pairs:
        ids = list(ids)
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                key = tuple(sorted((ids[a], ids[b])))
                together[key] = together.get(key, 0) + 1  # type: ignore[index]
        for i, j in pairs:
            key = tuple(sorted((ids[i], ids[j])))
            flagged[key] = flagged.get(key, 0) + 1  # type: ignore[index]
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (a, b), count in flagged.items():
        if count >= min_fraction * together[(a, b)]:
            parent[find(a)] = find(b)
    groups: dict[str, set[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), set()).add(x)
    return sorted((frozenset(g) for g in groups.values() if len(g) > 1), key=min)


def split_group_credit(
    scores: Mapping[str, float], groups: Sequence[frozenset[str]]
) -> dict[str, float]:
    """Scores with each duplicate group paid as one factory.

    A group's members together get the *mean* of their scores (one copy's worth of the shared
    data), in equal parts; everyone else keeps their score. The adjusted total is therefore
    never above the original total for positive group scores. Groups must be disjoint; ids in
    a group but not in ``scores`` are ignored.
    """
    out = {fid: float(v) for fid, v in scores.items()}
    seen: set[str] = set()
    for group in groups:
        members = sorted(m for m in group if m in out)
        if seen & set(members):
            raise ValueError(f"duplicate groups overlap on {sorted(seen & set(members))}")
        seen.update(members)
        if len(members) < 2:
            continue
        share = float(np.mean([out[m] for m in members])) / len(members)
        for m in members:
            out[m] = share
    return out
