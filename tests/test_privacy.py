"""Privacy accounting: planning, the factory's ledger, and whole factory rounds.

A tiny stand-in task (:mod:`tiny_task`, logistic regression on synthetic rows) keeps these
tests independent of the real standard models.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from dp_accounting import dp_event, pld, rdp
from opacus.accountants import RDPAccountant
from opacus.accountants import utils as opacus_utils
from round_helpers import run_round
from tiny_task import TinyTask, make_frame, write_frame

import fl_client.factory as factory_module
from fl_client.privacy import (
    BudgetExhausted,
    LedgerError,
    PrivacyLedger,
    epsilon_of,
    plan_noise_multiplier,
)
from fl_client.training import LocalTrainConfig, sample_rate_for, steps_per_epoch
from standard_models.base import (
    DataValidationError,
)

DELTA = 1e-5
TASK = TinyTask()


def global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return TASK.build_model().state_dict()


def factory_round(
    data: Path,
    ledger: Path,
    run_id: str,
    rnd: int,
    planned: int,
    cfg: LocalTrainConfig,
    budget: float,
    carried: list | None = None,
    factory_id: str = "f0",
) -> factory_module.FactoryRoundResult:
    return run_round(
        TASK, cfg, data, ledger, global_state(), budget, DELTA,
        run_id=run_id, server_round=rnd, planned_rounds=planned, factory_id=factory_id,
        carried=carried,
    )  # fmt: skip


# ------------------------------------------------------------------ epsilon and planning


def test_epsilon_of_empty_history_is_zero() -> None:
    assert epsilon_of([], DELTA) == 0.0
    assert epsilon_of(None, DELTA, "prv") == 0.0


def test_epsilon_of_matches_opacus_and_is_additive_over_split_entries() -> None:
    acc = RDPAccountant()
    acc.history = [(1.1, 0.02, 300), (0.9, 0.05, 40)]
    assert epsilon_of(acc.history, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    split = [(1.1, 0.02, 100), (1.1, 0.02, 200), (0.9, 0.05, 40)]
    assert epsilon_of(split, DELTA) == epsilon_of(acc.history, DELTA)


def test_gdp_refuses_mixed_noise_levels() -> None:
    assert epsilon_of([(1.0, 0.01, 100), (1.0, 0.01, 50)], DELTA, "gdp") > 0
    with pytest.raises(ValueError, match="gdp"):
        epsilon_of([(1.0, 0.01, 100), (2.0, 0.01, 50)], DELTA, "gdp")


def _independent_epsilon(sigma: float, q: float, steps: int, accountant: str) -> float:
    """Epsilon by Google's dp_accounting: RDP for ``rdp``, the PLD accountant for ``prv``."""
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(event, steps)
    return float(acc.get_epsilon(DELTA))


@pytest.mark.filterwarnings("ignore:Optimal order is the")
@pytest.mark.parametrize(
    ("eps", "q", "steps", "accountant"),
    [
        (1.0, 0.01, 1000, "rdp"),
        (3.0, 0.05, 200, "rdp"),
        (0.8, 1 / 3, 30, "rdp"),
        (0.5, 0.02, 100, "prv"),
    ],
)
def test_plan_without_prior_reaches_the_budget_by_an_independent_accountant(
    eps: float, q: float, steps: int, accountant: str
) -> None:
    sigma = plan_noise_multiplier([], eps, DELTA, q, steps, accountant)
    assert epsilon_of([(sigma, q, steps)], DELTA, accountant) <= eps
    # The planned noise spends the budget (not more noise than needed) ... Opacus's PRV
    # accountant reports an upper estimate of the tight epsilon that the PLD approximates.
    tolerance = 0.02 if accountant == "rdp" else 0.05
    independent = _independent_epsilon(sigma, q, steps, accountant)
    assert independent == pytest.approx(eps, rel=tolerance)
    assert independent <= eps * (1 + 1e-3)
    # ... and 5% less noise would overspend it.
    assert _independent_epsilon(0.95 * sigma, q, steps, accountant) > eps


def test_plan_without_prior_is_opacus_get_noise_multiplier_exactly() -> None:
    # The factory's plan is Opacus's value to the last bit, computed over faster curves.
    for eps, q, steps in [(8.0, 1 / 7, 350), (2.0, 0.05, 300), (8.0, 1.0, 25)]:
        expected = opacus_utils.get_noise_multiplier(
            target_epsilon=eps, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
        )
        assert plan_noise_multiplier([], eps, DELTA, q, steps) == expected


def test_plan_with_prior_spend_needs_more_noise_and_stays_within_budget() -> None:
    prior = [(1.5, 0.02, 500)]
    spent = epsilon_of(prior, DELTA)
    assert 0 < spent < 4.0
    fresh = plan_noise_multiplier([], 4.0, DELTA, 0.02, 500)
    sigma = plan_noise_multiplier(prior, 4.0, DELTA, 0.02, 500)
    assert sigma > fresh
    total = epsilon_of([*prior, (sigma, 0.02, 500)], DELTA)
    assert 4.0 - 0.01 <= total <= 4.0


def test_plan_refuses_when_prior_spend_meets_the_budget() -> None:
    prior = [(0.8, 0.05, 1000)]
    spent = epsilon_of(prior, DELTA)
    with pytest.raises(BudgetExhausted) as info:
        plan_noise_multiplier(prior, spent, DELTA, 0.05, 10)
    assert f"{spent:.4f}" in str(info.value)
    assert info.value.budget == spent


# ------------------------------------------------------------------ ledger


def test_ledger_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, "f0", 5.0, DELTA)
    sigma = ledger.noise_multiplier_for_run("r1", 0.1, 40)
    eps = ledger.reserve_round("r1", 1, sigma, 0.1, 20)
    again = PrivacyLedger.open(path, "f0", 5.0, DELTA)
    assert again.to_dict() == ledger.to_dict()
    assert again.spent_epsilon() == eps
    assert json.loads(path.read_text())["rounds"][0]["epsilon_after"] == eps
    assert again.noise_multiplier_for_run("r1", 0.1, 40) == sigma


def test_reserve_over_budget_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, "f0", 1.0, DELTA)
    ledger.reserve_round("r", 1, 2.0, 0.1, 10)
    before = path.read_text()
    with pytest.raises(BudgetExhausted):
        ledger.reserve_round("r", 2, 0.5, 0.1, 1000)
    assert path.read_text() == before
    assert ledger.projected_epsilon(0.5, 0.1, 1000) > 1.0 >= ledger.spent_epsilon()


@pytest.mark.parametrize(
    "content", ["{not json", "[]", '{"format": "factoryfed-privacy-ledger", "version": 1}', ""]
)
def test_corrupt_ledger_raises_naming_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "corrupt.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match="corrupt.json"):
        PrivacyLedger.open(path, "f0", 3.0, DELTA)
    assert path.read_text() == content


def test_ledger_of_another_factory_accountant_or_larger_budget_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, "f0", 3.0, DELTA)
    ledger.reserve_round("r", 1, 1.0, 0.1, 5)
    with pytest.raises(LedgerError, match="factory"):
        PrivacyLedger.open(path, "f1", 3.0, DELTA)
    with pytest.raises(LedgerError, match="accountant"):
        PrivacyLedger.open(path, "f0", 3.0, DELTA, "prv")
    with pytest.raises(LedgerError, match="budget"):
        PrivacyLedger.open(path, "f0", 30.0, DELTA)
    stricter = PrivacyLedger.open(path, "f0", 0.5, DELTA)
    assert stricter.budget == 0.5
    with pytest.raises(BudgetExhausted):
        stricter.reserve_round("r", 2, 1.0, 0.1, 50)


def test_absorb_adopts_longer_history_and_never_drops_spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path / "l.json", "f0", 10.0, DELTA)
    ledger.reserve_round("r", 1, 1.0, 0.1, 10)
    assert not ledger.absorb([(1.0, 0.1, 5)])  # older state: already contained
    assert ledger.history == [(1.0, 0.1, 10)]
    assert ledger.absorb([(1.0, 0.1, 30)])  # newer state than the disk file
    assert PrivacyLedger.open(tmp_path / "l.json", "f0", 10.0, DELTA).history == [(1.0, 0.1, 30)]
    spent = ledger.spent_epsilon()
    assert ledger.absorb([(1.0, 0.1, 20), (2.0, 0.1, 5)])  # diverged: both count
    assert ledger.history == [(1.0, 0.1, 30), (2.0, 0.1, 5)]
    assert ledger.spent_epsilon() > spent


# ------------------------------------------------------------------ factory rounds


def test_epsilon_after_rounds_matches_an_independent_accountant(tmp_path: Path) -> None:
    data = write_frame(tmp_path, 240)
    ledger = tmp_path / "ledger.json"
    cfg = LocalTrainConfig(local_epochs=2, batch_size=32, reproducible_dp=True)
    independent = RDPAccountant()
    for rnd in range(1, 4):
        metrics = factory_round(data, ledger, "run", rnd, 3, cfg, 3.0).metrics
        assert metrics["dp"] == 1
        assert metrics["steps"] == 2 * steps_per_epoch(240, 32)
        assert metrics["sample_rate"] == sample_rate_for(240, 32)
        for _ in range(int(metrics["steps"])):
            independent.step(
                noise_multiplier=metrics["noise_multiplier"], sample_rate=metrics["sample_rate"]
            )
        assert math.isclose(metrics["epsilon"], independent.get_epsilon(DELTA), rel_tol=1e-9)
    assert 3.0 - 0.01 <= metrics["epsilon"] <= 3.0
    assert set(metrics) == {
        "num-examples",
        "train_loss",
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "train_time",
        "dp",
    }
    assert all(type(v) in (int, float) for v in metrics.values())


def test_random_sweep_never_overspends_and_declines_extra_rounds(tmp_path: Path) -> None:
    rng = random.Random(1234)
    for case in range(20):
        budget = math.exp(rng.uniform(math.log(0.5), math.log(10.0)))
        planned = rng.randint(1, 4)
        n = rng.randint(120, 400)
        cfg = LocalTrainConfig(
            local_epochs=rng.randint(1, 2),
            batch_size=rng.choice([16, 32, 64]),
            grad_sample_mode=rng.choice(["bk", "ghost", "hooks"]),
            reproducible_dp=True,
            seed=case,
        )
        data = write_frame(tmp_path, n, seed=case)
        ledger = tmp_path / f"ledger_{case}.json"
        accepted = []
        with pytest.raises(BudgetExhausted):
            for rnd in range(1, planned + 3):
                accepted.append(factory_round(data, ledger, "run", rnd, planned, cfg, budget))
        context = f"case {case}: budget {budget:.3f}, {planned} rounds, n={n}, {cfg}"
        assert len(accepted) >= planned, context
        assert all(r.metrics["epsilon"] <= budget for r in accepted), context
        on_disk = PrivacyLedger.open(ledger, "f0", budget, DELTA)
        assert len(on_disk.rounds) == len(accepted), context
        assert on_disk.spent_epsilon() == accepted[-1].metrics["epsilon"] <= budget, context


def test_spend_of_an_earlier_run_counts(tmp_path: Path) -> None:
    data = write_frame(tmp_path, 320)
    ledger = tmp_path / "ledger.json"
    cfg = LocalTrainConfig(batch_size=32, reproducible_dp=True)
    first = [factory_round(data, ledger, "run-a", r, 3, cfg, 1.5) for r in (1, 2)]
    second = factory_round(data, ledger, "run-b", 1, 3, cfg, 1.5)
    fresh = factory_round(data, tmp_path / "fresh.json", "run-b", 1, 3, cfg, 1.5)
    assert second.metrics["noise_multiplier"] > fresh.metrics["noise_multiplier"]
    assert second.metrics["noise_multiplier"] > first[0].metrics["noise_multiplier"]
    assert second.metrics["epsilon"] > first[-1].metrics["epsilon"]
    last = [factory_round(data, ledger, "run-b", r, 3, cfg, 1.5) for r in (2, 3)]
    assert 1.5 - 0.01 <= last[-1].metrics["epsilon"] <= 1.5
    with pytest.raises(BudgetExhausted):  # a round beyond run-b's plan would overspend
        factory_round(data, ledger, "run-b", 4, 3, cfg, 1.5)
    # A further run may only plan with what is left, which is almost nothing: a factory with a
    # minimum worth starting a run declines it before training, and its ledger is unchanged ...
    spent = PrivacyLedger.open(ledger, "f0", 1.5, DELTA).spent_epsilon()
    with pytest.raises(BudgetExhausted, match="below the minimum"):
        run_round(
            TASK, cfg, data, ledger, global_state(), 1.5, DELTA,
            run_id="run-c", server_round=1, planned_rounds=3, min_run_epsilon=0.1,
        )  # fmt: skip
    assert PrivacyLedger.open(ledger, "f0", 1.5, DELTA).spent_epsilon() == spent
    # ... and without that minimum the run gets far more noise and still stays within budget.
    third = factory_round(data, ledger, "run-c", 1, 3, cfg, 1.5)
    assert third.metrics["noise_multiplier"] > 5 * last[-1].metrics["noise_multiplier"]
    assert spent < third.metrics["epsilon"] <= 1.5


def test_crash_during_training_keeps_the_spend_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_frame(tmp_path, 80)
    ledger = tmp_path / "ledger.json"

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(factory_module, "train_local", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        factory_round(data, ledger, "run", 1, 2, LocalTrainConfig(batch_size=16), 2.0)
    on_disk = PrivacyLedger.open(ledger, "f0", 2.0, DELTA)
    assert on_disk.spent_epsilon() > 0
    assert [(r["run_id"], r["round"]) for r in on_disk.rounds] == [("run", 1)]


def test_carried_history_restores_a_lost_ledger(tmp_path: Path) -> None:
    data = write_frame(tmp_path, 100)
    ledger = tmp_path / "ledger.json"
    cfg = LocalTrainConfig(batch_size=20, reproducible_dp=True)
    one = factory_round(data, ledger, "run", 1, 2, cfg, 2.0)
    ledger.unlink()
    two = factory_round(data, ledger, "run", 2, 2, cfg, 2.0, carried=one.history)
    # The lost plan is made again from what the carried history says was spent.
    assert two.metrics["noise_multiplier"] > one.metrics["noise_multiplier"]
    independent = RDPAccountant()
    for result in (one, two):
        m = result.metrics
        independent.history.append((m["noise_multiplier"], m["sample_rate"], int(m["steps"])))
    assert math.isclose(two.metrics["epsilon"], independent.get_epsilon(DELTA), rel_tol=1e-9)
    assert two.history == [[*entry] for entry in independent.history]


def test_non_private_round_spends_nothing_and_says_so(tmp_path: Path) -> None:
    data = write_frame(tmp_path, 60)
    ledger = tmp_path / "ledger.json"
    plain = LocalTrainConfig(batch_size=16, dp=False)
    result = factory_round(data, ledger, "run", 1, 2, plain, 2.0)
    assert result.metrics["dp"] == 0
    assert result.metrics["epsilon"] == 0.0
    assert result.metrics["noise_multiplier"] == 0.0
    assert not ledger.exists()
    private = factory_round(data, ledger, "run", 1, 2, LocalTrainConfig(batch_size=16), 2.0)
    before = ledger.read_text()
    after = factory_round(data, ledger, "run", 2, 2, plain, 2.0)
    assert after.metrics["epsilon"] == private.metrics["epsilon"] > 0
    assert after.metrics["dp"] == 0
    assert ledger.read_text() == before


def test_bad_data_file_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    make_frame(20, 0).drop(columns=["s2"]).to_parquet(path)
    with pytest.raises(DataValidationError, match="bad.parquet.*s2"):
        factory_round(path, tmp_path / "l.json", "run", 1, 1, LocalTrainConfig(), 1.0)
    assert not (tmp_path / "l.json").exists()


def test_run_with_too_little_budget_left_declines_instead_of_training_noise(
    tmp_path: Path,
) -> None:
    """Budget nearly spent by an earlier run: the next run declines rather than add noise."""
    data = write_frame(tmp_path, 200)
    ledger = tmp_path / "ledger.json"
    kwargs = dict(
        task=TASK,
        cfg=LocalTrainConfig(batch_size=20),
        data_path=data,
        ledger_path=ledger,
        global_state=global_state(),
        epsilon_budget=2.0,
        delta=DELTA,
        planned_rounds=2,
        min_run_epsilon=0.1,
    )
    for rnd in (1, 2):
        run_round(run_id="first", server_round=rnd, **kwargs)
    spent = PrivacyLedger.open(ledger, "f0", 2.0, DELTA, "rdp").spent_epsilon()
    assert 1.9 < spent <= 2.0
    with pytest.raises(BudgetExhausted, match="worth starting a run"):
        run_round(run_id="second", server_round=1, **kwargs)
    assert PrivacyLedger.open(ledger, "f0", 2.0, DELTA, "rdp").spent_epsilon() == spent


def test_non_private_config_trains(tmp_path: Path) -> None:
    """`privacy=none` as composed from conf/ reaches a factory round without errors."""
    from fl_server.config import compose_config

    p = compose_config(["privacy=none"]).privacy
    data = write_frame(tmp_path, 60)
    result = run_round(
        TASK,
        LocalTrainConfig(batch_size=16, dp=bool(p.enabled)),
        data,
        tmp_path / "l.json",
        global_state(),
        epsilon_budget=0.0,
        delta=float(p.delta),
        run_id="r",
        accountant=str(p.accountant),
    )
    assert result.metrics["dp"] == 0 and result.metrics["epsilon"] == 0.0


def test_reproducible_dp_gives_each_factory_its_own_noise(tmp_path: Path) -> None:
    """Benchmarks simulate factories with reproducible DP: the same round and factory repeat
    bit for bit, but two factories on the same data draw different noise (and batches), as real
    factories do; one shared stream would add the same noise vector to every update."""
    data = write_frame(tmp_path, 80)
    cfg = LocalTrainConfig(batch_size=16, lr=0.5, reproducible_dp=True, seed=3)

    def update(factory_id: str, ledger: str) -> dict[str, torch.Tensor]:
        return run_round(
            TASK, cfg, data, tmp_path / ledger, global_state(), 8.0, DELTA,
            run_id="r", factory_id=factory_id,
        ).state_dict  # fmt: skip

    first, again, other = update("f0", "a.json"), update("f0", "b.json"), update("f1", "c.json")
    for name, value in first.items():
        assert torch.equal(value, again[name])
    assert any(not torch.allclose(value, other[name]) for name, value in first.items())
