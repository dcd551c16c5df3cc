"""What the operator sees of a factory's privacy: the unit its epsilon counts (MLflow params,
the summary table, the description) and the epsilon left of the factory's own budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from mlflow.tracking import MlflowClient
from rich.console import Console

import experiments.run as run_module
from fl_client.client_app import privacy_facts
from fl_client.factory import FactorySite
from fl_common.protocol import (
    ACCEPTED,
    DECLINED,
    EPSILON_BUDGET,
    PRIVACY_UNIT_RANK,
    REPLY_RECORD,
    ProtocolError,
    TrainInstruction,
    TrainReply,
    reply_metrics,
)
from fl_server.recorder import RoundRecorder, factory_metrics, factory_privacy, privacy_params
from fl_server.report import factory_rows, run_description
from fl_server.server_app import privacy_unit_params
from fl_server.tracking import MlflowTracker
from standard_models.registry import get_task
from strategies.reports import FactoryOutcome, RoundRecord, RoundReport


def _instruction(task: str = "rul", epsilon: float = 8.0) -> TrainInstruction:
    return TrainInstruction(
        task=task, run_id="r", planned_rounds=2, local_epochs=1, batch_size=64, lr=0.05,
        momentum=0.9, dp=True, epsilon=epsilon, delta=1e-5, accountant="rdp",
        max_grad_norm=1.0, grad_sample_mode="bk", seed=0, server_round=1,
    )


def _site(budget: float, unit: str | None) -> FactorySite:
    return FactorySite("f1", Path("f1.parquet"), Path("f1.json"), budget, 1e-5,
                       privacy_unit=unit)


# -- the reply carries the facts ---------------------------------------------------------------
def test_reply_carries_budget_and_unit_through_its_record() -> None:
    reply = TrainReply("f1", DECLINED, "privacy policy: no", metrics={"epsilon": 1.5},
                       epsilon_budget=3.0, privacy_unit="machine", privacy_unit_rank=1)
    content = reply.to_record()
    assert content[REPLY_RECORD]["epsilon-budget"] == 3.0
    assert content[REPLY_RECORD]["privacy-unit"] == "machine"
    back = TrainReply.from_record(content)
    assert (back.epsilon_budget, back.privacy_unit, back.privacy_unit_rank) == (3.0, "machine", 1)
    # the server's view of any reply: the facts next to the reply's metrics
    assert reply_metrics(content) == {"epsilon": 1.5, EPSILON_BUDGET: 3.0, PRIVACY_UNIT_RANK: 1.0}


def test_a_reply_without_facts_still_parses() -> None:
    content = RecordDict(
        {
            REPLY_RECORD: ConfigRecord({"factory-id": "f1", "status": ACCEPTED, "reason": ""}),
            "arrays": ArrayRecord(),
            "metrics": MetricRecord({"num-examples": 3, "epsilon": 1.0}),
        }
    )
    reply = TrainReply.from_record(content)
    assert (reply.epsilon_budget, reply.privacy_unit, reply.privacy_unit_rank) == (None, "", None)
    assert reply_metrics(content) == {"num-examples": 3.0, "epsilon": 1.0}
    # the metric record Flower aggregates holds no fact, so replies keep identical keys
    with_facts = TrainReply("f1", ACCEPTED, arrays=ArrayRecord(), metrics={"num-examples": 3},
                            epsilon_budget=3.0, privacy_unit_rank=0).to_record()
    assert dict(with_facts["metrics"]) == {"num-examples": 3}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epsilon-budget", -1.0, "reply key 'epsilon-budget' must be a positive number, got -1.0"),
        ("epsilon-budget", "8", "reply key 'epsilon-budget' must be a positive number, got '8'"),
        ("privacy-unit-rank", -1, "reply key 'privacy-unit-rank' must be an integer >= 0"),
    ],
)
def test_malformed_facts_are_named(key: str, value: object, message: str) -> None:
    content = TrainReply("f1", DECLINED, "x").to_record()
    content[REPLY_RECORD][key] = value
    with pytest.raises(ProtocolError, match=message):
        TrainReply.from_record(content)
    assert EPSILON_BUDGET not in reply_metrics(content)
    assert PRIVACY_UNIT_RANK not in reply_metrics(content)


def test_factory_states_its_own_budget_and_unit() -> None:
    assert privacy_facts(_site(3.0, "machine"), _instruction()) == {
        "epsilon_budget": 3.0, "privacy_unit": "machine", "privacy_unit_rank": 1,
    }
    assert privacy_facts(_site(8.0, None), _instruction()) == {
        "epsilon_budget": 8.0, "privacy_unit": "window", "privacy_unit_rank": 0,
    }
    # no DP baseline: an infinite budget is no budget; an unknown unit is not stated
    assert privacy_facts(_site(math.inf, None), _instruction(epsilon=math.inf)) == {
        "privacy_unit": "window", "privacy_unit_rank": 0,
    }
    assert privacy_facts(_site(3.0, "shift"), _instruction()) == {"epsilon_budget": 3.0}
    assert privacy_facts(None, _instruction()) == {}


# -- the server records them -------------------------------------------------------------------
def _report(*outcomes: FactoryOutcome) -> RoundReport:
    report = RoundReport(1)
    for o in outcomes:
        report.add(o)
    return report


OWN = FactoryOutcome("f1", ACCEPTED, metrics={"epsilon": 1.0, EPSILON_BUDGET: 3.0,
                                              PRIVACY_UNIT_RANK: 1.0})
PLAIN = FactoryOutcome("f2", ACCEPTED, metrics={"epsilon": 1.0})
DECLARED = FactoryOutcome("f3", DECLINED, "privacy policy: x",
                          metrics={"epsilon": 2.5, EPSILON_BUDGET: 8.0, PRIVACY_UNIT_RANK: 0.0})


def test_epsilon_remaining_counts_against_the_factorys_own_budget() -> None:
    metrics = factory_metrics(_report(OWN, PLAIN, DECLARED), [], epsilon_budget=8.0)
    assert metrics["factory/f1/epsilon_remaining"] == 2.0  # its own 3, not the federation's 8
    assert metrics["factory/f2/epsilon_remaining"] == 7.0  # said nothing: the federation's
    assert metrics["factory/f3/epsilon_remaining"] == 5.5
    # the facts are constant over a run: params, not charts
    assert not [k for k in metrics if k.endswith(("epsilon_budget", "privacy_unit_rank"))]


def test_factory_privacy_names_the_unit_by_rank() -> None:
    facts = factory_privacy(_report(OWN, PLAIN, DECLARED), ("window", "machine"))
    assert facts == {
        "f1": {"unit": "machine", "choice": "coarser", "epsilon_budget": 3.0},
        "f3": {"unit": "window", "choice": "declared", "epsilon_budget": 8.0},
    }
    assert factory_privacy(_report(OWN), ("window",))["f1"]["unit"] == "unit #1"
    assert privacy_params("f1", facts["f1"]) == {
        "factory/f1/privacy_unit": "machine",
        "factory/f1/privacy_unit_choice": "coarser",
        "factory/f1/epsilon_budget": "3",
    }


def test_run_params_name_the_declared_unit() -> None:
    assert privacy_unit_params(get_task("rul")) == {
        "privacy_unit": "window",
        "privacy_unit_choice": "declared",
        "privacy_units_coarser": "machine",
    }
    assert privacy_unit_params(get_task("molding_quality"))["privacy_units_coarser"] == "none"


def test_recorder_logs_each_factorys_unit_as_params_once(tmp_path: Path) -> None:
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", str(tmp_path / "art"))
    run_id = tracker.start("r", privacy_unit_params(get_task("rul")), tags={})
    recorder = RoundRecorder(tracker, tmp_path / "out", run_id, 2, "rmse", epsilon_budget=8.0,
                             privacy_units=get_task("rul").unit_names())
    recorder.receive(RoundRecord(_report(OWN, PLAIN, DECLARED), epsilons={"f1": 1.0}))
    # a later round with another budget keeps the logged param (params cannot change) but
    # the summary's facts follow the latest reply
    later = FactoryOutcome("f1", ACCEPTED, metrics={"epsilon": 2.0, EPSILON_BUDGET: 2.5,
                                                    PRIVACY_UNIT_RANK: 1.0})
    recorder.receive(RoundRecord(_report(later), epsilons={"f1": 2.0}))
    params = MlflowClient(tracker.uri).get_run(run_id).data.params
    assert params["privacy_unit"] == "window"
    assert params["privacy_unit_choice"] == "declared"
    assert params["factory/f1/privacy_unit"] == "machine"
    assert params["factory/f1/privacy_unit_choice"] == "coarser"
    assert params["factory/f1/epsilon_budget"] == "3"
    assert params["factory/f3/privacy_unit"] == "window"
    assert "factory/f2/privacy_unit" not in params
    assert recorder.factory_privacy["f1"] == {"unit": "machine", "choice": "coarser",
                                              "epsilon_budget": 2.5}


# -- the description and the summary table print them ------------------------------------------
def _summary() -> dict:
    return {
        "run_name": "rul-run",
        "wall_seconds": 12.0,
        "main_metric": "rmse",
        "rounds": [{"round": 1, "rmse": 30.0, "loss": 0.1}],
        "test": {"rmse": 31.0, "loss": 0.1},
        "privacy": {"enabled": True, "epsilon": 8.0, "delta": 1e-5, "unit": "window",
                    "min_run_epsilon": 0.1},
        "epsilon_budget": 8.0,
        "factory_epsilon": {"f1": 2.9, "f2": 1.0},
        "factory_privacy": {"f1": {"unit": "machine", "choice": "coarser",
                                   "epsilon_budget": 3.0}},
        "factory_rounds": [{"round": 1, "status": {"f1": "accepted", "f2": "accepted"},
                            "epsilon": {"f1": 2.9, "f2": 1.0}, "contribution": {}}],
        "failures": [],
        "tracking_uri": "sqlite:///x.db",
        "mlflow_run_id": "abc",
    }


def test_description_counts_epsilon_left_of_the_factorys_own_budget() -> None:
    rows = {r.factory_id: r for r in factory_rows(_summary())}
    assert rows["f1"].epsilon_left == pytest.approx(0.1)
    assert rows["f1"].below_minimum is False and rows["f1"].privacy_unit == "machine"
    assert rows["f2"].epsilon_left == pytest.approx(7.0) and rows["f2"].own_budget is False
    assert rows["f2"].privacy_unit == "window"
    text = run_description(_summary())
    assert "| f1 | - | - | 2.900 per machine | 0.100 of its own 3 | 1 | none |" in text
    assert "| f2 | - | - | 1.000 | 7.000 | 1 | none |" in text
    # below its own minimum: it declines the next run
    low = _summary()
    low["factory_epsilon"]["f1"] = 2.95
    assert "0.050 of its own 3 (declines next run)" in run_description(low)


def test_summary_table_prints_each_factorys_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(record=True, width=80)
    monkeypatch.setattr(run_module, "console", console)
    cfg = run_module.OmegaConf.create({"tracking": {"artifact_root": "art"}})
    run_module.print_summary(_summary(), cfg)
    text = console.export_text()
    assert "privacy unit" in text and "epsilon per window (the task's privacy unit)" in text
    f1 = next(line for line in text.splitlines() if " f1 " in line)
    assert "machine" in f1 and "0.100 of own 3" in f1
    f2 = next(line for line in text.splitlines() if " f2 " in line)
    assert " window " in f2 and "7.000" in f2
    assert max(len(line) for line in text.splitlines()) <= 80


def test_summary_table_fits_80_columns_without_a_unit_column_when_all_use_the_declared_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    console = Console(record=True, width=80)
    monkeypatch.setattr(run_module, "console", console)
    cfg = run_module.OmegaConf.create({"tracking": {"artifact_root": "art"}})
    summary = _summary()
    for facts in summary["factory_privacy"].values():
        facts["unit"] = "window"
    summary["factory_epsilon"]["f1"] = 2.95
    run_module.print_summary(summary, cfg)
    text = console.export_text()
    header = next(line for line in text.splitlines() if "factory" in line and "share" in line)
    assert "unit" not in header
    f1 = next(line for line in text.splitlines() if " f1 " in line)
    assert "0.050 of own 3 *" in f1
    assert "* declines the" in text
    assert max(len(line) for line in text.splitlines()) <= 80
