"""The output-linearised Shapley estimator: exact for networks linear in their parameters, and
two-sided: exact for one factory and for all of them on any network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import FedMedian
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from standard_models.registry import get_task
from strategies.contribution import estimate, exact_shapley
from strategies.contribution.coalitions import StrategyAggregator, WeightedMeanAggregator
from strategies.contribution.linearised import linearised_shapley, sampled_permutation_shapley
from strategies.contribution.utility import (
    BatchedEvaluator,
    CoalitionUtility,
    OutputMixtureGame,
    far_outputs,
)


def _validation(seed=0, rows=400):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 11, generator=gen)
    y = ((x[:, 0] + 0.5 * x[:, 1] + 0.8 * torch.randn(rows, generator=gen)) > 0.8).long()
    return TensorDataset(x, y)


def _linear_round(n, seed=0):
    """A round of a network linear in its parameters (logistic regression) on molding's metric."""
    task = get_task("molding_quality")  # metric: average precision of the defect class
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(11, 1), nn.Flatten(0))
    rng = np.random.default_rng(seed)
    names = [name for name, _ in model.named_parameters()]
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    truth = np.zeros(11, np.float32)
    truth[0], truth[1] = 1.0, 0.5
    updates = []
    for i in range(n):
        quality = i / max(n - 1, 1)  # later factories carry more signal and less noise
        w = quality * truth + rng.normal(scale=1.0 - 0.8 * quality, size=11).astype(np.float32)
        updates.append({names[0]: w[None, :], names[1]: np.zeros(1, np.float32)})
    evaluator = BatchedEvaluator(task, model, _validation(seed))
    weights = rng.integers(50, 300, n).astype(float)
    aggregator = WeightedMeanAggregator(updates, weights)
    baseline = evaluator.scores([base])[0]
    return CoalitionUtility(aggregator, evaluator.scores, baseline, evaluator.sign, evaluator)


def _mlp_round(n, seed=0):
    """A round of molding's real network (ReLU layers: not linear in its parameters), factories
    of unequal quality and size updating the same global model."""
    task = get_task("molding_quality")
    torch.manual_seed(seed)
    model = task.build_model()
    base = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    updates = []
    for i in range(n):
        signal, noise = 0.3 * (i + 1) / n, 0.3 * (1 - i / n)
        updates.append(
            {
                k: v + signal * direction[k] + noise * rng.normal(size=v.shape).astype(np.float32)
                for k, v in base.items()
            }
        )
    evaluator = BatchedEvaluator(task, model, _validation(seed))
    weights = rng.integers(50, 300, n).astype(float)
    baseline = evaluator.scores([base])[0]
    aggregator = WeightedMeanAggregator(updates, weights)
    return CoalitionUtility(aggregator, evaluator.scores, baseline, evaluator.sign, evaluator)


@pytest.mark.parametrize("surrogate, models", [("two_sided", 2), ("members", 1)])
@pytest.mark.parametrize("n", [3, 5, 7])
def test_exact_on_a_network_linear_in_its_parameters(n, surrogate, models):
    utility = _linear_round(n, seed=n)
    exact = exact_shapley(n, utility).scores
    again = _linear_round(n, seed=n)
    result = linearised_shapley(n, again, surrogate=surrogate)
    np.testing.assert_allclose(result.scores, exact, atol=1e-5)
    # each factory's own model, with two_sided each leave-one-out model, and the full round
    assert result.evaluations == models * n + 1 == again.models
    assert result.scores.sum() == pytest.approx(result.grand_utility, abs=1e-9)


@pytest.mark.parametrize("surrogate, models", [("two_sided", 2), ("members", 1)])
def test_sampled_above_the_budget_and_efficient(surrogate, models):
    n = 12
    exact = exact_shapley(n, _linear_round(n, seed=3)).scores
    result = linearised_shapley(
        n, _linear_round(n, seed=3), surrogate_evaluations=600, seed=1, surrogate=surrogate
    )
    assert result.permutations == 50
    assert result.evaluations == models * n + 1
    assert result.scores.sum() == pytest.approx(result.grand_utility, abs=1e-9)
    assert spearmanr(exact, result.scores).statistic > 0.9
    again = linearised_shapley(
        n, _linear_round(n, seed=3), surrogate_evaluations=600, seed=1, surrogate=surrogate
    )
    np.testing.assert_array_equal(result.scores, again.scores)


def test_far_outputs_average_to_the_full_round_and_are_the_members_for_a_linear_network():
    gen = torch.Generator().manual_seed(0)
    n, weights = 4, [1.0, 2.0, 3.0, 6.0]
    members = torch.randn(n, 5, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    grand = torch.tensordot(w / w.sum(), members, dims=1)
    loo = torch.stack(
        [
            torch.tensordot(w[keep] / w[keep].sum(), members[keep], dims=1)
            for keep in ([j for j in range(n) if j != i] for i in range(n))
        ]
    )
    torch.testing.assert_close(far_outputs(grand, loo, weights), members)
    # A network that is not linear: the far outputs still average to the full round's.
    bent, bent_loo = torch.tanh(grand), torch.tanh(loo)
    far = far_outputs(bent, bent_loo, weights)
    torch.testing.assert_close(torch.tensordot(w / w.sum(), far, dims=1), bent)
    with pytest.raises(ValueError, match="one leave-one-out output set per weight"):
        far_outputs(grand, loo[:3], weights)


def test_two_sided_game_is_exact_for_one_factory_and_for_all_on_a_real_network():
    n = 6
    real = _mlp_round(n, seed=1)
    game = _mlp_round(n, seed=1).output_game(two_sided=True)
    assert game.two_sided
    everyone = frozenset(range(n))
    ends = [frozenset([i]) for i in range(n)] + [everyone]
    np.testing.assert_allclose(game(ends), real(ends), atol=1e-6)
    # Between the ends it is a surrogate: not the real utility, and not the one-sided game's.
    middle = [frozenset({0, 1, 2}), frozenset({2, 3, 4, 5})]
    one_sided = _mlp_round(n, seed=1).output_game()
    assert not np.allclose(game(middle), real(middle), atol=1e-4)
    assert not np.allclose(game(middle), one_sided(middle), atol=1e-4)
    # Running prefix sums give the same utilities as mixing each prefix on its own.
    order = [3, 0, 5, 1, 4, 2]
    prefixes = [frozenset(order[: k + 1]) for k in range(n)]
    np.testing.assert_allclose(game.prefix_values(order), game(prefixes), atol=1e-6)


def test_two_sided_runs_the_full_round_once_and_shares_the_members_outputs():
    n = 5
    utility = _mlp_round(n, seed=2)
    members = utility.output_game()
    assert utility.models == n
    two = utility.output_game(two_sided=True)
    assert utility.models == 2 * n + 1  # the full round and the leave-one-out models
    assert torch.equal(two.outputs, members.outputs) and utility.output_game() is members
    grand = utility([frozenset(range(n))])[0]
    assert utility.models == 2 * n + 1  # the full round's utility is kept, not run again
    assert grand == pytest.approx(_mlp_round(n, seed=2)([frozenset(range(n))])[0])


def test_two_sided_is_closer_to_exact_shapley_on_a_real_network():
    """On molding's ReLU network the two-sided game's Shapley values are nearer exact Shapley
    than the one-sided game's, over several rounds."""
    n, errors = 6, {"two_sided": 0.0, "members": 0.0}
    for seed in range(4):
        exact = np.array(exact_shapley(n, _mlp_round(n, seed=seed)).scores)
        for surrogate in errors:
            result = linearised_shapley(n, _mlp_round(n, seed=seed), surrogate=surrogate)
            errors[surrogate] += float(np.abs(result.scores - exact).sum())
    assert errors["two_sided"] < 0.8 * errors["members"], errors


def test_output_game_mixes_member_outputs_by_weight():
    outputs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    seen = []

    def metric(out):
        seen.append(out.clone())
        return float(out.sum())

    game = OutputMixtureGame(outputs, [1.0, 3.0, 4.0], metric, baseline=0.5)
    assert game([frozenset({0, 1})]) == pytest.approx([1.0 - 0.5])
    torch.testing.assert_close(seen[-1], torch.tensor([0.25, 0.75]))
    # Prefixes of (2, 0, 1): {2}, {2, 0}, {2, 0, 1} with weights 4, 1, 3.
    values = game.prefix_values([2, 0, 1])
    np.testing.assert_allclose(values, [4.0 - 0.5, 17 / 5 - 0.5, 20 / 8 - 0.5])
    assert game.evaluations == 4
    with pytest.raises(ValueError, match="empty coalition"):
        game([frozenset()])
    with pytest.raises(ValueError, match="one weight per factory"):
        OutputMixtureGame(outputs, [1.0, 2.0], metric, 0.0)


def test_output_game_scores_a_permutation_as_one_batch_with_the_same_numbers():
    """With the task's batch metric, each permutation's prefixes are scored in one call; the
    utilities, the Shapley estimate and the evaluation count are exactly those of one call per
    prefix."""
    task = get_task("tep_fault")
    gen = torch.Generator().manual_seed(2)
    n, rows = 9, 300
    target = torch.randint(0, 22, (rows,), generator=gen)
    reference = torch.randn(rows, 22, generator=gen)
    outputs = reference + 0.5 * torch.randn(n, rows, 22, generator=gen)
    weights = torch.rand(n, generator=gen).add(0.5).tolist()
    calls = []

    def batch_metric(batch):
        calls.append(batch.shape[0])
        return task.main_scores(batch, target)

    def one(out):
        return task.main_score(out, target)

    single = OutputMixtureGame(outputs, weights, one, baseline=0.1)
    batched = OutputMixtureGame(outputs, weights, one, baseline=0.1, metrics=batch_metric)
    order = [4, 0, 8, 1, 7, 2, 6, 3, 5]
    np.testing.assert_array_equal(batched.prefix_values(order), single.prefix_values(order))
    assert calls == [n]
    np.testing.assert_array_equal(
        sampled_permutation_shapley(n, batched.prefix_values, 6, seed=3),
        sampled_permutation_shapley(n, single.prefix_values, 6, seed=3),
    )
    coalitions = [frozenset({0, 3}), frozenset({5}), frozenset(range(n))]
    assert batched(coalitions) == single(coalitions)
    assert batched.evaluations == single.evaluations == n + 6 * n + 3


def test_permutation_sampler_on_an_additive_game_is_exact():
    weights = np.array([1.0, -2.0, 0.5, 3.0])

    def prefix_values(order):
        return np.cumsum(weights[np.asarray(order)])

    np.testing.assert_allclose(sampled_permutation_shapley(4, prefix_values, 3), weights)


def test_refuses_rules_that_are_not_a_weighted_mean():
    utility = _linear_round(3)
    other = CoalitionUtility(
        StrategyAggregator(FedMedian(), 1, [], {}), utility.score, 0.0, 1.0, utility.evaluator
    )
    with pytest.raises(ValueError, match="weighted-mean"):
        linearised_shapley(3, other)
    with pytest.raises(ValueError, match="output_game"):
        estimate("linearised", 2, lambda cs: [1.0 for _ in cs])
    with pytest.raises(ValueError, match="surrogate_evaluations"):
        linearised_shapley(3, utility, surrogate_evaluations=0)
    with pytest.raises(ValueError, match="surrogate must be one of two_sided, members"):
        linearised_shapley(3, utility, surrogate="both")
