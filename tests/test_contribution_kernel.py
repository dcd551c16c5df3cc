"""KernelSHAP on hand-computed and synthetic games: exactness, efficiency, symmetry, budget."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr
from shapley_helpers import brute_force_shapley

from strategies.contribution import estimate, exact_shapley
from strategies.contribution.estimators import METHODS, Coalition
from strategies.contribution.kernel import default_kernel_budget, kernel_shapley

TABLE = {(0,): 1.0, (1,): 2.0, (2,): 0.0, (0, 1): 4.0, (0, 2): 3.0, (1, 2): 2.0, (0, 1, 2): 6.0}


def batch(game):
    calls: list[list[Coalition]] = []

    def utility(coalitions):
        calls.append(list(coalitions))
        return [game(c) for c in coalitions]

    utility.calls = calls  # type: ignore[attr-defined]
    return utility


def fedavg_like_game(n: int, seed: int):
    """A saturating game like a round's: value of the size-weighted mean of noisy updates."""
    rng = np.random.default_rng(seed)
    signal = rng.uniform(-0.2, 1.0, n)
    size = rng.integers(50, 500, n).astype(float)
    noise = rng.normal(size=(n, 6))

    def game(c: Coalition) -> float:
        idx = sorted(c)
        w = size[idx] / size[idx].sum()
        mean_signal = float(w @ signal[idx])
        spread = float(np.linalg.norm(w @ noise[idx]))
        return math.tanh(mean_signal) - 0.1 * spread

    return game


def test_hand_computed_game_is_exact_with_full_budget():
    result = kernel_shapley(3, batch(lambda c: TABLE[tuple(sorted(c))]), budget=6)
    assert result.scores == pytest.approx([2.5, 2.5, 1.0])
    assert result.evaluations == 7


@pytest.mark.parametrize("n", [4, 5, 6])
def test_full_budget_matches_exact_on_random_games(n):
    game = fedavg_like_game(n, n)
    exact = exact_shapley(n, batch(game)).scores
    kernel = kernel_shapley(n, batch(game), budget=2**n - 2).scores
    np.testing.assert_allclose(kernel, exact, atol=1e-10)


def test_efficiency_is_exact_with_any_budget():
    game = fedavg_like_game(9, 1)
    for budget in (18, 25, 40):
        result = kernel_shapley(9, batch(game), budget=budget, seed=3)
        assert result.scores.sum() == pytest.approx(result.grand_utility, abs=1e-12)
        assert result.evaluations <= budget + 1


def test_symmetric_players_and_null_player():
    # Players 0 and 1 are interchangeable, player 2 adds nothing, the game is not additive.
    def game(c):
        return float(min(len(c & {0, 1}), 1)) + 0.5 * (3 in c)

    result = kernel_shapley(4, batch(game), budget=14)
    assert result.scores[0] == pytest.approx(result.scores[1])
    assert result.scores[2] == pytest.approx(0.0, abs=1e-12)
    assert result.scores == pytest.approx([0.5, 0.5, 0.0, 0.5])


def test_additive_game_is_recovered_from_singletons_and_complements():
    weights = np.array([3.0, -1.0, 0.5, 2.0, 0.0, 1.5, 4.0, -2.0, 1.0, 0.25])
    result = kernel_shapley(10, batch(lambda c: float(weights[sorted(c)].sum())), budget=20)
    np.testing.assert_allclose(result.scores, weights, atol=1e-10)


def test_close_to_exact_at_a_linear_budget():
    # A sampling estimator: on these saturating games 4 coalitions per player give a mean rank
    # agreement of about 0.87 (the output-linearised estimator does better on real rounds).
    rhos = []
    for seed in range(5):
        game = fedavg_like_game(10, 100 + seed)
        exact = exact_shapley(10, batch(game)).scores
        kernel = kernel_shapley(10, batch(game), seed=seed).scores
        rhos.append(spearmanr(exact, kernel).statistic)
    assert np.mean(rhos) > 0.8


def test_budget_grows_linearly_then_stops():
    assert default_kernel_budget(1) == 0
    assert default_kernel_budget(3) == 6  # every coalition but N: 2**3 - 2
    assert default_kernel_budget(8) == 32
    assert default_kernel_budget(32) == 128
    assert default_kernel_budget(100) == 400
    assert default_kernel_budget(1000) == 2000  # the cap, raised to 2n: singletons + LOO


def test_sampled_part_is_deterministic_per_seed_and_batched():
    game = fedavg_like_game(12, 7)
    first = batch(game)
    a = kernel_shapley(12, first, seed=5, batch_size=1000)
    b = kernel_shapley(12, batch(game), seed=5, batch_size=1000)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert len(first.calls) == 2  # the grand coalition, then every other coalition at once
    assert a.evaluations == default_kernel_budget(12) + 1


def test_through_estimate_and_small_cases():
    assert "kernel" in METHODS
    result = estimate("kernel", 3, batch(lambda c: TABLE[tuple(sorted(c))]))
    assert result.scores == pytest.approx([2.5, 2.5, 1.0])
    assert kernel_shapley(0, batch(lambda c: 1.0)).scores.size == 0
    single = kernel_shapley(1, batch(lambda c: 0.7))
    assert single.scores == pytest.approx([0.7])
    with pytest.raises(ValueError, match="budget"):
        kernel_shapley(3, batch(lambda c: 1.0), budget=-1)


def test_matches_brute_force_permutations_on_a_small_game():
    game = fedavg_like_game(5, 11)
    kernel = kernel_shapley(5, batch(game), budget=30).scores
    np.testing.assert_allclose(kernel, brute_force_shapley(5, game), atol=1e-10)
