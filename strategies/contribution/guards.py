"""Rules that keep contribution pay from being gamed by noise or by copies.

Shapley-family scores answer "how much did the validation metric gain from this update?". Under
differential privacy every honest update is mostly noise, so a round's score of a factory that
sent pure noise can be positive by chance, and a factory that copies another's data doubles that
data's weight in FedAvg and so the pair's pay. The rules here act on what the server already
has each round (the accepted updates, the global model they were trained from, each factory's
claimed size, its model's outputs on the validation set) and, for copies, on a sketch of its
records that a factory can report; all are pure functions (numpy, pandas, torch tensors of
outputs), tested without Flower.

**No pay for noise** (:func:`gradient_statistic`, :func:`noise_test`). A factory is paid only
for updates that do better than noise. Each round the server takes the gradient ``g`` of the
task's loss on its validation set at the global model, and each accepted update's first-order
gain per coordinate, ``a_j = -delta_j g_j``; the round's score is
``z = sum(a) / sqrt(sum(a ** 2))``. Noise that is independent of the validation set, independent
across coordinates and symmetric in each (DP-SGD's Gaussian noise of any scale, and any other
shape: spikes, heavy tails, per-coordinate scales) has the law of ``sum(s_j a_j)`` with random
signs ``s_j`` given its magnitudes, so ``P(z >= t) <= exp(-t ** 2 / 2)`` (Hoeffding), whatever
its norm; summed over a factory's rounds the bound still holds, even though each round's
gradient depends on the rounds before. An honest update carries its data's gradient, whose gain
adds up over every coordinate. (An update along one fixed direction with a random sign is not
such noise: its coordinates share one sign. It brings no data either, but it is outside what the
bound covers, as it is outside the placebo test's isotropic null.) Over a factory's rounds,
:func:`noise_test` pays it when the Stouffer statistic ``Z = sum_r z_r / sqrt(R)`` exceeds
``sqrt(2 ln(2 / alpha))`` or its best round exceeds ``sqrt(2 ln(2 R / alpha))``: a noise
free-rider is paid with probability at most ``alpha`` per run (default ``1e-3``). An honest
factory whose update does not beat noise (a few DP steps on tiny data) is withheld too; the
contribution benchmark measures that rate. The test needs one backward pass a round and no
coalition scores. It does not catch an update that copies the previous round's global step
(aligned without any data): that is a copy of the federation's own work, which
:func:`duplicate_groups` does not catch either.

The earlier rules remain as options. ``noise_rule="placebo"`` (:func:`placebo_statistic`)
scores each update in the round's output-linearised game (alone, and on top of every other
player) against placebo updates, isotropic Gaussian steps of its norm from the global model
(:func:`placebo_update`), as Student's t over the placebos' scores: its null is isotropic noise
only, its scores move with a few validation examples changing class, and at 100 factories it
paid fewer honest factories than the gradient rule on the same updates (README).
``noise_rule="alignment"`` (:func:`alignment_statistic`) compares each update's *direction*
with the others', which under DP-SGD is mostly each update's own noise: it withheld every
honest factory of the default job.

**No gain from copies** (:func:`duplicate_pairs` / :func:`duplicate_groups` on the updates,
:func:`record_fingerprint` / :func:`fingerprint_groups` on the data, :func:`split_group_credit`).
Two factories training on the same records share their data's own gradient direction on top of
the population direction every honest factory shares; honest factories with data of the same
kind share only the latter. So a pair is flagged when its update cosine exceeds what each of the
two shares with everyone else (:func:`excess_cosines`) by far more than independent DP noise
allows, in at least half the rounds both took part in. Under heavy DP noise the data's own
direction is buried (the contribution benchmark finds copies this way on ``tep_fault`` but not
on ``molding_quality``), so the second rule compares keyed MinHash sketches of the factories'
records (:mod:`fl_common.sketch`), which a factory computes at home and sends with every reply
without revealing a record (:meth:`ContributionGuard.observe_sketches`). Without DP noise the
update rule has the opposite failure: two honest factories with alike label-skewed data can
send updates as close as copies', so a pair whose sketches were both sent and share no hash is
not grouped by its updates alone (:func:`disjoint_sketches`).
:func:`split_group_credit` then pays each group as one factory: its members' summed score is
replaced by their mean (what one copy of the shared data is worth when both copies are
present), split equally among the members. The server does better (:class:`ContributionGuard`,
used by :class:`~strategies.contribution.scorer.ContributionScorer`): it scores the round with
one player per group, so the copy's doubled weight does not also lower everyone else's
marginal contribution, which no re-split of the pair's own scores undoes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import stats

from fl_common.sketch import fingerprint_similarity

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


#: Bound on a round's alignment score: beyond it the tail probability underflows to 0 (an
#: update aligned far beyond any noise), and the score must stay finite for JSON and MLflow.
MAX_Z = 37.0


def _t_to_z(t: np.ndarray, dim: int) -> np.ndarray:
    """The standard normal quantile with the same upper tail as ``t`` under ``t_{dim-1}``,
    within ``[-MAX_Z, MAX_Z]``."""
    df = max(dim - 1, 1)
    upper = stats.norm.isf(stats.t.sf(t, df=df))
    lower = -stats.norm.isf(stats.t.cdf(t, df=df))
    z = np.where(t > 0, upper, lower)
    return np.clip(np.nan_to_num(z, nan=0.0, posinf=MAX_Z, neginf=-MAX_Z), -MAX_Z, MAX_Z)


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

    The others' consensus is the weighted mean of their *directions* (updates scaled to unit
    length), with each weight capped at the round's median weight: one update of huge norm
    (a noise sender's) or one inflated ``num-examples`` claim cannot swamp the consensus and so
    hide every honest factory's alignment. The null distribution is unchanged, since a noise
    update is independent of any direction built from the others.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n, dim = deltas.shape
    if w.shape != (n,) or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"need {n} finite positive weights, got {list(weights)}")
    out = np.zeros(n)
    if n < 2 or dim < 2:
        return out
    norms = np.linalg.norm(deltas, axis=1)
    units = deltas / np.where(norms > 0, norms, 1.0)[:, None]
    w = np.minimum(w, float(np.median(w)))
    total = w @ units
    for i in range(n):
        others = (total - w[i] * units[i]) / (w.sum() - w[i])
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


def _upper_quantile(p: float, subgaussian: bool) -> float:
    """The threshold a statistic exceeds with probability at most ``p``: the normal quantile,
    or for a 1-sub-Gaussian statistic the Hoeffding bound ``sqrt(2 ln(1 / p))``."""
    return math.sqrt(2.0 * math.log(1.0 / p)) if subgaussian else float(stats.norm.isf(p))


def noise_test(
    round_z: Mapping[str, Sequence[float]],
    alpha: float = DEFAULT_ALPHA,
    subgaussian: bool = False,
) -> dict[str, NoiseVerdict]:
    """Per factory: is its update, over its rounds, more aligned than noise would be?

    Two one-sided tests at level ``alpha / 2`` each, so a pure-noise sender passes with
    probability at most ``alpha``: the Stouffer statistic ``sum(z) / sqrt(R)`` over its ``R``
    rounds (the power for a weak but steady signal, e.g. a small factory), or its best round's
    ``z`` against the Bonferroni threshold for ``R`` rounds (the power when the signal is strong
    early and drowns in DP noise later, as it does once the model has learnt what the data
    share: Stouffer alone would then withhold honest factories more the longer a run lasts).

    Args:
        round_z: per factory, its :func:`alignment_statistic` of every round it took part in.
        alpha: the probability that a pure-noise sender passes (is paid), in ``(0, 1)``.
        subgaussian: the round scores are 1-sub-Gaussian under the null rather than standard
            normal (:func:`gradient_statistic`): both thresholds are then Hoeffding's (``sqrt(2
            ln(2 / alpha))`` and ``sqrt(2 ln(2 R / alpha))``), which hold for a sum of such
            scores over rounds even when each round depends on the ones before.

    Returns:
        Per factory, a :class:`NoiseVerdict`; a factory with no rounds is not paid.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    threshold = _upper_quantile(alpha / 2, subgaussian)
    out = {}
    for fid, zs in round_z.items():
        arr = np.asarray(list(zs), dtype=np.float64)
        if arr.size == 0:
            out[fid] = NoiseVerdict(0.0, 0, False)
            continue
        z = float(arr.sum() / math.sqrt(arr.size))
        best = float(arr.max()) > _upper_quantile(alpha / 2 / arr.size, subgaussian)
        out[fid] = NoiseVerdict(z, int(arr.size), z > threshold or best)
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


# -- no pay for noise, by the validation loss: the sign-flip test ------------------------------
def gradient_statistic(deltas: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Each update's first-order gain on the validation loss, self-normalised: a sign-flip
    test of whether it is better than noise.

    With ``g`` the gradient of the task's loss on the server's validation set at the global
    model and ``a_j = -delta_j g_j`` each coordinate's first-order gain, ``z = sum(a) /
    sqrt(sum(a ** 2))``. An update that is noise independent of the validation set, independent
    across coordinates and symmetric in each (DP-SGD's Gaussian noise of any scale, spikes,
    heavy tails), has the law of ``sum(s_j a_j)`` with independent random signs ``s_j`` given
    its magnitudes; by Hoeffding's inequality ``P(z >= t) <= exp(-t ** 2 / 2)`` whatever its
    norm or shape, and a sum of such scores over rounds keeps that bound
    (``noise_test(..., subgaussian=True)``). An honest
    update carries its data's gradient, which points against ``g`` where the factory's data
    resemble the validation set: its gain adds up over every coordinate, where a score on the
    task's metric (:func:`placebo_statistic`) sees a few examples change class.

    Args:
        deltas: ``(n, d)`` updates minus the global model (:func:`flat_deltas`).
        gradient: ``(d,)`` the validation loss gradient at the global model, flattened the
            same way (zeros for buffers).

    Returns:
        ``z`` of shape ``(n,)`` within ``[-MAX_Z, MAX_Z]``; 0 for a zero update or gradient.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    g = np.asarray(gradient, dtype=np.float64).ravel()
    if deltas.ndim != 2 or deltas.shape[1] != g.size:
        raise ValueError(f"need (n, {g.size}) updates, got {deltas.shape}")
    gains = -deltas * g
    spread = np.sqrt((gains**2).sum(axis=1))
    z = np.divide(gains.sum(axis=1), spread, out=np.zeros(len(deltas)), where=spread > 0)
    return np.clip(z, -MAX_Z, MAX_Z)


# -- no pay for noise, by score: the placebo test ---------------------------------------------
#: ``contribution.guards.noise_rule`` values: ``gradient`` (:func:`gradient_statistic`, the
#: default), ``placebo`` (:func:`placebo_statistic`) or ``alignment``
#: (:func:`alignment_statistic`).
NOISE_RULES = ("gradient", "placebo", "alignment")

#: Placebo scores a factory's round is compared with (its own placebos and, rescaled to its
#: norm, the nearest others').
DEFAULT_PLACEBOS = 12


def placebo_rng(
    seed: int, server_round: int, factory_id: str, draw: int = 0
) -> np.random.Generator:
    """The generator of ``factory_id``'s ``draw``-th placebo in ``server_round`` of a run with
    ``seed``: the same every time the round is scored (a resumed server, an auditor)."""
    key = int.from_bytes(hashlib.blake2b(factory_id.encode(), digest_size=8).digest(), "big")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(server_round), key, int(draw)])


def placebo_update(
    update: State, reference: State, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A pure-noise update of the same norm as ``update``: ``reference`` plus an isotropic
    Gaussian step over its floating-point arrays, scaled to ``|update - reference|``.

    Integer buffers keep the reference's values; the norm is measured over the floating-point
    arrays only, as :func:`flat_deltas` does.
    """
    names = [k for k in reference if np.issubdtype(np.asarray(reference[k]).dtype, np.floating)]
    norm = float(np.linalg.norm(flat_deltas([update], reference, names)[0])) if names else 0.0
    noise = {k: rng.standard_normal(np.shape(reference[k])) for k in names}
    size = math.sqrt(sum(float((v**2).sum()) for v in noise.values()))
    scale = norm / size if size > 0 else 0.0
    out = {k: np.asarray(v).copy() for k, v in reference.items()}
    for k in names:
        ref = np.asarray(reference[k])
        out[k] = (ref.astype(np.float64) + scale * noise[k]).astype(ref.dtype)
    return out


def _placebo_p(real: float, placebos: np.ndarray) -> float | None:
    """One-sided p-value of ``real`` against ``k`` exchangeable placebo scores: Student's t
    with ``k - 1`` degrees of freedom of ``(real - mean) / (sd * sqrt(1 + 1/k))``; None where
    the placebos do not vary (no evidence either way)."""
    k = placebos.size
    spread = float(placebos.std(ddof=1)) if k > 1 else 0.0
    if not spread > 0:
        return None
    t = (real - float(placebos.mean())) / (spread * math.sqrt(1.0 + 1.0 / k))
    return float(stats.t.sf(t, df=k - 1))


def placebo_statistic(
    own: torch.Tensor,
    placebos: torch.Tensor,
    owners: Sequence[int],
    reference: torch.Tensor,
    norms: Sequence[float],
    weights: Sequence[float],
    metric: Callable[[torch.Tensor], float],
    sign: float = 1.0,
    size: int = DEFAULT_PLACEBOS,
) -> np.ndarray:
    """Each update's round score against what pure noise of its norm scores, as a normal ``z``.

    An update ``u`` of player ``i`` is scored twice in the round's output-linearised game
    (:class:`~strategies.contribution.utility.OutputMixtureGame`: a coalition's outputs are the
    weighted mix of its members' model outputs, scored with the task's metric), at the two ends
    of a permutation: alone, ``U({u})``, and on top of every other player, ``U((N - {i}) +
    {u})``. Where factories hold data of the same kind the second is small (the others already
    bring what ``i`` brings) and the first shows the signal; where each holds its own kind of
    data the first can be negative (a model moved towards one plant's data alone) and the
    second shows it. Each score of the real update is compared with the same score of placebo
    updates, isotropic Gaussian steps of the same norm from the global model
    (:func:`placebo_update`): player ``i``'s own and, to make up ``size`` of them, the nearest
    others' in norm, their output change rescaled to ``i``'s norm (first order in the step, as
    the game itself). A pure-noise update is exchangeable with its placebos, so for each score
    ``t = (x - mean) / (sd * sqrt(1 + 1/k))`` over ``k`` placebos is Student's t with ``k - 1``
    degrees of freedom (for normal scores); the smaller one-sided p-value of the two, Sidak-
    corrected (``1 - (1 - p)**2``), is returned as the normal quantile of the same upper tail,
    so :func:`noise_test` combines rounds as it does alignment scores.

    Args:
        own: ``(n, ...)`` outputs of each player's own model on the validation set.
        placebos: ``(m, ...)`` outputs of the placebo models; ``owners[j]`` is the player whose
            norm placebo ``j`` has.
        owners: for each placebo, its player (every player needs at least one).
        reference: outputs of the global model the round started from.
        norms: each player's update norm (``|w_i - w|``), which its placebos have.
        weights: each player's aggregation weight.
        metric: the task's main metric of a tensor of outputs.
        sign: ``1`` when greater is better, ``-1`` for error metrics.
        size: placebos per player's comparison (at least 2).

    Returns:
        ``z`` of shape ``(n,)``: about N(0, 1) or below for a pure-noise update, large for an
        update that brings more than noise of its size; 0 where the placebos do not vary.
    """
    own = torch.as_tensor(own, dtype=torch.float64)
    placebos = torch.as_tensor(placebos, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    n, owners = own.shape[0], np.asarray(list(owners), dtype=np.int64)
    norms_arr = np.asarray(norms, dtype=np.float64)
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if owners.shape != (placebos.shape[0],) or norms_arr.shape != (n,) or w.shape != (n,):
        raise ValueError(
            f"need one owner per placebo and one norm and weight per player; got "
            f"{owners.size} owners for {placebos.shape[0]} placebos, {norms_arr.size} norms and "
            f"{w.shape[0]} weights for {n} players"
        )
    if n and not set(range(n)) <= set(owners.tolist()):
        raise ValueError("every player needs at least one placebo")
    if size < 2:
        raise ValueError(f"the placebo test needs at least 2 placebos a player, got {size}")

    def gain(outputs: torch.Tensor) -> float:
        value = sign * metric(outputs.to(torch.float32))
        return value if math.isfinite(value) else 0.0

    shape = (-1,) + (1,) * (own.dim() - 1)
    total = (own * w.reshape(shape)).sum(dim=0)
    out = np.zeros(n)
    log_norm = np.log(np.maximum(norms_arr, 1e-300))
    for i in range(n):
        rest = total - w[i] * own[i]

        def scores(outputs: torch.Tensor) -> tuple[float, float]:
            return gain(outputs), gain((rest + w[i] * outputs) / w.sum())  # noqa: B023

        mine = np.flatnonzero(owners == i).tolist()
        others = sorted(
            np.flatnonzero(owners != i).tolist(),
            key=lambda j: (abs(log_norm[owners[j]] - log_norm[i]), j),
        )
        chosen = (mine + others)[: max(size, len(mine))]
        if len(chosen) < 2 or norms_arr[i] <= 0:
            continue
        values = []
        for j in chosen:
            ratio = norms_arr[i] / norms_arr[owners[j]] if norms_arr[owners[j]] > 0 else 0.0
            values.append(scores(reference + ratio * (placebos[j] - reference)))
        placebo_values = np.asarray(values)
        real = scores(own[i])
        found = [_placebo_p(real[c], placebo_values[:, c]) for c in range(2)]
        ps = [p for p in found if p is not None]
        if not ps:
            continue
        least = min(ps)
        p = least * (2.0 - least) if len(ps) == 2 else least  # Sidak: 1 - (1 - p)**2
        z = float(stats.norm.isf(p)) if p > 0 else MAX_Z
        out[i] = float(np.clip(np.nan_to_num(z, nan=0.0), -MAX_Z, MAX_Z))
    return out


def pairwise_cosines(deltas: np.ndarray) -> np.ndarray:
    """``(n, n)`` cosines between the updates (0 where an update is zero, 1 on the diagonal)."""
    deltas = np.asarray(deltas, dtype=np.float64)
    norms = np.linalg.norm(deltas, axis=1)
    unit = deltas / np.where(norms > 0, norms, 1.0)[:, None]
    cos = unit @ unit.T
    cos[norms == 0, :] = 0.0
    cos[:, norms == 0] = 0.0
    np.fill_diagonal(cos, 1.0)
    return cos


def excess_cosines(deltas: np.ndarray) -> np.ndarray:
    """Each pair's cosine above what the two factories share with everyone else.

    ``excess[i, j] = cos(i, j) - median(cos(i, k), cos(j, k) for k not in {i, j})``: honest
    factories with data of the same kind share the population direction with every other
    factory, so their excess is about 0, while two copies of the same records also share their
    data's own direction. With fewer than three updates there is nobody else to compare with and
    the excess is 0.
    """
    cos = pairwise_cosines(deltas)
    n = cos.shape[0]
    out = np.zeros((n, n))
    if n < 3:
        return out
    iu, ju = np.triu_indices(n, k=1)
    rows = np.concatenate([cos[iu], cos[ju]], axis=1)  # (pairs, 2n): both members' cosines
    cols = np.arange(n)
    own = (cols == iu[:, None]) | (cols == ju[:, None])  # the pair itself is not "everyone else"
    rows[np.concatenate([own, own], axis=1)] = np.nan
    excess = cos[iu, ju] - np.nanmedian(rows, axis=1)
    out[iu, ju] = excess
    out[ju, iu] = excess
    return out


def duplicate_pairs(
    deltas: np.ndarray,
    *,
    min_excess: float = 0.05,
    alpha: float = DEFAULT_ALPHA,
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of one round whose updates are near-duplicates.

    Independent DP noise makes the cosine of two updates fluctuate by about ``1 / sqrt(d)``
    around what they share with the population (``d`` parameters), and honest factories' data
    make it fluctuate too (without DP noise, two IID factories' updates can share 0.15 more
    than either shares with the rest). A pair is flagged when its :func:`excess_cosines` is
    above ``min_excess``, above ``1 / sqrt(d)`` times the ``alpha`` normal quantile
    (Bonferroni-corrected over the round's pairs), *and* that many robust standard deviations
    above the median excess of the round's pairs: far above what independent noise allows and
    an outlier among the round's pairs (median and 1.4826 times the median absolute
    deviation). The median and spread are taken over the pairs of factories whose updates are
    clearly aligned with the others' (:func:`alignment_statistic` above the ``alpha`` quantile;
    all pairs when fewer than three such pairs exist), so that the very negative excess of every
    pair with a noise sender does not widen the spread.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    n, dim = deltas.shape
    if n < 3 or dim < 2:
        return []
    excess = excess_cosines(deltas)
    quantile = float(stats.norm.isf(alpha / (n * (n - 1) / 2)))
    iu, ju = np.triu_indices(n, k=1)
    values = excess[iu, ju]
    aligned = alignment_statistic(deltas, np.ones(n)) > stats.norm.isf(alpha)
    reference = values[aligned[iu] & aligned[ju]]
    reference = reference if reference.size >= 3 else values
    centre = float(np.median(reference))
    spread = 1.4826 * float(np.median(np.abs(reference - centre)))
    needed = max(quantile / math.sqrt(dim), centre + quantile * spread)
    hit = (values > min_excess) & (values > needed)
    return [(int(i), int(j)) for i, j in zip(iu[hit], ju[hit], strict=True)]


def fingerprint_groups(
    fingerprints: Mapping[str, np.ndarray], min_similarity: float = 0.5
) -> list[frozenset[str]]:
    """Groups of factories whose record sketches overlap by at least ``min_similarity``.

    Returns connected components of the similar pairs (two or more members), sorted by their
    smallest id; a pair of honest factories shares no records and scores about 0.

    Only pairs whose sketches share a hash can reach a positive similarity, so the pairs are
    found from one sort of all hashes (which factories hold each hash held more than once) and
    only those are compared: about linear in the federation's size where honest factories share
    nothing (0.9 s a round at 100 factories compared pair by pair).
    """
    if not 0.0 < min_similarity <= 1.0:
        raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
    ids = sorted(fingerprints)
    sketches = [np.unique(np.asarray(fingerprints[f], np.uint64)) for f in ids]
    if len(ids) < 2:
        return []
    hashes = np.concatenate(sketches)
    owners = np.repeat(np.arange(len(ids)), [s.size for s in sketches])
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    shared = np.flatnonzero(hashes[1:] == hashes[:-1])
    holders: dict[int, set[int]] = {}
    for i in shared:
        holders.setdefault(int(hashes[i]), set()).update((int(owners[i]), int(owners[i + 1])))
    candidates = {(a, b) for group in holders.values() for a in group for b in group if a < b}
    pairs = [
        (ids[a], ids[b])
        for a, b in sorted(candidates)
        if fingerprint_similarity(sketches[a], sketches[b]) >= min_similarity
    ]
    return merge_groups(pairs)


def merge_groups(
    pairs: Sequence[tuple[str, str]], groups: Sequence[frozenset[str]] = ()
) -> list[frozenset[str]]:
    """Connected components of ``pairs`` and existing ``groups`` (two or more members each)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    links = list(pairs) + [(m, min(g)) for g in groups for m in g]
    for a, b in links:
        parent[find(a)] = find(b)
    out: dict[str, set[str]] = {}
    for x in list(parent):
        out.setdefault(find(x), set()).add(x)
    return sorted((frozenset(g) for g in out.values() if len(g) > 1), key=min)


def duplicate_groups(
    round_pairs: Sequence[tuple[Sequence[str], Sequence[tuple[int, int]]]],
    min_fraction: float = 0.5,
    cleared: Callable[[str, str], bool] | None = None,
) -> list[frozenset[str]]:
    """Groups of factories flagged as copies of each other over a run.

    Args:
        round_pairs: per round, the round's factory ids (in update order) and its flagged
            :func:`duplicate_pairs`.
        min_fraction: a pair joins a group when it was flagged in at least this fraction of the
            rounds in which both factories took part.
        cleared: ``cleared(a, b)`` is true for a pair known not to share data
            (:func:`disjoint_sketches`), which no number of flagged rounds groups.

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
    return merge_groups(
        [
            pair
            for pair, count in flagged.items()
            if count >= min_fraction * together[pair] and not (cleared and cleared(*pair))
        ]
    )


def disjoint_sketches(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two factories' record sketches show they share no records: both were sent and
    have no hash in common.

    Without DP noise, two honest factories whose data are alike (label-skewed shares holding
    almost only one class) can send updates as close as two copies' (measured on
    ``molding_quality`` at Dirichlet alpha 0.1), and the update test alone would pay them as
    one. Two sketches of ``k`` hashes sharing none mean a Jaccard similarity of their record sets
    near 0: a factory holding another's records as 5% of its own (similarity 0.026) shares a
    hash with it with probability above 99.8% at ``k = 256`` (``1 - (1 - 0.026) ** 256``). A
    copier can still send the sketch of other records; the sketch is a commitment an audit at
    the factory recomputes (:mod:`fl_common.sketch`).
    """
    if a is None or b is None or not len(a) or not len(b):
        return False
    return np.intersect1d(np.asarray(a, np.uint64), np.asarray(b, np.uint64)).size == 0


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


# -- the guards on the product path ------------------------------------------------------------
@dataclass(frozen=True)
class GuardConfig:
    """The ``contribution.guards`` config block: which guards run and at what levels.

    noise_test: withhold pay from a factory whose updates, over its rounds so far, cannot be
        told from pure noise (:func:`noise_test` of each round's ``noise_rule`` score).
    noise_alpha: the probability that a pure-noise sender is paid in a run, in ``(0, 1)``.
    noise_rule: ``gradient`` (default): the update's first-order gain on the validation loss,
        self-normalised (:func:`gradient_statistic`; needs the validation evaluator);
        ``placebo``: its round score against placebo updates of the same norm
        (:func:`placebo_statistic`; needs the validation evaluator);
        ``alignment``: its direction against the others' (:func:`alignment_statistic`; under
        factory DP-SGD it withholds honest factories too).
    noise_placebos: placebo scores each factory's round is compared with (at least 2).
    merge_duplicates: score each detected duplicate group as one player
        (:func:`~strategies.contribution.coalitions.merge_players`).
    duplicate_min_excess, duplicate_alpha: :func:`duplicate_pairs`' thresholds.
    duplicate_min_fraction: :func:`duplicate_groups`' share of rounds a pair must be flagged in.
    record_sketches: also group factories whose reported record sketches
        (:func:`record_fingerprint`) overlap by at least ``sketch_min_similarity``
        (:func:`fingerprint_groups`); needs ``merge_duplicates``.
    sketch_min_similarity: estimated Jaccard similarity of two record sets that makes them a
        group, in ``(0, 1]``.
    disjoint_sketches_clear: a pair whose record sketches were both sent and share no hash
        (:func:`disjoint_sketches`) is not grouped by its updates alone; needs
        ``record_sketches``.
    """

    noise_test: bool = True
    noise_rule: str = "gradient"
    noise_alpha: float = DEFAULT_ALPHA
    noise_placebos: int = DEFAULT_PLACEBOS
    merge_duplicates: bool = True
    duplicate_min_excess: float = 0.05
    duplicate_alpha: float = DEFAULT_ALPHA
    duplicate_min_fraction: float = 0.5
    record_sketches: bool = True
    sketch_min_similarity: float = 0.5
    disjoint_sketches_clear: bool = True

    def __post_init__(self) -> None:
        for name in ("noise_alpha", "duplicate_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError(f"contribution.guards.{name} must be in (0, 1), got {value!r}")
        if self.noise_rule not in NOISE_RULES:
            raise ValueError(
                f"contribution.guards.noise_rule must be one of {', '.join(NOISE_RULES)}, "
                f"got {self.noise_rule!r}"
            )
        value = self.noise_placebos
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(
                f"contribution.guards.noise_placebos must be an integer >= 2, got {value!r}"
            )
        value = self.duplicate_min_fraction
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(
                f"contribution.guards.duplicate_min_fraction must be in (0, 1], got {value!r}"
            )
        value = self.sketch_min_similarity
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(
                f"contribution.guards.sketch_min_similarity must be in (0, 1], got {value!r}"
            )
        value = self.duplicate_min_excess
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(
                f"contribution.guards.duplicate_min_excess must be >= 0, got {value!r}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None) -> GuardConfig:
        """The config block as a :class:`GuardConfig`; missing keys keep their defaults."""
        options = dict(options or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"contribution.guards has no key {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        return cls(**{k: v for k, v in options.items() if v is not None})  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        return self.noise_test or self.merge_duplicates

    @property
    def placebo(self) -> bool:
        """Whether the noise test scores rounds with placebos (the scorer must supply them)."""
        return self.noise_test and self.noise_rule == "placebo"

    @property
    def scored_noise(self) -> bool:
        """Whether the scorer supplies the round's noise scores on the validation set
        (:meth:`ContributionGuard.score_noise`): the placebo and gradient rules."""
        return self.noise_test and self.noise_rule in ("placebo", "gradient")


@dataclass(frozen=True)
class RoundGuard:
    """What the guards found in one round.

    alignment: each scored factory's noise score this round (:func:`placebo_statistic` with
        the placebo rule, else :func:`alignment_statistic`); the noise test's input.
    pairs: this round's flagged :func:`duplicate_pairs`, as factory ids.
    groups: the duplicate groups in force this round (members that took part, two or more
        each): each is scored as one player.
    verdicts: the noise test over every round so far, for every factory seen.
    withheld: the factories whose pay is withheld (their verdict is not ``paid``), sorted.
    record_groups: the groups of this round's factories whose record sketches overlap (each
        within one of ``groups``): why a group was formed, beside ``pairs``.
    cleared: this round's flagged ``pairs`` that were not grouped because their record
        sketches share no hash (:attr:`GuardConfig.disjoint_sketches_clear`).
    """

    alignment: dict[str, float]
    pairs: tuple[tuple[str, str], ...]
    groups: tuple[tuple[str, ...], ...]
    verdicts: dict[str, NoiseVerdict]
    withheld: tuple[str, ...]
    record_groups: tuple[tuple[str, ...], ...] = ()
    cleared: tuple[tuple[str, str], ...] = ()


def _taking_part(
    groups: Sequence[frozenset[str]], ids: Sequence[str]
) -> tuple[tuple[str, ...], ...]:
    """Each group's members among ``ids`` (sorted), where two or more of them take part."""
    present = set(ids)
    kept = (tuple(sorted(group & present)) for group in groups)
    return tuple(members for members in kept if len(members) > 1)


class ContributionGuard:
    """The guards' state over one run: every round's alignment and flagged pairs.

    :meth:`observe` takes a round's accepted updates before they are scored and says which
    factories form duplicate groups (to be scored as one player) and whose pay is withheld. The
    state is plain data: :meth:`restore` rebuilds it from the per-round records a resumed run
    kept (each with ``alignment`` and ``duplicate_pairs``), so a restarted server decides as
    the live one would.
    """

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config or GuardConfig()
        self._z: dict[str, list[float]] = {}
        self._rounds: list[tuple[list[str], list[tuple[int, int]]]] = []
        #: Groups known from elsewhere (e.g. :func:`fingerprint_groups` of sketches the
        #: factories had to report), scored as one player like detected ones.
        self.known_groups: list[frozenset[str]] = []
        #: The latest record sketch each factory reported (:meth:`observe_sketches`).
        self.sketches: dict[str, np.ndarray] = {}
        self._record_groups: list[frozenset[str]] = []

    def observe_sketches(self, sketches: Mapping[str, np.ndarray]) -> list[frozenset[str]]:
        """Keep each factory's latest record sketch and regroup the factories by them.

        A factory's newest sketch replaces its older one (its data may have changed), and one
        that has not reported keeps its last. Returns the groups of overlapping record sets
        (:func:`fingerprint_groups` at ``sketch_min_similarity``), which :meth:`observe`
        then scores as one player; none when ``record_sketches`` or ``merge_duplicates`` is off.
        """
        cfg = self.config
        self.sketches.update({str(f): np.asarray(v, np.uint64) for f, v in sketches.items()})
        if cfg.record_sketches and cfg.merge_duplicates and len(self.sketches) > 1:
            self._record_groups = fingerprint_groups(self.sketches, cfg.sketch_min_similarity)
        else:
            self._record_groups = []
        return list(self._record_groups)

    def _add(self, ids: Sequence[str], z: Mapping[str, float], pairs: Sequence[tuple[str, str]]):
        for fid in ids:
            if fid in z:
                self._z.setdefault(fid, []).append(float(z[fid]))
        index = {fid: i for i, fid in enumerate(ids)}
        self._rounds.append((list(ids), [(index[a], index[b]) for a, b in pairs]))

    def observe(
        self, factory_ids: Sequence[str], deltas: np.ndarray, weights: Sequence[float]
    ) -> RoundGuard:
        """Record one round's updates (``deltas``: :func:`flat_deltas`) and decide on them.

        With the placebo or gradient rule (:attr:`GuardConfig.scored_noise`) the round's noise
        scores are not known yet (they need the duplicate groups found here): the returned
        verdicts cover the rounds before, and :meth:`score_noise` completes the round.
        """
        ids = list(factory_ids)
        cfg = self.config
        pairs: list[tuple[str, str]] = []
        if cfg.merge_duplicates and len(ids):
            found = duplicate_pairs(
                deltas, min_excess=cfg.duplicate_min_excess, alpha=cfg.duplicate_alpha
            )
            pairs = [(ids[i], ids[j]) for i, j in found]
        alignment: dict[str, float] = {}
        if not cfg.scored_noise:
            z = alignment_statistic(deltas, weights) if len(ids) else np.zeros(0)
            alignment = {fid: float(v) for fid, v in zip(ids, z, strict=True)}
        self._add(ids, alignment, pairs)
        return self._decide(ids, alignment, pairs)

    def score_noise(self, found: RoundGuard, scores: Mapping[str, float]) -> RoundGuard:
        """Complete the round :meth:`observe` returned with its noise ``scores`` (``{id: z}``
        of :func:`placebo_statistic` or :func:`gradient_statistic`) and decide again."""
        alignment = {fid: float(v) for fid, v in sorted(scores.items())}
        for fid, v in alignment.items():
            self._z.setdefault(fid, []).append(v)
        decided = self._decide(list(alignment), alignment, list(found.pairs))
        return replace(
            decided, groups=found.groups, record_groups=found.record_groups, cleared=found.cleared
        )

    def _cleared(self, a: str, b: str) -> bool:
        """Whether the pair's record sketches show they share no records (and that counts)."""
        cfg = self.config
        if not (cfg.record_sketches and cfg.disjoint_sketches_clear):
            return False
        return disjoint_sketches(self.sketches.get(a), self.sketches.get(b))

    def _decide(
        self, ids: Sequence[str], alignment: dict[str, float], pairs: list[tuple[str, str]]
    ) -> RoundGuard:
        cfg = self.config
        groups: tuple[tuple[str, ...], ...] = ()
        by_records: tuple[tuple[str, ...], ...] = ()
        cleared: tuple[tuple[str, str], ...] = ()
        if cfg.merge_duplicates:
            detected = duplicate_groups(self._rounds, cfg.duplicate_min_fraction, self._cleared)
            cleared = tuple(p for p in pairs if self._cleared(*p))
            known = list(self.known_groups) + list(self._record_groups)
            groups = _taking_part(merge_groups([], detected + known), ids)
            by_records = _taking_part(self._record_groups, ids)
        verdicts = noise_test(self._z, cfg.noise_alpha, subgaussian=cfg.noise_rule == "gradient")
        withheld = (
            tuple(sorted(f for f, v in verdicts.items() if not v.paid)) if cfg.noise_test else ()
        )
        return RoundGuard(
            alignment=alignment,
            pairs=tuple(pairs),
            groups=groups,
            verdicts=verdicts,
            withheld=withheld,
            record_groups=by_records,
            cleared=cleared,
        )

    def restore(self, rounds: Sequence[Mapping[str, object]]) -> None:
        """Rebuild the state from earlier rounds' records (``alignment``: ``{id: z}`` of the
        scored factories, ``duplicate_pairs``: ``[[a, b], ...]``); rounds without them (not
        scored) are skipped."""
        self._z, self._rounds = {}, []
        for record in rounds:
            alignment = record.get("alignment")
            if not isinstance(alignment, Mapping) or not alignment:
                continue
            pairs = [(str(a), str(b)) for a, b in record.get("duplicate_pairs") or []]  # type: ignore[union-attr]
            self._add(sorted(alignment), {str(k): float(v) for k, v in alignment.items()}, pairs)
