"""The round recorder on a real MLflow store and ledger, without a Flower runtime."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from fl_common.protocol import ACCEPTED, DECLINED, ERROR, REJECTED
from fl_server.checkpoint import load_latest, load_run_state
from fl_server.config import compose_config
from fl_server.recorder import RoundRecorder, factory_metrics
from fl_server.rewards.allocation import RewardPolicy
from fl_server.rewards.desk import PayoutDesk
from fl_server.rewards.ledger import RewardLedger
from fl_server.tracking import MlflowTracker
from strategies.client_dp import client_dp_budget
from strategies.contribution.scorer import RoundContribution
from strategies.reports import FactoryOutcome, RoundRecord, RoundReport

STATE = {"w": torch.zeros(2, 2)}


def _scores(f1: float) -> dict[str, float]:
    return {"macro_f1": f1, "loss": 1.0 - f1}


def _record(server_round: int, outcomes: list[FactoryOutcome], scores=None) -> RoundRecord:
    report = RoundReport(server_round)
    for o in outcomes:
        report.add(o)
    contribution = (
        RoundContribution(server_round, "gtg", scores, 6, 0.2, 0.3, permutations=4)
        if scores
        else None
    )
    accepted = tuple(f for f in report.outcomes if report.outcomes[f].status == ACCEPTED)
    epsilons = {
        f: o.metrics["epsilon"] for f, o in report.outcomes.items() if "epsilon" in o.metrics
    }
    return RoundRecord(report, contribution, accepted, epsilons)


@pytest.fixture
def run(tmp_path: Path):
    """A real MLflow run in a fresh sqlite store, a real ledger, and the recorder over them."""
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", str(tmp_path / "art"))
    run_id = tracker.start("r", {"seed": "0"}, tags={})
    desk = PayoutDesk(RewardPolicy(90, "per_round"), tmp_path / "ledger.sqlite", run_id)
    options = compose_config(["client_dp=fixed"]).client_dp
    budget = client_dp_budget(options, int(compose_config([]).federation.num_factories))
    recorder = RoundRecorder(
        tracker,
        tmp_path / "out",
        run_id,
        2,
        "macro_f1",
        desk=desk,
        client_dp_budget=budget,
        epsilon_budget=8.0,
    )
    return tracker, recorder, MlflowClient(tracker.uri)


def _keys(client: MlflowClient, run_id: str) -> set[str]:
    return set(client.get_run(run_id).data.metrics)


def _failures(client: MlflowClient, run_id: str, tmp_path: Path) -> list[dict]:
    path = client.download_artifacts(run_id, "failures.json", str(tmp_path))
    return json.loads(Path(path).read_text())


def test_a_round_is_named_paid_and_checkpointed(run, tmp_path):
    tracker, recorder, client = run
    recorder.record(0, _scores(0.1), STATE)  # the initial model: central metrics only
    assert _keys(client, tracker.run_id) == {
        "server/macro_f1", "server/loss", "server/epsilon_client_level", "dashboard/macro_f1",
    }  # fmt: skip
    recorder.receive(
        _record(
            1,
            [
                FactoryOutcome(
                    "f0", ACCEPTED, metrics={"num-examples": 10, "epsilon": 1.5, "delta": 1e-5}
                ),
                FactoryOutcome(
                    "f1", ACCEPTED, metrics={"num-examples": 20, "epsilon": 2.5, "dp": 1}
                ),
                FactoryOutcome("f2", DECLINED, "budget", metrics={"epsilon": 8.0}),
            ],
            scores={"f0": 0.25, "f1": 0.75},
        )
    )
    recorder.record(1, _scores(0.5), STATE)
    per_factory = {
        f"factory/{f}/{m}"
        for f in ("f0", "f1", "f2")
        for m in ("participated", "rejected", "declined", "failed", "epsilon", "epsilon_remaining")
    }
    per_factory |= {f"factory/{f}/num_examples" for f in ("f0", "f1")}
    per_factory |= {
        f"factory/{f}/{m}"
        for f in ("f0", "f1")
        for m in ("contribution", "contribution_cumulative", "payout", "payout_cumulative")
    }
    server = {
        "server/macro_f1", "server/loss", "server/epsilon_client_level", "server/accepted",
        "server/round_seconds", "server/epsilon_max", "server/contribution_evaluations",
        "server/contribution_seconds", "server/contribution_grand_utility",
        "server/contribution_permutations", "server/contribution_truncated",
        "server/payout_round", "server/payout_total", "server/reward_carry",
        "server/rejected", "server/declined", "server/failed",
    }  # fmt: skip
    health = {f"dashboard/{m}" for m in ("accepted", "macro_f1", "epsilon_max", "round_seconds")}
    # delta and dp are constant over a run: params, not charts
    assert _keys(client, tracker.run_id) == per_factory | server | health
    metrics = client.get_run(tracker.run_id).data.metrics
    assert metrics["server/epsilon_max"] == metrics["dashboard/epsilon_max"] == 8.0
    assert metrics["dashboard/accepted"] == metrics["server/accepted"] == 2.0
    assert (metrics["server/declined"], metrics["server/rejected"]) == (1.0, 0.0)
    assert metrics["factory/f0/epsilon_remaining"] == 6.5
    assert metrics["factory/f2/epsilon_remaining"] == 0.0
    assert metrics["server/payout_round"] == 0.9  # 90 cents, in major units
    assert metrics["factory/f2/declined"] == 1.0
    # failures.json is recorded whenever a round has one
    assert _failures(client, tracker.run_id, tmp_path / "a") == [
        {"round": 1, "factory": "f2", "status": "declined", "reason": "budget"}
    ]
    tags = client.get_run(tracker.run_id).data.tags
    assert tags["ledger_head"] == recorder.desk.ledger.head()
    assert load_latest(recorder.out_dir / "checkpoints")["round"] == 1
    state = load_run_state(recorder.out_dir)
    assert [h["round"] for h in state["history"]] == [0, 1]
    assert state["factory_rounds"] == [
        {
            "round": 1,
            "status": {"f0": "accepted", "f1": "accepted", "f2": "declined"},
            "epsilon": {"f0": 1.5, "f1": 2.5, "f2": 8.0},
            "contribution": {"f0": 0.25, "f1": 0.75},
        }
    ]
    assert recorder.accepted_updates() == 2
    assert recorder.factory_epsilon == {"f0": 1.5, "f1": 2.5, "f2": 8.0}


def test_failures_json_is_logged_even_when_empty(run, tmp_path):
    tracker, recorder, client = run
    recorder.receive(_record(1, [FactoryOutcome("f0", ACCEPTED, metrics={"num-examples": 1})]))
    recorder.record(1, _scores(0.4), STATE)
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert "failures.json" not in artifacts  # nothing failed yet, nothing said yet
    recorder.log_failures()  # the end of the run
    assert _failures(client, tracker.run_id, tmp_path / "c") == []


def test_each_written_round_calls_back(run):
    _, recorder, _ = run
    seen: list[int] = []
    recorder.on_round = seen.append
    recorder.record(0, _scores(0.1), STATE)
    recorder.receive(_record(1, [FactoryOutcome("f0", DECLINED, "budget")]))
    recorder.record(1, _scores(0.1), STATE)
    assert seen == [0, 1]
    assert recorder.accepted_updates() == 0


def test_failures_accumulate_and_each_round_is_paid_once(run, tmp_path):
    tracker, recorder, client = run
    f0 = FactoryOutcome("f0", ACCEPTED, metrics={"num-examples": 10})
    for server_round, failed, f1 in (
        (1, FactoryOutcome("f1", REJECTED, "NaN"), 0.4),
        (2, FactoryOutcome("f3", ERROR, "crash"), 0.6),
    ):
        last = _record(server_round, [f0, failed], scores={"f0": 1.0})
        recorder.receive(last)
        recorder.record(server_round, _scores(f1), STATE)
    failures = _failures(client, tracker.run_id, tmp_path / "b")
    assert [(f["round"], f["factory"], f["status"]) for f in failures] == [
        (1, "f1", "rejected"),
        (2, "f3", "error"),
    ]
    # A factory seen once stays on the charts: f1 did not answer round 2.
    history = client.get_metric_history(tracker.run_id, "factory/f1/participated")
    assert [(m.step, m.value) for m in history] == [(1, 0.0), (2, 0.0)]

    # A restarted server resumes after round 2 and replays it: recorded and paid once.
    ledger_path = recorder.desk.path
    again = RoundRecorder(
        tracker,
        recorder.out_dir,
        tracker.run_id,
        3,
        "macro_f1",
        desk=PayoutDesk(recorder.desk.policy, ledger_path, tracker.run_id),
        history=recorder.history,
        failures=recorder.failures,
        resumed_round=2,
        factory_rounds=load_run_state(recorder.out_dir)["factory_rounds"],
    )
    again.record(2, _scores(0.6), STATE)  # the evaluation of the checkpoint resumed from
    again.desk.settle(2, last.contribution, {})  # a settle of round 2, paid already, pays nothing
    ledger = RewardLedger(ledger_path)
    assert ledger.rounds(tracker.run_id) == {1, 2}
    assert [e.payout for e in ledger.entries(run_id=tracker.run_id)] == [90, 90]
    assert again.factory_rounds == recorder.factory_rounds  # the history survives a restart
    assert len(client.get_metric_history(tracker.run_id, "server/macro_f1")) == 2


def test_a_record_of_another_round_is_refused(run):
    _, recorder, _ = run
    recorder.receive(_record(3, [FactoryOutcome("f0", ACCEPTED)]))
    with pytest.raises(RuntimeError, match="round 2 evaluated with the record of round 3"):
        recorder.record(2, _scores(0.5), STATE)


def test_report_metrics_name_every_known_factory():
    report = RoundReport(3)
    report.add(FactoryOutcome("f0", ACCEPTED, metrics={"num-examples": 10, "epsilon": 1.5}))
    report.add(FactoryOutcome("f1", DECLINED, "budget", metrics={"epsilon": 8.0}))
    report.add(FactoryOutcome("f2", REJECTED, "NaN"))
    out = factory_metrics(report, {"f0", "f1", "f2", "f3"}, epsilon_budget=8.0)
    assert out["factory/f0/participated"] == 1.0
    assert out["factory/f0/num_examples"] == 10.0
    assert out["factory/f0/epsilon"] == 1.5
    assert out["factory/f1/declined"] == 1.0 and out["factory/f1/participated"] == 0.0
    assert out["factory/f1/epsilon"] == 8.0
    assert out["factory/f2/rejected"] == 1.0
    assert out["factory/f3/participated"] == 0.0  # absent this round, still visible
    assert out["factory/f0/epsilon_remaining"] == 6.5
    assert "factory/f3/epsilon_remaining" not in out  # no spend reported, nothing to say


def test_guard_findings_name_what_grouped_a_factory_and_which_pairs_were_paid_apart():
    """A pair flagged by its updates but cleared by its record sketches is recorded as cleared
    and does not count as found by updates for a group it is not in."""
    import dataclasses

    from fl_server.recorder import guard_tags

    contribution = RoundContribution(
        2,
        "exact",
        {"a": 0.1, "b": 0.1, "c": 0.2, "d": 0.2},
        6,
        0.2,
        0.3,
        withheld=(),
        groups=(("a", "b"),),
        alignment={f: 5.0 for f in "abcd"},
        noise_z={f: 5.0 for f in "abcd"},
        pairs=(("a", "b"), ("c", "d")),
        record_groups=(),
        sketched=tuple("abcd"),
        cleared=(("c", "d"),),
    )
    tags = guard_tags(contribution)
    assert tags == {
        "factory/a/duplicate_group": "a,b",
        "factory/a/duplicate_by": "updates",
        "factory/b/duplicate_group": "a,b",
        "factory/b/duplicate_by": "updates",
    }
    record = _record(2, [FactoryOutcome(f, ACCEPTED) for f in "abcd"])
    record = dataclasses.replace(record, contribution=contribution)
    row = RoundRecorder.factory_round(record)
    assert row["cleared_pairs"] == [["c", "d"]] and row["duplicate_pairs"] == [
        ["a", "b"],
        ["c", "d"],
    ]
