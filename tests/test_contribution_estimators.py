"""Contribution estimators on hand-computed and synthetic cooperative games (no Flower)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
from scipy.stats import spearmanr
from shapley_helpers import Game, brute_force_shapley

from strategies.contribution import (
    METHODS,
    Coalition,
    ContributionResult,
    UtilityCache,
    default_gtg_max_permutations,
    estimate,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
)


class Recorder:
    """A batch utility over ``game`` that records every call it receives."""

    def __init__(self, game: Game) -> None:
        self.game = game
        self.calls: list[list[Coalition]] = []

    def __call__(self, coalitions: Sequence[Coalition]) -> list[float]:
        self.calls.append(list(coalitions))
        return [self.game(c) for c in coalitions]

    @property
    def evaluated(self) -> list[Coalition]:
        return [c for call in self.calls for c in call]


def table_game(table: dict[tuple[int, ...], float]) -> Game:
    return lambda c: table[tuple(sorted(c))]


# v({0})=1, v({1})=2, v({2})=0, v({0,1})=4, v({0,2})=3, v({1,2})=2, v(N)=6.
# phi_0 = 1/3*1 + 1/6*(4-2) + 1/6*(3-0) + 1/3*(6-2) = 2.5
# phi_1 = 1/3*2 + 1/6*(4-1) + 1/6*(2-0) + 1/3*(6-3) = 2.5
# phi_2 = 1/3*0 + 1/6*(3-1) + 1/6*(2-2) + 1/3*(6-4) = 1.0
TABLE = {(0,): 1.0, (1,): 2.0, (2,): 0.0, (0, 1): 4.0, (0, 2): 3.0, (1, 2): 2.0, (0, 1, 2): 6.0}


def glove(c: Coalition) -> float:
    """Player 0 holds a left glove, players 1 and 2 a right one; a pair is worth 1."""
    return 1.0 if 0 in c and (1 in c or 2 in c) else 0.0


def additive(weights: Sequence[float]) -> Game:
    return lambda c: float(sum(weights[i] for i in c))


def power_game(n: int, exponent: float, seed: int) -> tuple[Game, np.ndarray]:
    """U(S) = (sum of weights)^p: supermodular for p > 1, submodular for p < 1."""
    weights = np.random.default_rng(seed).uniform(0.1, 1.0, n)
    return (lambda c: float(weights[list(c)].sum()) ** exponent), weights


def dominated_game(c: Coalition) -> float:
    """Two factories whose update alone nearly saturates the round's gain; six marginal ones."""
    quality = [6.0, 5.0, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01]
    return 0.3 * (1.0 - math.exp(-sum(quality[i] for i in c)))


# --- UtilityCache ----------------------------------------------------------------------------


def test_cache_never_evaluates_the_empty_coalition_and_deduplicates() -> None:
    recorder = Recorder(lambda c: float(len(c)))
    cache = UtilityCache(recorder)
    a, b = frozenset({0}), frozenset({0, 1})
    values = cache.get_many([frozenset(), a, b, a, frozenset(), b])
    assert values == [0.0, 1.0, 2.0, 1.0, 0.0, 2.0]
    assert recorder.calls == [[a, b]]
    assert cache.evaluations == 2
    assert cache.get(frozenset()) == 0.0
    assert cache.get_many([b, {1, 0}]) == [2.0, 2.0]  # cached, plain sets accepted
    assert cache.get_many([frozenset()]) == [0.0]
    assert len(recorder.calls) == 1 and cache.calls == 1
    assert cache.get_many([a, frozenset({2})]) == [1.0, 1.0]
    assert recorder.calls[-1] == [frozenset({2})]  # only the missing one
    assert cache.evaluations == 3


def test_cache_splits_batches_at_batch_size() -> None:
    recorder = Recorder(lambda c: float(sum(c)))
    cache = UtilityCache(recorder, batch_size=3)
    coalitions = [frozenset({i}) for i in range(8)]
    assert cache.get_many(coalitions) == [float(i) for i in range(8)]
    assert [len(call) for call in recorder.calls] == [3, 3, 2]
    assert cache.evaluations == 8 and cache.calls == 3


def test_cache_rejects_bad_batch_functions() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        UtilityCache(lambda cs: [0.0] * len(cs), batch_size=0)
    short = UtilityCache(lambda cs: [1.0])
    with pytest.raises(ValueError, match="1 values for 2 coalitions"):
        short.get_many([frozenset({0}), frozenset({1})])
    nan = UtilityCache(lambda cs: [float("nan")] * len(cs))
    with pytest.raises(ValueError, match="not finite"):
        nan.get_many([frozenset({0})])


# --- exact Shapley ---------------------------------------------------------------------------


def test_exact_on_hand_computed_table_game() -> None:
    recorder = Recorder(table_game(TABLE))
    result = exact_shapley(3, recorder)
    np.testing.assert_allclose(result.scores, [2.5, 2.5, 1.0])
    assert result.evaluations == 7
    assert result.grand_utility == 6.0
    assert result.permutations == 0 and not result.truncated
    assert frozenset() not in recorder.evaluated
    assert len(recorder.evaluated) == len(set(recorder.evaluated)) == 7


def test_exact_on_glove_game() -> None:
    result = exact_shapley(3, Recorder(glove))
    np.testing.assert_allclose(result.scores, [2 / 3, 1 / 6, 1 / 6])


def test_exact_on_additive_game_returns_the_weights() -> None:
    weights = [0.3, -0.1, 0.0, 1.2, 0.05]
    result = exact_shapley(5, Recorder(additive(weights)))
    np.testing.assert_allclose(result.scores, weights, atol=1e-12)
    assert result.evaluations == 31


def test_exact_on_pure_complementarity() -> None:
    """U = 1 only when players 0 and 1 are both present; player 2 is null."""
    result = exact_shapley(3, Recorder(lambda c: 1.0 if {0, 1} <= c else 0.0))
    np.testing.assert_allclose(result.scores, [0.5, 0.5, 0.0], atol=1e-12)


def test_exact_symmetry_null_player_and_efficiency() -> None:
    """Players 0 and 1 are interchangeable, player 4 never changes anything."""
    rng = np.random.default_rng(7)
    table = {
        (k, pair): float(rng.normal())
        for k in range(3)
        for pair in [frozenset(), frozenset({2}), frozenset({3}), frozenset({2, 3})]
    }

    def game(c: Coalition) -> float:
        return table[(len(c & {0, 1}), c & {2, 3})] - table[(0, frozenset())]

    result = exact_shapley(5, Recorder(game))
    assert result.scores[0] == pytest.approx(result.scores[1], abs=1e-12)
    assert result.scores[4] == pytest.approx(0.0, abs=1e-12)
    assert abs(result.scores[0]) > 1e-3 and abs(result.scores[2] - result.scores[3]) > 1e-3
    assert result.scores.sum() == pytest.approx(result.grand_utility, abs=1e-12)
    assert result.grand_utility == pytest.approx(game(frozenset(range(5))))


def test_exact_matches_the_permutation_definition_on_a_random_game() -> None:
    rng = np.random.default_rng(3)
    values = {
        frozenset(c): float(rng.normal())
        for k in range(1, 6)
        for c in itertools.combinations(range(5), k)
    }
    values[frozenset()] = 0.0
    result = exact_shapley(5, Recorder(values.__getitem__))
    np.testing.assert_allclose(
        result.scores, brute_force_shapley(5, values.__getitem__), atol=1e-12
    )


def test_exact_small_and_degenerate_player_counts() -> None:
    empty = exact_shapley(0, Recorder(lambda c: 1.0))
    assert empty.scores.shape == (0,) and empty.evaluations == 0
    single = exact_shapley(1, Recorder(lambda c: 0.42))
    np.testing.assert_allclose(single.scores, [0.42])
    assert single.evaluations == 1 and single.grand_utility == 0.42
    with pytest.raises(ValueError, match="non-negative"):
        exact_shapley(-1, Recorder(lambda c: 0.0))


def test_exact_refuses_too_many_players_without_evaluating() -> None:
    recorder = Recorder(lambda c: 1.0)
    with pytest.raises(ValueError, match=r"1,048,575.*gtg"):
        exact_shapley(20, recorder)
    assert recorder.calls == []


def test_exact_respects_batch_size() -> None:
    recorder = Recorder(additive([1.0] * 5))
    result = exact_shapley(5, recorder, batch_size=10)
    assert [len(call) for call in recorder.calls] == [10, 10, 10, 1]
    assert result.evaluations == 31


def test_result_scores_are_read_only_float64() -> None:
    result = ContributionResult(scores=[1, 2], evaluations=3, grand_utility=3.0)  # type: ignore[arg-type]
    assert result.scores.dtype == np.float64 and result.scores.shape == (2,)
    with pytest.raises(ValueError):
        result.scores[0] = 5.0


# --- leave-one-out ---------------------------------------------------------------------------


def test_leave_one_out_on_hand_games() -> None:
    recorder = Recorder(table_game(TABLE))
    result = leave_one_out(3, recorder)
    np.testing.assert_allclose(result.scores, [6 - 2, 6 - 3, 6 - 4])
    assert result.evaluations == 4 and result.grand_utility == 6.0
    assert len(recorder.calls) == 1  # one batch
    # LOO is blind to redundancy: either right glove can replace the other.
    np.testing.assert_allclose(leave_one_out(3, Recorder(glove)).scores, [1.0, 0.0, 0.0])
    single = leave_one_out(1, Recorder(lambda c: 0.7))
    np.testing.assert_allclose(single.scores, [0.7])
    assert single.evaluations == 1
    assert leave_one_out(0, Recorder(lambda c: 1.0)).scores.shape == (0,)


# --- GTG-Shapley -----------------------------------------------------------------------------


def test_gtg_between_round_truncation() -> None:
    recorder = Recorder(lambda c: 0.001 * len(c) / 6)
    result = gtg_shapley(6, recorder)
    assert result.truncated
    np.testing.assert_array_equal(result.scores, np.zeros(6))
    assert result.evaluations == 1 and result.permutations == 0
    assert recorder.calls == [[frozenset(range(6))]]
    assert result.grand_utility == pytest.approx(0.001)
    # |U(N)| counts: a clearly harmful round is attributed, not skipped.
    harmful = gtg_shapley(3, Recorder(lambda c: -0.2 * len(c)))
    assert not harmful.truncated
    np.testing.assert_allclose(harmful.scores, [-0.2] * 3, atol=0.01 * 0.6)


def test_gtg_is_close_to_the_weights_on_an_additive_game() -> None:
    weights = np.random.default_rng(0).uniform(0.1, 1.0, 8)
    result = gtg_shapley(8, Recorder(additive(weights.tolist())))
    np.testing.assert_allclose(result.scores, weights, atol=0.01 * weights.sum())
    assert list(np.argsort(result.scores)) == list(np.argsort(weights))


@pytest.mark.parametrize("exponent", [1.5, 0.6], ids=["supermodular", "submodular"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gtg_approximates_exact_shapley(exponent: float, seed: int) -> None:
    game, _ = power_game(8, exponent, seed)
    exact = exact_shapley(8, Recorder(game))
    approx = gtg_shapley(8, Recorder(game), seed=seed)
    assert spearmanr(exact.scores, approx.scores).statistic > 0.9
    assert np.abs(approx.scores - exact.scores).max() < 0.05 * exact.grand_utility
    assert approx.scores.sum() == pytest.approx(exact.grand_utility, abs=0.01 * exact.grand_utility)
    assert approx.evaluations < exact.evaluations // 2
    assert approx.permutations == default_gtg_max_permutations(8) == 16


def test_gtg_needs_few_evaluations_when_a_few_players_dominate() -> None:
    recorder = Recorder(dominated_game)
    result = gtg_shapley(8, recorder)
    exact = exact_shapley(8, Recorder(dominated_game))
    assert result.evaluations < 64  # exact needs 255
    assert len(set(recorder.evaluated)) == result.evaluations
    assert set(np.argsort(result.scores)[-2:]) == {0, 1}
    assert result.scores.sum() == pytest.approx(
        result.grand_utility, abs=0.01 * result.grand_utility
    )
    assert spearmanr(exact.scores, result.scores).statistic > 0.9


def test_gtg_within_round_truncation_skips_the_rest_of_a_permutation() -> None:
    """Player 0 alone carries the round: after it, nothing is left to attribute."""

    def game(c: Coalition) -> float:
        return 1.0 if 0 in c else 0.0

    truncated = gtg_shapley(6, Recorder(game), max_permutations=12)
    full = gtg_shapley(6, Recorder(game), max_permutations=12, within_tol=0.0)
    np.testing.assert_allclose(truncated.scores, [1, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(full.scores, [1, 0, 0, 0, 0, 0])
    assert truncated.permutations == full.permutations == 12
    assert truncated.evaluations < full.evaluations
    # Only the permutations starting with player 0 (2 of 12) stop at once; the others add up
    # to one coalition containing player 0 each.
    recorder = Recorder(game)
    gtg_shapley(6, recorder, max_permutations=12)
    with_zero = [c for c in set(recorder.evaluated) if 0 in c and len(c) < 6]
    assert len(with_zero) <= 12


def test_gtg_batches_prefixes_in_lockstep_with_guided_first_players() -> None:
    n = 5
    recorder = Recorder(power_game(n, 1.5, 4)[0])
    result = gtg_shapley(n, recorder, max_permutations=2 * n)
    assert recorder.calls[0] == [frozenset(range(n))]  # U(N) first, for truncation
    assert sorted(recorder.calls[1], key=min) == [frozenset({i}) for i in range(n)]
    # Block 1: steps 1..n-1 (step n is U(N), cached); block 2: singletons are cached.
    assert len(recorder.calls) <= 1 + 2 * (n - 1)
    assert len(recorder.evaluated) == len(set(recorder.evaluated)) == result.evaluations
    small = Recorder(power_game(n, 1.5, 4)[0])
    same = gtg_shapley(n, small, max_permutations=2 * n, batch_size=2)
    assert max(len(call) for call in small.calls) <= 2
    np.testing.assert_array_equal(same.scores, result.scores)


def test_gtg_is_deterministic_for_a_seed() -> None:
    game, _ = power_game(8, 1.5, 5)
    first, second = Recorder(game), Recorder(game)
    a = gtg_shapley(8, first, seed=11)
    b = gtg_shapley(8, second, seed=11)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.evaluations == b.evaluations and first.calls == second.calls
    c = gtg_shapley(8, Recorder(game), seed=12)
    assert not np.array_equal(a.scores, c.scores)


def test_gtg_permutation_budget_and_convergence() -> None:
    weights = np.random.default_rng(1).uniform(0.1, 1.0, 8).tolist()
    # Additive marginals do not depend on the order: converged after the second block.
    converged = gtg_shapley(8, Recorder(additive(weights)), max_permutations=800)
    assert converged.permutations == 16
    # A cap below one block is raised to a full block; a partial last block is allowed.
    game = power_game(4, 1.5, 2)[0]
    assert gtg_shapley(4, Recorder(game), max_permutations=3).permutations == 4
    assert gtg_shapley(4, Recorder(game), max_permutations=6, convergence_tol=0.0).permutations == 6
    with pytest.raises(ValueError, match="max_permutations"):
        gtg_shapley(4, Recorder(game), max_permutations=0)


def test_default_permutation_cap_stays_well_below_exact() -> None:
    assert default_gtg_max_permutations(0) == 0
    for n in range(8, 65):
        cap = default_gtg_max_permutations(n)
        assert cap == 2 * n  # two blocks: each player leads twice
        assert 1 + cap * (n - 1) < 2**n // 2  # worst case, no truncation, no cache hits


def test_gtg_degenerate_player_counts() -> None:
    assert gtg_shapley(0, Recorder(lambda c: 1.0)).scores.shape == (0,)
    single = gtg_shapley(1, Recorder(lambda c: 0.3))
    np.testing.assert_allclose(single.scores, [0.3])
    assert single.evaluations == 1


# --- dispatch --------------------------------------------------------------------------------


def test_estimate_dispatches_by_name() -> None:
    assert METHODS == ("exact", "gtg", "loo", "kernel", "linearised")
    game = table_game(TABLE)
    np.testing.assert_allclose(estimate("exact", 3, Recorder(game)).scores, [2.5, 2.5, 1.0])
    np.testing.assert_allclose(estimate("loo", 3, Recorder(game)).scores, [4.0, 3.0, 2.0])
    power = power_game(8, 0.6, 0)[0]
    np.testing.assert_array_equal(
        estimate("gtg", 8, Recorder(power), seed=3).scores,
        gtg_shapley(8, Recorder(power), seed=3).scores,
    )
    with pytest.raises(ValueError, match="max_players=2"):
        estimate("exact", 3, Recorder(game), max_players=2)


def test_estimate_rejects_unknown_methods() -> None:
    with pytest.raises(ValueError, match=r"'banzhaf'.*exact, gtg, loo"):
        estimate("banzhaf", 3, Recorder(glove))


def test_estimate_dispatches_the_sampling_and_linearised_estimators() -> None:
    game = table_game(TABLE)
    kernel = estimate("kernel", 3, Recorder(game), budget=6)
    np.testing.assert_allclose(kernel.scores, [2.5, 2.5, 1.0])
    with pytest.raises(ValueError, match="output_game"):
        estimate("linearised", 3, Recorder(game))
