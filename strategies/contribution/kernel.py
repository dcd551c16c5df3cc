"""KernelSHAP for a round's factories: a least-squares Shapley estimate with exact efficiency.

The Shapley value is the solution of a weighted least-squares problem over all coalitions
(Charnes et al. 1988; Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions",
NeurIPS 2017): with the *Shapley kernel*

    w(S) = (n - 1) / (C(n, |S|) * |S| * (n - |S|)),   0 < |S| < n,

``phi = argmin sum_S w(S) (U(S) - sum_{i in S} phi_i)**2`` subject to ``sum_i phi_i = U(N)``.
:func:`kernel_shapley` solves it over a budget of coalitions instead of all ``2**n - 2``:

* **Complete strata first.** Coalition sizes are taken in pairs ``(s, n - s)`` from the outside
  in (sizes 1 and n-1 carry the most kernel mass). While the budget left covers a pair of strata
  it is enumerated completely and weighted exactly (the SHAP library's ``KernelExplainer`` does
  the same, less greedily).
* **Paired sampling** for the rest (Covert & Lee, "Improving KernelSHAP", AISTATS 2021): a
  coalition is drawn from the remaining kernel mass and evaluated with its complement, which
  cancels the estimator's leading error term.
* **Exact efficiency.** ``U(N)`` is evaluated and the constraint solved in closed form, so the
  scores always sum to the round's utility exactly (GTG's only approximately).

Its cost is its budget: :func:`default_kernel_budget` grows linearly with ``n`` (about ``4n``
coalitions, at most ``max_evaluations``), where exact Shapley grows as ``2**n`` and GTG's cap as
``2n(n-1)``. With ``budget >= 2**n - 2`` every stratum is complete and the result is the exact
Shapley value (tested).
"""

from __future__ import annotations

import math

import numpy as np

from strategies.contribution.estimators import (
    DEFAULT_BATCH_SIZE,
    BatchUtility,
    Coalition,
    ContributionResult,
    UtilityCache,
    _check_n,
    _empty_result,
    _grand,
)

DEFAULT_EVALUATIONS_PER_PLAYER = 4
"""Coalitions evaluated per factory by default (besides the grand coalition)."""

DEFAULT_MAX_EVALUATIONS = 512
"""Default cap on a round's coalition evaluations, whatever the federation's size."""


def default_kernel_budget(
    n: int,
    per_player: int = DEFAULT_EVALUATIONS_PER_PLAYER,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
) -> int:
    """Coalitions (besides ``N``) that :func:`kernel_shapley` evaluates by default for ``n``.

    ``min(per_player * n, max_evaluations, 2**n - 2)``, and at least ``min(2n, 2**n - 2)`` so
    every factory's own value and leave-one-out term can be complete: linear in ``n``, then
    constant.
    """
    _check_n(n)
    if n < 2:
        return 0
    everything = 2**n - 2 if n < 62 else 1 << 62
    return int(min(everything, max(min(per_player * n, max_evaluations), 2 * n)))


def _kernel_mass(n: int) -> np.ndarray:
    """Total Shapley-kernel weight of each coalition size ``s = 0..n`` (0 at 0 and ``n``)."""
    mass = np.zeros(n + 1)
    for s in range(1, n):
        mass[s] = (n - 1) / (s * (n - s))
    return mass


def _coalition_of_size(rng: np.random.Generator, n: int, size: int) -> Coalition:
    return frozenset(rng.choice(n, size=size, replace=False).tolist())


def _enumerate(n: int, size: int) -> list[Coalition]:
    from itertools import combinations

    return [frozenset(c) for c in combinations(range(n), size)]


def kernel_shapley(
    n: int,
    utility: BatchUtility,
    *,
    budget: int | None = None,
    seed: int = 0,
    per_player: int = DEFAULT_EVALUATIONS_PER_PLAYER,
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ContributionResult:
    """KernelSHAP estimate of every player's Shapley value (see the module docstring).

    Args:
        n: number of players.
        utility: batch utility over coalitions (``U(empty) = 0`` is never requested).
        budget: coalitions to evaluate besides the grand coalition; ``None`` means
            :func:`default_kernel_budget` of ``n``, ``per_player`` and ``max_evaluations``.
        seed: seeds the sampled coalitions (the result is deterministic for a seed).

    Returns:
        Scores that sum to ``U(N)`` exactly; ``evaluations`` counts the distinct coalitions
        evaluated (sampled duplicates are evaluated once and weighted by their count).
    """
    _check_n(n)
    if n == 0:
        return _empty_result()
    if budget is None:
        budget = default_kernel_budget(n, per_player, max_evaluations)
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    cache = UtilityCache(utility, batch_size=batch_size)
    grand = _grand(n)
    grand_utility = cache.get(grand)
    if n == 1:
        return ContributionResult(
            scores=np.array([grand_utility]), evaluations=1, grand_utility=grand_utility
        )

    mass = _kernel_mass(n)
    weights: dict[Coalition, float] = {}
    left = budget
    remaining_mass = float(mass.sum())
    sizes = list(range(1, n // 2 + 1))
    sampled_sizes: list[int] = []
    for pos, s in enumerate(sizes):
        paired = s != n - s
        count = math.comb(n, s) * (2 if paired else 1)
        pair_mass = mass[s] + (mass[n - s] if paired else 0.0)
        # Complete this pair of strata if the budget left covers it (outside in: sizes 1 and
        # n-1, a factory's own value and its leave-one-out term, carry the most kernel mass).
        if count <= left:
            for size in {s, n - s}:
                per = mass[size] / math.comb(n, size)
                for c in _enumerate(n, size):
                    weights[c] = weights.get(c, 0.0) + per
            left -= count
            remaining_mass -= pair_mass
        else:
            sampled_sizes = sizes[pos:]
            break

    if sampled_sizes and left >= 2:
        rng = np.random.default_rng(seed)
        size_p = np.array([mass[s] + (mass[n - s] if s != n - s else 0.0) for s in sampled_sizes])
        size_p = size_p / size_p.sum()
        draws: dict[Coalition, int] = {}
        pairs = 0
        # Draw paired coalitions until the budget of distinct coalitions is used up (with a
        # bound on draws, since a small stratum can be exhausted before the budget is).
        limit = 20 * left + 100
        while len(draws) < left - 1 and pairs < limit:
            s = int(sampled_sizes[rng.choice(len(sampled_sizes), p=size_p)])
            c = _coalition_of_size(rng, n, s)
            for member in (c, grand - c):
                draws[member] = draws.get(member, 0) + 1
            pairs += 1
        per_draw = remaining_mass / (2 * pairs)
        for c, k in draws.items():
            weights[c] = weights.get(c, 0.0) + k * per_draw

    coalitions = list(weights)
    values = np.asarray(cache.get_many(coalitions), dtype=np.float64)
    z = np.zeros((len(coalitions), n))
    for row, c in enumerate(coalitions):
        z[row, sorted(c)] = 1.0
    w = np.array([weights[c] for c in coalitions])
    scores = _constrained_least_squares(z, values, w, grand_utility)
    return ContributionResult(
        scores=scores, evaluations=cache.evaluations, grand_utility=grand_utility
    )


def _constrained_least_squares(
    z: np.ndarray, values: np.ndarray, w: np.ndarray, total: float
) -> np.ndarray:
    """``argmin sum_k w_k (v_k - z_k . phi)**2`` subject to ``sum(phi) = total``.

    Solved through the KKT system, which stays well-posed when the sampled coalitions leave
    some directions undetermined (then the minimum-norm solution is taken by ``lstsq``).
    """
    n = z.shape[1]
    a = (z * w[:, None]).T @ z if z.size else np.zeros((n, n))
    b = (z * w[:, None]).T @ values if z.size else np.zeros(n)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n] = a
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    rhs = np.concatenate([b, [total]])
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return solution[:n]
