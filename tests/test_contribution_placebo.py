"""The placebo noise test: a factory is paid only for round scores that beat pure noise of its norm.

Pure logic on simulated rounds (a linear "network", so a coalition's outputs are exactly the
mix of its members' outputs): a pure-noise update's statistic must reject no more often than
its level, an honest update's must reject, and the run-level test must pay an honest factory
and not a noise sender.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from strategies.contribution.guards import (
    ContributionGuard,
    GuardConfig,
    noise_test,
    placebo_rng,
    placebo_statistic,
    placebo_update,
)

ROWS, DIM = 200, 60


class LinearRound:
    """Outputs ``X @ w`` on a validation set, scored by negative mean squared error."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.x = torch.as_tensor(rng.normal(size=(ROWS, DIM)))
        self.truth = torch.as_tensor(rng.normal(size=DIM))
        self.y = self.x @ self.truth
        self.w0 = torch.zeros(DIM)

    def outputs(self, w: torch.Tensor) -> torch.Tensor:
        return self.x @ torch.as_tensor(w, dtype=torch.float64)

    def metric(self, outputs: torch.Tensor) -> float:
        return -float(((outputs.to(torch.float64) - self.y) ** 2).mean())

    def honest(self, rng: np.random.Generator, signal: float, noise: float) -> np.ndarray:
        """A step towards the truth plus isotropic (DP-like) noise of norm ``noise``."""
        step = signal * self.truth.numpy() / np.linalg.norm(self.truth.numpy())
        u = rng.normal(size=DIM)
        return step + noise * u / np.linalg.norm(u)

    def noise(self, rng: np.random.Generator, norm: float) -> np.ndarray:
        u = rng.normal(size=DIM)
        return norm * u / np.linalg.norm(u)


def round_z(game: LinearRound, deltas: list[np.ndarray], rng, placebos_each: int = 2):
    """Every player's placebo ``z`` of one round (placebos drawn as the scorer draws them)."""
    n = len(deltas)
    norms = [float(np.linalg.norm(d)) for d in deltas]
    own = torch.stack([game.outputs(torch.as_tensor(d)) for d in deltas])
    placebo_outputs, owners = [], []
    for i in range(n):
        for _ in range(placebos_each):
            placebo_outputs.append(game.outputs(torch.as_tensor(game.noise(rng, norms[i]))))
            owners.append(i)
    return placebo_statistic(
        own,
        torch.stack(placebo_outputs),
        owners,
        game.outputs(game.w0),
        norms,
        [100.0] * n,
        game.metric,
        size=8,
    )


def test_a_noise_senders_round_statistic_rejects_at_its_level():
    rng = np.random.default_rng(0)
    game = LinearRound(rng)
    zs = []
    for _ in range(400):
        honest = [game.honest(rng, signal=1.0, noise=3.0) for _ in range(3)]
        norm = float(np.median([np.linalg.norm(d) for d in honest]))
        zs.append(round_z(game, honest + [game.noise(rng, norm)], rng)[-1])
    zs = np.asarray(zs)
    level = float(stats.norm.isf(0.05))
    # One-sided 5% test: at most 20 of 400 expected (the better of two correlated scores,
    # Sidak-corrected, is conservative: 10 if they were identical); 38 is beyond the binomial
    # 99.9% band of 20, and a statistic that never rejects would not reach 4.
    assert 4 <= int((zs > level).sum()) <= 38
    assert float(np.std(zs)) > 0.5


def test_an_honest_update_beats_its_placebos_and_is_paid_over_rounds():
    rng = np.random.default_rng(1)
    game = LinearRound(rng)
    guard = ContributionGuard(GuardConfig(noise_test=True, merge_duplicates=False))
    ids = ["a", "b", "c", "noise"]
    for r in range(1, 4):
        honest = [game.honest(rng, signal=2.0, noise=3.0) for _ in range(3)]
        norm = float(np.median([np.linalg.norm(d) for d in honest]))
        deltas = honest + [game.noise(rng, norm)]
        found = guard.observe(ids, np.stack(deltas), [100.0] * 4)
        assert found.alignment == {}  # the placebo rule scores after the groups are known
        z = round_z(game, deltas, rng)
        assert min(z[:3]) > 1.0, z  # each honest round is above its placebos
        found = guard.score_noise(found, dict(zip(ids, z.tolist(), strict=True)))
        assert set(found.alignment) == set(ids) and found.verdicts["a"].rounds == r
    assert found.withheld == ("noise",)
    # A restarted server rebuilds the same verdicts from the recorded per-round scores.
    again = ContributionGuard(GuardConfig(noise_test=True, merge_duplicates=False))
    again.restore([{"alignment": {f: v[-1] for f, v in guard._z.items()}}])
    assert again._z == {f: [v[-1]] for f, v in guard._z.items()}


def test_noise_senders_are_paid_at_most_at_the_runs_level():
    rng = np.random.default_rng(2)
    game = LinearRound(rng)
    runs = {}
    for run in range(150):
        honest = [game.honest(rng, signal=1.0, noise=3.0) for _ in range(3)]
        norm = float(np.median([np.linalg.norm(d) for d in honest]))
        runs[f"run{run}"] = [
            float(round_z(game, honest + [game.noise(rng, norm)], rng)[-1]) for _ in range(3)
        ]
    paid = sum(v.paid for v in noise_test(runs, alpha=0.05).values())
    assert paid <= 18  # 7.5 expected at alpha 0.05; 18 is beyond the binomial 99.9% band


def test_a_small_honest_factory_under_heavy_noise_is_what_the_test_misses():
    """The price of the rule: an update whose signal is tiny against its noise scores like
    noise, so it is withheld (the benchmark measures this false-negative rate on real tasks)."""
    rng = np.random.default_rng(3)
    game = LinearRound(rng)
    zs = []
    for _ in range(60):
        honest = [game.honest(rng, signal=1.0, noise=3.0) for _ in range(3)]
        zs.append(round_z(game, honest + [game.honest(rng, signal=0.01, noise=3.0)], rng)[-1])
    assert float(np.mean(np.asarray(zs) > stats.norm.isf(0.001))) < 0.1


def test_placebo_updates_have_the_updates_norm_and_are_reproducible():
    reference = {
        "w": np.ones((3, 4), dtype=np.float32),
        "b": np.zeros(4, dtype=np.float32),
        "steps": np.array([7], dtype=np.int64),
    }
    update = {"w": reference["w"] + 0.5, "b": reference["b"] - 1.0, "steps": np.array([9])}
    a = placebo_update(update, reference, placebo_rng(0, 3, "factory_001"))
    b = placebo_update(update, reference, placebo_rng(0, 3, "factory_001"))
    c = placebo_update(update, reference, placebo_rng(0, 3, "factory_002"))
    norm = np.sqrt(12 * 0.25 + 4 * 1.0)
    delta = np.concatenate([(a[k] - reference[k]).ravel() for k in ("w", "b")])
    assert np.linalg.norm(delta) == pytest.approx(norm, rel=1e-5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["w"], c["w"])
    assert a["steps"][0] == 7 and a["w"].dtype == np.float32


def test_the_statistic_refuses_inconsistent_inputs_and_has_no_evidence_without_spread():
    out = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="every player needs at least one placebo"):
        placebo_statistic(out, out[:1], [0], out[0], [1.0, 1.0], [1.0, 1.0], lambda o: 0.0)
    with pytest.raises(ValueError, match="one owner per placebo"):
        placebo_statistic(out, out, [0], out[0], [1.0, 1.0], [1.0, 1.0], lambda o: 0.0)
    flat = placebo_statistic(
        out, torch.zeros(4, 5), [0, 0, 1, 1], out[0], [1.0, 1.0], [1.0, 1.0], lambda o: 0.5
    )
    assert flat.tolist() == [0.0, 0.0]


def test_guard_config_names_a_bad_rule_or_placebo_count():
    assert GuardConfig().noise_test and GuardConfig().noise_rule == "gradient"
    with pytest.raises(ValueError, match="noise_rule must be one of gradient, placebo, alignment"):
        GuardConfig(noise_rule="cosine")
    with pytest.raises(ValueError, match="noise_placebos must be an integer >= 2"):
        GuardConfig(noise_placebos=1)


# -- through the server's scorer, on a real task's network -------------------------------------
def _molding_round(rng):
    from torch.utils.data import TensorDataset

    from standard_models.registry import get_task

    task = get_task("molding_quality")
    torch.manual_seed(0)
    width = next(iter(task.build_model().parameters())).shape[1]
    data = TensorDataset(torch.randn(200, width), (torch.rand(200) < 0.3).float())
    reference = {k: v.detach().numpy() for k, v in task.build_model().state_dict().items()}
    updates = [
        {k: (v + rng.normal(scale=0.3, size=v.shape)).astype(v.dtype) for k, v in reference.items()}
        for _ in range(3)
    ]
    return task, data, reference, updates


def test_the_placebo_rule_runs_reproducibly_for_a_weighted_mean():
    from fl_server.config import compose_config
    from strategies.contribution.coalitions import WeightedMeanAggregator
    from strategies.contribution.scorer import build_scorer

    task, data, reference, updates = _molding_round(np.random.default_rng(4))
    ids = ["factory_000", "factory_001", "factory_002"]
    got = []
    for _ in range(2):  # a rescored round (a resumed server) draws the same placebos
        overrides = ["contribution=auto", "contribution.guards.noise_rule=placebo"]
        scorer = build_scorer(compose_config(overrides), task, data)
        assert scorer.guard is not None and scorer.guard.config.placebo
        aggregator = WeightedMeanAggregator(updates, [50, 80, 20])
        got.append(scorer.score_round(3, ids, aggregator, reference))
    assert set(got[0].alignment) == set(ids) == set(got[0].noise_z)
    assert got[0].alignment == got[1].alignment
    assert all(np.isfinite(v) for v in got[0].alignment.values())


def test_the_placebo_test_runs_with_any_other_rule(identity):
    """Rules other than the weighted mean (GTG's path) run the factories' own models for it."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedMedian

    from strategies.contribution.coalitions import StrategyAggregator
    from strategies.contribution.scorer import ContributionScorer
    from strategies.contribution.utility import BatchedEvaluator

    task, data, reference, updates = _molding_round(np.random.default_rng(5))
    replies = [
        identity(
            node + 1,
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in u.items()}),
                    "metrics": MetricRecord({"num-examples": 40}),
                }
            ),
        )
        for node, u in enumerate(updates)
    ]
    evaluator = BatchedEvaluator(task, task.build_model(), data)
    scorer = ContributionScorer(
        "gtg",
        evaluator.scores,
        evaluator.sign,
        evaluator=evaluator,
        guards=GuardConfig(noise_rule="placebo"),
    )
    aggregator = StrategyAggregator(FedMedian(fraction_evaluate=0.0), 1, replies, reference)
    got = scorer.score_round(1, ["a", "b", "c"], aggregator, reference)
    assert set(got.alignment) == {"a", "b", "c"} and set(got.noise_z) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="needs the validation evaluator"):
        ContributionScorer("gtg", evaluator.scores, guards=GuardConfig())
