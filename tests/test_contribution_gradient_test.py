"""The gradient noise rule: an update is paid for its first-order gain on the validation loss,
tested against sign-flipped noise.

Pure logic on simulated updates (a pure-noise update of any shape must score no more than
Hoeffding's bound allows, an honest one must score high), then the server's scorer on a real
task's network: the gradient it tests against is the validation loss gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strategies.contribution.guards import (
    ContributionGuard,
    GuardConfig,
    gradient_statistic,
    noise_test,
)

DIM = 3000


def _gradient(rng: np.random.Generator) -> np.ndarray:
    """A heavy-tailed gradient (a few large coordinates), the hard case for a cosine test."""
    return rng.standard_t(2, size=DIM)


@pytest.mark.parametrize("shape", ["gaussian", "spikes", "laplace", "scaled"])
def test_noise_of_any_symmetric_shape_scores_within_hoeffdings_bound(shape):
    rng = np.random.default_rng(1)
    g = _gradient(rng)
    draws = 4000
    if shape == "gaussian":
        noise = rng.normal(size=(draws, DIM))
    elif shape == "spikes":  # a few huge coordinates
        noise = np.zeros((draws, DIM))
        for row in noise:
            row[rng.integers(0, DIM, 4)] = rng.choice([-1.0, 1.0], 4) * 1e3
    elif shape == "laplace":
        noise = rng.laplace(size=(draws, DIM))
    else:  # a different scale in every coordinate
        noise = rng.normal(size=(draws, DIM)) * rng.exponential(size=DIM)
    z = gradient_statistic(noise, g)
    assert abs(z.mean()) < 0.1
    for t in (1.5, 2.0, 2.5):
        assert (z >= t).mean() <= math.exp(-(t**2) / 2)


def test_an_update_against_the_gradient_scores_high_and_one_along_it_low():
    rng = np.random.default_rng(2)
    g = rng.normal(size=DIM)
    noise = rng.normal(size=DIM) * np.linalg.norm(g) / math.sqrt(DIM)
    honest = -0.2 * g + noise  # a step that lowers the loss, under 5x larger noise per unit
    harmful = 0.2 * g + noise
    z = gradient_statistic(np.stack([honest, harmful, np.zeros(DIM)]), g)
    assert z[0] > 5 and z[1] < -5 and z[2] == 0.0
    # The price of holding for any noise shape: where a few coordinates carry the gradient the
    # score can be no larger than what those few could reach by luck.
    spiky = _gradient(rng)
    step = -0.2 * spiky + rng.normal(size=DIM) * np.linalg.norm(spiky) / math.sqrt(DIM)
    assert 0 < gradient_statistic(step[None], spiky)[0] < 5
    assert gradient_statistic(np.ones((1, DIM)), np.zeros(DIM)).tolist() == [0.0]
    with pytest.raises(ValueError, match="updates, got"):
        gradient_statistic(np.ones((2, DIM - 1)), g)


def test_sub_gaussian_thresholds_are_hoeffdings_and_stricter_than_normal():
    # Stouffer z 3.5 over one round: above the normal threshold at alpha 1e-3 (3.29), below
    # Hoeffding's (sqrt(2 ln 2000) = 3.90).
    assert noise_test({"f": [3.5]}, 1e-3)["f"].paid
    assert not noise_test({"f": [3.5]}, 1e-3, subgaussian=True)["f"].paid
    assert noise_test({"f": [4.0]}, 1e-3, subgaussian=True)["f"].paid
    # Over 4 rounds at 2.0 each the Stouffer statistic is 4.0: paid under either tail.
    assert noise_test({"f": [2.0] * 4}, 1e-3, subgaussian=True)["f"].paid


def test_noise_senders_are_paid_at_most_at_the_runs_level():
    """Five rounds of pure noise against a fresh gradient each round, 2,000 senders: paid at
    most alpha of the time (Hoeffding's bound, so in practice far less)."""
    rng = np.random.default_rng(3)
    alpha = 0.05
    paid = 0
    senders = 2000
    zs: dict[str, list[float]] = {f"n{i}": [] for i in range(senders)}
    for _ in range(5):
        g = _gradient(rng)
        z = gradient_statistic(rng.normal(size=(senders, DIM)), g)
        for i in range(senders):
            zs[f"n{i}"].append(float(z[i]))
    paid = sum(v.paid for v in noise_test(zs, alpha, subgaussian=True).values())
    assert paid <= alpha * senders


def test_the_guard_config_accepts_the_rule_and_the_guard_waits_for_the_scorer():
    cfg = GuardConfig(noise_rule="gradient")
    assert cfg.scored_noise and not cfg.placebo
    guard = ContributionGuard(cfg)
    found = guard.observe(["a", "b"], np.ones((2, 10)), [1.0, 1.0])
    assert found.alignment == {}  # the scorer supplies the round's scores
    decided = guard.score_noise(found, {"a": 9.0, "b": 0.1})
    assert decided.withheld == ("b",) and decided.verdicts["a"].paid


# -- through the server's scorer, on a real task's network -------------------------------------
def test_the_scorer_tests_updates_against_the_validation_loss_gradient():
    from torch.utils.data import TensorDataset

    from standard_models.registry import get_task
    from strategies.contribution.coalitions import WeightedMeanAggregator
    from strategies.contribution.guards import flat_deltas
    from strategies.contribution.scorer import ContributionScorer
    from strategies.contribution.utility import BatchedEvaluator

    task = get_task("molding_quality")
    torch.manual_seed(0)
    model = task.build_model()
    width = next(iter(model.parameters())).shape[1]
    x = torch.randn(400, width)
    data = TensorDataset(x, (x[:, 0] > 0.5).float())
    reference = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    evaluator = BatchedEvaluator(task, task.build_model(), data)
    grads = evaluator.loss_gradient(reference)
    # the gradient is the loss's: a small step against it lowers the validation loss
    step = {
        k: (v - 1e-2 * grads[k]).astype(v.dtype) if k in grads else v for k, v in reference.items()
    }
    loss = task.loss_fn()
    before = float(loss(evaluator.outputs([reference])[0], evaluator.target))
    after = float(loss(evaluator.outputs([step])[0], evaluator.target))
    assert after < before

    rng = np.random.default_rng(6)
    noise = {
        k: (v + rng.normal(scale=1e-2, size=v.shape)).astype(v.dtype) for k, v in reference.items()
    }
    honest = {
        k: (v - 0.5 * grads[k] + rng.normal(scale=1e-2, size=v.shape)).astype(v.dtype)
        if k in grads
        else v
        for k, v in reference.items()
    }
    scorer = ContributionScorer(
        "exact",
        evaluator.scores,
        evaluator.sign,
        evaluator=evaluator,
        guards=GuardConfig(noise_rule="gradient"),
    )
    updates = [honest, noise]
    got = scorer.score_round(
        1, ["honest", "noise"], WeightedMeanAggregator(updates, [50, 50]), reference
    )
    deltas = flat_deltas(updates, reference)
    assert got.alignment["honest"] > 5 and abs(got.alignment["noise"]) < 4
    assert got.withheld == ("noise",)
    assert np.isfinite(deltas).all()


def test_the_products_default_scorer_tests_noise_by_the_gradient_rule():
    from torch.utils.data import TensorDataset

    from fl_server.config import compose_config
    from standard_models.registry import get_task
    from strategies.contribution.scorer import build_scorer

    task = get_task("molding_quality")
    width = next(iter(task.build_model().parameters())).shape[1]
    data = TensorDataset(torch.randn(50, width), (torch.rand(50) < 0.3).float())
    scorer = build_scorer(compose_config([]), task, data)
    assert scorer is not None and scorer.guard is not None
    assert scorer.guard.config.noise_rule == "gradient" and scorer.guard.config.scored_noise
