"""How much each accepted factory update contributed to one federated round.

Players ``0..n-1`` are the round's accepted updates. The utility ``U(S)`` of a coalition ``S``
is the improvement of the validation metric of the model aggregated from ``S``'s updates over
the previous global model, so ``U(frozenset()) == 0`` by definition and is never evaluated.

Evaluating ``U`` means aggregating and evaluating a model, by far the dominant cost, so:

* utilities are requested in *batches* (a :data:`BatchUtility` takes several coalitions at
  once, letting the caller aggregate/evaluate them together, e.g. on one device), and
* every estimator goes through a :class:`UtilityCache` so that no coalition is evaluated twice
  within a round; ``ContributionResult.evaluations`` is the number of distinct non-empty
  coalitions evaluated, the honest measure of an estimator's cost.

Estimators:

* :func:`exact_shapley`: the Shapley value from all ``2**n - 1`` coalitions (small ``n`` only).
* :func:`leave_one_out`: ``U(N) - U(N \\ {i})``, ``n + 1`` evaluations, ignores redundancy.
* :func:`gtg_shapley`: GTG-Shapley (Liu et al., "GTG-Shapley: Efficient and Accurate
  Participant Contribution Evaluation in Federated Learning", ACM TIST 13(4), 2022), a
  truncated, guided Monte Carlo approximation of the Shapley value.

Everything here is pure (numpy only, no Flower) and deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Coalition = frozenset[int]
"""A set of player indices; the empty coalition has utility 0."""

BatchUtility = Callable[[Sequence[Coalition]], Sequence[float]]
"""Utilities of several (non-empty, distinct) coalitions, in the order they were given."""

DEFAULT_BATCH_SIZE = 64
"""Coalitions per call to the batch function: bounds the models aggregated at once."""

METHODS: tuple[str, ...] = ("exact", "gtg", "loo", "kernel", "linearised")
"""Method names understood by :func:`estimate`."""

_TINY = 1e-12
"""Floor for scales that would otherwise divide by (or compare against) zero."""


class UtilityCache:
    """Utilities of coalitions within one round, each evaluated at most once.

    ``U(frozenset())`` is ``0.0`` without calling the batch function. :meth:`get_many` sends
    only the coalitions not seen before, deduplicated and in order of first appearance, to the
    batch function in one call, split into chunks of at most ``batch_size`` coalitions so a
    caller never has to aggregate more models at once than it can hold.

    ``evaluations`` counts the distinct non-empty coalitions evaluated; ``calls`` the calls to
    the batch function. A batch function that returns the wrong number of values or a
    non-finite value raises :class:`ValueError`: a NaN utility would silently poison every
    score computed from it.
    """

    def __init__(self, utility: BatchUtility, *, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._utility = utility
        self._batch_size = int(batch_size)
        self._values: dict[Coalition, float] = {}
        self._calls = 0

    @property
    def evaluations(self) -> int:
        """Distinct non-empty coalitions evaluated so far."""
        return len(self._values)

    @property
    def calls(self) -> int:
        """Calls made to the batch function so far."""
        return self._calls

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def __contains__(self, coalition: object) -> bool:
        if not isinstance(coalition, frozenset):
            return False
        return not coalition or coalition in self._values

    def get(self, coalition: Iterable[int]) -> float:
        """Utility of one coalition (evaluated if not cached)."""
        return self.get_many([frozenset(coalition)])[0]

    def get_many(self, coalitions: Iterable[Iterable[int]]) -> list[float]:
        """Utilities of ``coalitions`` in order, evaluating only the missing ones in one batch."""
        wanted = [c if isinstance(c, frozenset) else frozenset(c) for c in coalitions]
        missing = list(dict.fromkeys(c for c in wanted if c and c not in self._values))
        for start in range(0, len(missing), self._batch_size):
            chunk = missing[start : start + self._batch_size]
            values = list(self._utility(chunk))
            self._calls += 1
            if len(values) != len(chunk):
                raise ValueError(
                    f"utility returned {len(values)} values for {len(chunk)} coalitions"
                )
            for coalition, value in zip(chunk, values, strict=True):
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(
                        f"utility of coalition {sorted(coalition)} is not finite: {value}"
                    )
                self._values[coalition] = value
        return [self._values[c] if c else 0.0 for c in wanted]


@dataclass(frozen=True)
class ContributionResult:
    """Per-player contribution scores of one round and what computing them cost.

    scores: shape ``(n,)``, float64 (read-only), ``scores[i]`` is player ``i``'s contribution.
    evaluations: distinct non-empty coalitions evaluated (aggregate + evaluate a model each).
    grand_utility: ``U(all players)``.
    permutations: Monte Carlo permutations sampled (GTG), 0 for the other methods.
    truncated: True when GTG's between-round truncation skipped the round (all scores 0).
    """

    scores: np.ndarray
    evaluations: int
    grand_utility: float
    permutations: int = 0
    truncated: bool = False

    def __post_init__(self) -> None:
        scores = np.array(self.scores, dtype=np.float64).reshape(-1)
        scores.setflags(write=False)
        object.__setattr__(self, "scores", scores)


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"number of players must be non-negative, got {n}")


def _grand(n: int) -> Coalition:
    return frozenset(range(n))


def _empty_result() -> ContributionResult:
    return ContributionResult(scores=np.zeros(0), evaluations=0, grand_utility=0.0)


def exact_shapley(
    n: int,
    utility: BatchUtility,
    *,
    max_players: int = 16,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ContributionResult:
    """The exact Shapley value of every player from all ``2**n - 1`` non-empty coalitions.

    ``phi_i = sum_{S ⊆ N \\ {i}} |S|! (n - |S| - 1)! / n! * (U(S ∪ {i}) - U(S))``.

    Coalitions are indexed by bitmask (bit ``i`` set <=> player ``i`` in the coalition) into a
    numpy array, so the sum is vectorized over all ``2**(n-1)`` coalitions per player. The cost
    doubles with every player, hence ``max_players``: beyond it this raises ``ValueError``
    rather than silently launching an unaffordable number of model evaluations; use
    :func:`gtg_shapley` there.
    """
    _check_n(n)
    if n > max_players:
        raise ValueError(
            f"exact Shapley over {n} players needs 2**{n} - 1 = {2**n - 1:,} coalition "
            f"evaluations, more than max_players={max_players} allows "
            f"({2**max_players - 1:,}); use method 'gtg' (GTG-Shapley) to approximate it"
        )
    if n == 0:
        return _empty_result()
    cache = UtilityCache(utility, batch_size=batch_size)
    size = 1 << n
    masks = np.arange(size, dtype=np.int64)
    members = ((masks[:, None] >> np.arange(n, dtype=np.int64)) & 1).astype(bool)
    coalitions = [frozenset(np.flatnonzero(row).tolist()) for row in members[1:]]
    values = np.zeros(size, dtype=np.float64)
    values[1:] = cache.get_many(coalitions)

    sizes = members.sum(axis=1)
    # |S|! (n - |S| - 1)! / n! == 1 / (n * C(n - 1, |S|)), exact and overflow-free.
    weights = np.array([1.0 / (n * math.comb(n - 1, s)) for s in range(n)], dtype=np.float64)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        without = masks[~members[:, i]]  # every S ⊆ N \ {i}, the empty set included
        marginals = values[without | (1 << i)] - values[without]
        scores[i] = float(np.dot(weights[sizes[without]], marginals))
    return ContributionResult(
        scores=scores, evaluations=cache.evaluations, grand_utility=float(values[size - 1])
    )


def leave_one_out(
    n: int, utility: BatchUtility, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> ContributionResult:
    """``phi_i = U(N) - U(N \\ {i})``: what the round loses without player ``i``.

    Cheap (``n + 1`` evaluations, all in one batch) but blind to redundancy: two factories
    with identical data both score about 0 because each is replaceable by the other.
    """
    _check_n(n)
    if n == 0:
        return _empty_result()
    cache = UtilityCache(utility, batch_size=batch_size)
    grand = _grand(n)
    values = cache.get_many([grand, *(grand - {i} for i in range(n))])
    grand_utility = values[0]
    scores = grand_utility - np.asarray(values[1:], dtype=np.float64)
    return ContributionResult(
        scores=scores, evaluations=cache.evaluations, grand_utility=grand_utility
    )


def default_gtg_max_permutations(n: int) -> int:
    """Default cap on GTG-Shapley's permutations for ``n`` players: two blocks, ``2 * n``.

    Two blocks are the fewest with which the convergence test (which compares consecutive
    blocks) can run, and every player is sampled first twice. A permutation costs at most
    ``n - 1`` new evaluations, so a round costs at most ``2 * n * (n - 1)``: quadratic in the
    federation's size, where exact Shapley is exponential. In the contribution benchmark a
    second block raised the rank agreement with exact Shapley by 0.03 to 0.08 over one block,
    while more blocks than two added evaluations without raising it further, and at 16
    factories ten blocks made scoring slower than the round's training.
    """
    _check_n(n)
    return 2 * n


def gtg_shapley(
    n: int,
    utility: BatchUtility,
    *,
    seed: int = 0,
    within_tol: float = 0.01,
    between_tol: float = 0.005,
    max_permutations: int | None = None,
    convergence_tol: float = 0.05,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> ContributionResult:
    """Approximate Shapley values with GTG-Shapley (Liu et al., ACM TIST 2022).

    GTG-Shapley (Guided Truncation Gradient Shapley) estimates the Shapley value as the mean
    marginal contribution over sampled permutations, and saves model evaluations three ways:

    * **Between-round truncation.** ``U(N)`` is evaluated first; if ``|U(N)| < between_tol``
      the round barely changed the model and is not worth attributing: all scores are 0,
      ``truncated=True``, at a cost of 1 evaluation.
    * **Guided sampling.** Permutation ``k`` starts with player ``k mod n`` and the others
      follow in a random order (a numpy ``Generator`` seeded by ``seed``), so each player's
      marginal contribution alone, ``U({i})``, the most informative one, is sampled within
      the first ``n`` permutations.
    * **Within-round truncation.** Walking a permutation, once
      ``|U(N) - U(prefix)| < within_tol * |U(N)|`` the remaining players' marginals are taken
      as 0 and no more coalitions are evaluated for that permutation. Each permutation's
      marginals therefore sum to within ``within_tol * |U(N)|`` of ``U(N)``, and so do the
      scores (approximate efficiency).

    Permutations are processed in blocks of ``n`` *in lockstep*: at step ``k`` the ``k``-th
    prefix of every still-active permutation of the block is evaluated in one
    :meth:`UtilityCache.get_many` call, so truncation decisions and batching combine and a
    block costs at most ``n - 1`` batch calls (fewer once permutations truncate).

    Convergence (checked after every block from the second on): the relative change of each
    player's running mean since the previous block, ``|m_new - m_old| / max(|m_new|, floor)``
    with ``floor = within_tol * |U(N)|`` (changes below the truncation noise level are not
    progress), *averaged over players* as in the paper's "average percentage change" criterion,
    must drop below ``convergence_tol``. Sampling also stops at ``max_permutations`` (default
    :func:`default_gtg_max_permutations`); at least one full block of ``n`` permutations is
    always sampled, so a smaller ``max_permutations`` is raised to ``n``. The last block may be
    partial when ``max_permutations`` is not a multiple of ``n``.

    Everything is deterministic for a given ``seed``.
    """
    _check_n(n)
    if within_tol < 0 or between_tol < 0 or convergence_tol < 0:
        raise ValueError("within_tol, between_tol and convergence_tol must be non-negative")
    if max_permutations is not None and max_permutations < 1:
        raise ValueError(f"max_permutations must be at least 1, got {max_permutations}")
    if n == 0:
        return _empty_result()

    cache = UtilityCache(utility, batch_size=batch_size)
    grand = _grand(n)
    grand_utility = cache.get(grand)
    if abs(grand_utility) < between_tol:
        return ContributionResult(
            scores=np.zeros(n),
            evaluations=cache.evaluations,
            grand_utility=grand_utility,
            truncated=True,
        )

    cap = default_gtg_max_permutations(n) if max_permutations is None else max_permutations
    cap = max(cap, n)
    threshold = within_tol * max(abs(grand_utility), _TINY)
    floor = max(within_tol * abs(grand_utility), _TINY)
    rng = np.random.default_rng(seed)
    totals = np.zeros(n, dtype=np.float64)
    sampled = 0
    previous_mean: np.ndarray | None = None

    while sampled < cap:
        block = min(n, cap - sampled)
        perms = np.empty((block, n), dtype=np.int64)
        for row in range(block):
            first = (sampled + row) % n
            others = np.array([p for p in range(n) if p != first], dtype=np.int64)
            perms[row, 0] = first
            perms[row, 1:] = rng.permutation(others)

        prefix_values = np.zeros(block, dtype=np.float64)  # U(empty prefix) = 0
        active = np.ones(block, dtype=bool)
        for step in range(1, n + 1):
            active &= np.abs(grand_utility - prefix_values) >= threshold
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            values = np.asarray(
                cache.get_many([frozenset(perms[r, :step].tolist()) for r in rows]),
                dtype=np.float64,
            )
            np.add.at(totals, perms[rows, step - 1], values - prefix_values[rows])
            prefix_values[rows] = values
        sampled += block

        mean = totals / sampled
        if previous_mean is not None:
            change = np.abs(mean - previous_mean) / np.maximum(np.abs(mean), floor)
            if float(change.mean()) < convergence_tol:
                break
        previous_mean = mean

    return ContributionResult(
        scores=totals / sampled,
        evaluations=cache.evaluations,
        grand_utility=grand_utility,
        permutations=sampled,
    )


def _estimators() -> dict[str, Callable[..., ContributionResult]]:
    # These live in their own modules, which build on this one's cache and result type.
    from strategies.contribution.kernel import kernel_shapley
    from strategies.contribution.linearised import linearised_shapley

    return {
        "exact": exact_shapley,
        "gtg": gtg_shapley,
        "loo": leave_one_out,
        "kernel": kernel_shapley,
        "linearised": linearised_shapley,
    }


def estimate(method: str, n: int, utility: BatchUtility, **params: Any) -> ContributionResult:
    """Run the estimator named ``method`` (one of :data:`METHODS`) with its keyword ``params``.

    The single entry point for configuration-driven callers; an unknown method raises
    ``ValueError`` naming it and the choices, an unknown parameter the estimator's TypeError.
    """
    estimator = _estimators().get(method)
    if estimator is None:
        raise ValueError(
            f"unknown contribution method {method!r}; choose one of: {', '.join(METHODS)}"
        )
    return estimator(n, utility, **params)
