"""Coalition models and utilities: the same rule as the strategy, scored in batches."""

import copy
import gc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from torch.utils.data import TensorDataset

from fl_common.protocol import REPLY_RECORD
from fl_server.recorder import contribution_metrics
from standard_models.registry import get_task
from strategies.contribution.coalitions import (
    KrumFamilyAggregator,
    StrategyAggregator,
    WeightedMeanAggregator,
    coalition_aggregator,
    detached,
    merge_players,
    once_per_group,
)
from strategies.contribution.scorer import ContributionScorer, build_scorer
from strategies.contribution.utility import BatchedEvaluator, CoalitionUtility, scoring_subset
from strategies.hooked import FactoryFedStrategy

RNG = np.random.default_rng(7)
SHAPES = {"w": (3, 4), "b": (4,)}


def _state(scale=1.0):
    return {k: (RNG.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _record(state):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})


def _reply(identity, node, state, n, factory_id=None):
    content = RecordDict(
        {
            "arrays": _record(state),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    if factory_id:
        content[REPLY_RECORD] = ConfigRecord(
            {"factory-id": factory_id, "status": "accepted", "reason": ""}
        )
    return identity(node, content)


def _coalitions(n):
    return [frozenset(i for i in range(n) if mask >> i & 1) for mask in range(1, 2**n)]


@pytest.mark.parametrize("strategy_cls", [FedAvg, FedProx])
def test_batched_weighted_mean_matches_flower_on_every_coalition(identity, strategy_cls):
    states = [_state() for _ in range(4)]
    sizes = [10, 250, 33, 7]
    replies = [
        _reply(identity, i + 1, s, n) for i, (s, n) in enumerate(zip(states, sizes, strict=True))
    ]
    strategy = strategy_cls(fraction_evaluate=0.0)
    agg = coalition_aggregator(strategy, 1, replies, states[0])
    assert isinstance(agg, WeightedMeanAggregator)
    coalitions = _coalitions(4)
    ours = agg.aggregate(coalitions)
    for members, got in zip(coalitions, ours, strict=True):
        flower, _ = copy.deepcopy(strategy).aggregate_train(1, [replies[i] for i in members])
        for key, array in flower.items():
            value = array.numpy()
            assert got[key].dtype == value.dtype
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)


def test_weighted_mean_refuses_the_empty_coalition_and_bad_weights():
    agg = WeightedMeanAggregator([_state(), _state()], [1, 2])
    with pytest.raises(ValueError, match="empty coalition"):
        agg.aggregate([frozenset()])
    with pytest.raises(ValueError, match="positive"):
        WeightedMeanAggregator([_state()], [0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: Bulyan(fraction_evaluate=0.0),
        lambda: Bulyan(fraction_evaluate=0.0, num_malicious_nodes=1),
        lambda: Krum(fraction_evaluate=0.0, num_malicious_nodes=2),
        lambda: MultiKrum(fraction_evaluate=0.0, num_malicious_nodes=1, num_nodes_to_select=3),
    ],
    ids=["bulyan-f0", "bulyan-f1", "krum-f2", "multikrum-f1-m3"],
)
def test_krum_family_coalitions_are_flowers_bit_for_bit(identity, make):
    # Eight replies with a duplicate pair and an outlier (ties and far points in the distances),
    # every coalition: the batched models equal Flower's own aggregate_train on each one,
    # including Bulyan's refusals below 4f + 3 replies (the previous model kept).
    states = [_state() for _ in range(6)]
    states += [{k: v.copy() for k, v in states[0].items()}, _state(scale=30.0)]
    sizes = [10, 250, 33, 7, 90, 12, 10, 40]
    pairs = enumerate(zip(states, sizes, strict=True))
    replies = [_reply(identity, i + 1, st, n) for i, (st, n) in pairs]
    previous = _state()
    strategy = make()
    fast = coalition_aggregator(strategy, 1, replies, previous)
    assert isinstance(fast, KrumFamilyAggregator)
    coalitions = _coalitions(len(replies))
    # Flower's Bulyan runs a full garbage collection per reply it converts: keep the test
    # process's objects out of its sight (as the benchmarks do) so that 255 coalitions take
    # seconds, not minutes. Results are unchanged.
    gc.collect()
    gc.freeze()
    try:
        slow = StrategyAggregator(strategy, 1, replies, previous).aggregate(coalitions)
    finally:
        gc.unfreeze()
    for coalition, ours, flowers in zip(coalitions, fast.aggregate(coalitions), slow, strict=True):
        assert ours.keys() == flowers.keys()
        for key in ours:
            assert ours[key].dtype == flowers[key].dtype
            assert np.array_equal(ours[key], flowers[key]), (sorted(coalition), key)
    # The grand coalition's model is what the real round produces.
    real, _ = strategy.aggregate_train(1, detached(replies))
    grand = fast.aggregate([frozenset(range(len(replies)))])[0]
    for key, value in real.items():
        assert np.array_equal(grand[key], value.numpy())


def test_a_copy_group_is_aggregated_once_as_the_scorer_entered_it(identity):
    # FedAvg: the real aggregation gets the group's first member with the group's smallest
    # weight and not the copy, so the kept model is the merged grand coalition that was scored.
    ids = ["f0", "f1", "f2", "f3"]
    states = [_state() for _ in ids]
    sizes = [30, 20, 10, 40]
    replies = [
        _reply(identity, i + 1, st, n) for i, (st, n) in enumerate(zip(states, sizes, strict=True))
    ]
    groups = (("f0", "f2"),)
    strategy = FedAvg(fraction_evaluate=0.0)
    merged = once_per_group(strategy, ids, replies, groups)
    assert len(merged) == 3
    weights = [next(iter(m.content.metric_records.values()))["num-examples"] for m in merged]
    assert weights == [10, 20, 40]
    # The replies themselves are untouched (the scorer and the ledger still read them).
    assert [r.content["metrics"]["num-examples"] for r in replies] == sizes
    real, _ = strategy.aggregate_train(1, merged)
    scored = merge_players(WeightedMeanAggregator(states, sizes), [[0, 2], [1], [3]])
    grand = scored.aggregate([frozenset(range(3))])[0]
    for key, value in real.items():
        np.testing.assert_allclose(value.numpy(), grand[key], rtol=1e-5, atol=1e-6)
    # Any other rule scored the group as its members' union and gets every reply; no group,
    # every reply too.
    assert len(once_per_group(FedMedian(fraction_evaluate=0.0), ids, replies, groups)) == 4
    assert len(once_per_group(strategy, ids, replies, ())) == 4


def test_stateful_strategy_is_copied_so_scoring_leaves_its_state_alone(identity):
    """FedAdam keeps moments between rounds: coalitions must not advance them."""
    current = _state()
    strategy = FedAdam(fraction_evaluate=0.0, eta=0.1)
    strategy.current_arrays = {k: v.copy() for k, v in current.items()}
    replies = [_reply(identity, i + 1, _state(), 10 * (i + 1)) for i in range(3)]
    agg = coalition_aggregator(strategy, 1, replies, current)
    assert isinstance(agg, StrategyAggregator)
    models = agg.aggregate(_coalitions(3))
    assert len(models) == 7
    assert strategy.m_t is None and strategy.v_t is None  # still the pre-round state
    # The grand coalition's model is exactly what the real round then produces.
    real, _ = strategy.aggregate_train(1, replies)
    for key, value in real.items():
        np.testing.assert_allclose(models[-1][key], value.numpy(), rtol=1e-6)


def test_a_rule_that_refuses_a_coalition_keeps_the_previous_model(identity):
    previous = _state()
    replies = [_reply(identity, i + 1, _state(), 10) for i in range(5)]
    krum = Krum(fraction_evaluate=0.0, num_malicious_nodes=1)
    agg = StrategyAggregator(krum, 1, replies, previous)
    models = agg.aggregate([frozenset({0}), frozenset(range(5))])
    for key in SHAPES:
        assert models[0][key].shape == previous[key].shape
    # Krum picks one of the submitted updates for the full set.
    assert any(
        all(
            np.array_equal(models[1][k], np.asarray(replies[i].content["arrays"][k].numpy()))
            for k in SHAPES
        )
        for i in range(5)
    )


@pytest.mark.parametrize("task_name", ["tep_fault", "molding_quality", "rul"])
def test_batched_evaluation_equals_the_task_evaluation(task_name):
    task = get_task(task_name)
    torch.manual_seed(0)
    model = task.build_model()
    x_shape = None
    for p in model.parameters():  # first Linear's input width
        x_shape = p.shape[1]
        break
    x = torch.randn(300, x_shape)
    if task_name == "tep_fault":
        y = torch.randint(0, 22, (300,))
    elif task_name == "molding_quality":
        y = (torch.rand(300) < 0.2).float()
    else:
        y = torch.rand(300)
    data = TensorDataset(x, y)
    evaluator = BatchedEvaluator(task, model, data)
    states = []
    for _ in range(5):
        fresh = task.build_model()
        states.append({k: v.detach().numpy() for k, v in fresh.state_dict().items()})
    ours = evaluator.scores(states)
    for state, got in zip(states, ours, strict=True):
        m = task.build_model()
        m.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        expected = task.evaluate(m, data)[task.main_metric]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert evaluator.sign == (1.0 if task.greater_is_better else -1.0)


class _LinearGame:
    """An aggregator + scorer pair whose utility is known: players are scalars, U = mean."""

    def __init__(self, values, weights):
        self.agg = WeightedMeanAggregator(
            [{"v": np.array([v], np.float64)} for v in values], weights
        )

    @staticmethod
    def score(states):
        return [float(s["v"][0]) for s in states]


def test_coalition_utility_is_improvement_over_the_previous_model_with_sign():
    game = _LinearGame([1.0, 3.0], [1, 1])
    up = CoalitionUtility(game.agg, game.score, baseline=0.5, sign=1.0)
    assert up([frozenset({0}), frozenset({0, 1})]) == pytest.approx([0.5, 1.5])
    down = CoalitionUtility(game.agg, game.score, baseline=0.5, sign=-1.0)
    assert down([frozenset({1})]) == pytest.approx([-2.5])
    nan = CoalitionUtility(game.agg, lambda s: [float("nan")] * len(s), baseline=0.0)
    assert nan([frozenset({0})]) == [0.0]
    assert up.models == 2


def test_scorer_exact_sums_to_the_round_utility():
    game = _LinearGame([1.0, 2.0, 4.0], [1, 1, 2])
    scorer = ContributionScorer("exact", game.score, params={"max_players": 8})
    result = scorer.score_round(3, ["a", "b", "c"], game.agg, {"v": np.array([0.0])})
    assert set(result.scores) == {"a", "b", "c"}
    assert sum(result.scores.values()) == pytest.approx(result.grand_utility)
    assert result.grand_utility == pytest.approx((1 + 2 + 8) / 4)
    assert result.evaluations == 7
    metrics = contribution_metrics(result)
    assert metrics["factory/c/contribution"] == result.scores["c"]
    assert metrics["server/contribution_evaluations"] == 7.0
    with pytest.raises(ValueError, match="contribution.method"):
        ContributionScorer("banzhaf", game.score)


def test_wrapper_scores_accepted_factories_before_aggregating(identity):
    scorer = ContributionScorer(
        "exact", lambda states: [-float(np.abs(s["w"] - 1.0).mean()) for s in states]
    )
    records = []
    strategy = FactoryFedStrategy(
        FedAvg(fraction_evaluate=0.0), min_accepted=1, scorer=scorer, on_round=records.append
    )
    zero = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    strategy.remember_global(_record(zero))
    good = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    bad = {k: np.full(s, -3.0, np.float32) for k, s in SHAPES.items()}
    nan = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    replies = [
        _reply(identity, 1, good, 10, "factory_000"),
        _reply(identity, 2, bad, 10, "factory_001"),
        _reply(identity, 3, nan, 10, "factory_002"),
    ]
    strategy.aggregate_train(1, replies)
    (record,) = records
    scores = record.contribution.scores
    assert set(scores) == {"factory_000", "factory_001"}  # the rejected NaN update is not a player
    assert scores["factory_000"] > 0 > scores["factory_001"]


def test_wrapper_survives_a_failing_scorer(identity):
    def broken(states):
        raise RuntimeError("evaluation crashed")

    records = []
    strategy = FactoryFedStrategy(
        FedMedian(fraction_evaluate=0.0),
        scorer=ContributionScorer("loo", broken),
        on_round=records.append,
    )
    strategy.remember_global(_record({k: np.zeros(s, np.float32) for k, s in SHAPES.items()}))
    replies = [_reply(identity, i + 1, _state(), 10, f"factory_00{i}") for i in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert records[0].contribution is None  # unscored, so unpaid
    assert len(records[0].aggregated) == 3


@pytest.mark.parametrize("strategy_cls", [FedMedian, FedTrimmedAvg])
def test_detached_replies_survive_strategies_that_consume_them(identity, strategy_cls):
    """FedMedian and FedTrimmedAvg pop the arrays out of the replies they aggregate: coalition
    models and the real aggregation must each get their own records."""
    replies = [_reply(identity, i + 1, _state(), 10) for i in range(5)]
    strategy = strategy_cls(fraction_evaluate=0.0)
    agg = coalition_aggregator(strategy, 1, replies, _state())
    models = agg.aggregate(_coalitions(5))
    assert agg.failed == 0
    for msg in replies:  # the originals are untouched ...
        assert set(msg.content["arrays"].keys()) == set(SHAPES)
    real, _ = strategy.aggregate_train(1, detached(replies))
    for key, value in real.items():  # ... and the grand coalition is the real round's model
        np.testing.assert_allclose(models[-1][key], value.numpy(), rtol=1e-6)
    second, _ = strategy.aggregate_train(1, detached(replies))
    for key, value in real.items():
        np.testing.assert_array_equal(second[key].numpy(), value.numpy())


def test_precomputed_updates_give_the_same_coalitions(identity):
    """The wrapper passes the numpy updates it validated: the same models as from the replies."""
    states = [_state() for _ in range(3)]
    replies = [
        _reply(identity, i + 1, s, n)
        for i, (s, n) in enumerate(zip(states, [5, 9, 2], strict=True))
    ]
    strategy = FedAvg(fraction_evaluate=0.0)
    coalitions = _coalitions(3)
    from_replies = coalition_aggregator(strategy, 1, replies, states[0]).aggregate(coalitions)
    given = coalition_aggregator(strategy, 1, replies, states[0], states).aggregate(coalitions)
    for a, b in zip(from_replies, given, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_the_contribution_group_builds_the_scorer():
    from fl_server.config import compose_config

    assert build_scorer(compose_config(["contribution=none"]), None, None) is None
    task = get_task("tep_fault")
    width = next(iter(task.build_model().parameters())).shape[1]
    data = TensorDataset(torch.randn(40, width), torch.randint(0, 22, (40,)))
    cfg = compose_config(["contribution=loo", "seed=5"])
    scorer = build_scorer(cfg, task, data)
    assert scorer.method == "loo" and scorer.seed == 5
    assert scorer.sign == (1.0 if task.greater_is_better else -1.0)


def test_scoring_subset_keeps_evenly_spaced_examples():
    data = TensorDataset(torch.arange(8624.0).reshape(-1, 1), torch.zeros(8624))
    assert scoring_subset(data, None) is data and scoring_subset(data, 8624) is data
    kept = scoring_subset(data, 2000)
    # every 5th window from the first: 1,725 of TEP's 8,624 validation windows
    assert len(kept) == 1725 and [float(kept[i][0]) for i in (0, 1, 1724)] == [0, 5, 8620]
    assert len(scoring_subset(data, 1)) == 1
    with pytest.raises(ValueError, match="at least 1"):
        scoring_subset(data, 0)


def test_the_scorer_scores_on_the_configured_share_of_the_validation_set():
    """``contribution.validation_examples`` bounds the examples every coalition is scored on;
    null scores on all of them."""
    from fl_server.config import compose_config

    task = get_task("tep_fault")
    width = next(iter(task.build_model().parameters())).shape[1]
    data = TensorDataset(torch.randn(100, width), torch.randint(0, 22, (100,)))
    bounded = build_scorer(compose_config(["contribution.validation_examples=30"]), task, data)
    assert len(bounded.evaluator.target) == 25  # every 4th of 100
    whole = build_scorer(compose_config(["contribution.validation_examples=null"]), task, data)
    assert len(whole.evaluator.target) == 100


@pytest.mark.parametrize("method", ["linearised", "kernel"])
def test_the_scorer_runs_the_newer_estimators_on_a_real_task(method):
    """``build_scorer`` hands the estimators the validation evaluator: the scores of a FedAvg
    round sum to the full round's gain, as exact Shapley's do."""
    from fl_server.config import compose_config

    task = get_task("molding_quality")
    torch.manual_seed(0)
    width = next(iter(task.build_model().parameters())).shape[1]
    data = TensorDataset(torch.randn(200, width), (torch.rand(200) < 0.3).float())
    scorer = build_scorer(compose_config([f"contribution={method}"]), task, data)
    reference = {k: v.detach().numpy() for k, v in task.build_model().state_dict().items()}
    updates = [
        {k: (v + RNG.normal(scale=0.3, size=v.shape)).astype(v.dtype) for k, v in reference.items()}
        for _ in range(4)
    ]
    aggregator = WeightedMeanAggregator(updates, [50, 80, 20, 60])
    ids = [f"factory_00{i}" for i in range(4)]
    got = scorer.score_round(1, ids, aggregator, reference)
    assert set(got.scores) == set(ids)
    assert sum(got.scores.values()) == pytest.approx(got.grand_utility, abs=1e-6)
