"""A server killed mid-run resumes: same run, same weights, no round paid twice, no DP reset."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.inprocess import InProcessGrid, server_identity
from fl_client.client_app import app as client_app
from fl_server.checkpoint import load_latest
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from fl_server.rewards.ledger import RewardLedger, verify_ledger
from fl_server.server_app import resumable_state, run_federation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class ServerKilled(Exception):
    """Stands in for the operator's server process dying."""


class CrashingGrid(InProcessGrid):
    """Delivers round ``crash_round``'s training to every factory, then dies before replying."""

    def __init__(self, *args, crash_round: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round
        self.train_rounds = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
            if self.train_rounds == self.crash_round:
                super().send_and_receive(messages, timeout=timeout)  # factories spent epsilon
                raise ServerKilled(f"server killed in round {self.crash_round}")
        return super().send_and_receive(messages, timeout=timeout)


def _run(cfg, grid_cls=InProcessGrid, **grid_kwargs):
    out, data_dir = cfg.output_dir, cfg.data_dir
    grid = grid_cls(
        client_app,
        int(cfg.federation.num_factories),
        {"data-dir": str(data_dir), "output-dir": str(out)},
        seed=int(cfg.seed),
        **grid_kwargs,
    )
    with server_identity(grid.run.run_id):
        return run_federation(grid, cfg)


def _spend(out):
    ledgers = {}
    for path in sorted((out / "privacy").glob("*.json")):
        doc = json.loads(path.read_text())
        ledgers[path.stem] = doc
    return ledgers


def test_killed_server_resumes_without_double_pay_or_privacy_reset(tmp_path):
    db = tmp_path / "mlflow.db"
    cfg = compose_config(
        [
            "task=molding_quality",
            "federation.num_factories=3",
            "federation.num_rounds=4",
            "contribution=exact",
            "rewards=per_round",
            "rewards.amount=300",
            "privacy.epsilon=6",
            f"tracking.uri=sqlite:///{db}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            "tracking.register_model=false",
            f"data_root={tmp_path / 'data'}",
        ]
    )
    cfg = finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")
    ensure_data(cfg)
    out = tmp_path / "out"

    with pytest.raises(ServerKilled):
        _run(cfg, CrashingGrid, crash_round=3)
    state, checkpoint = resumable_state(out)
    assert checkpoint["round"] == 2
    ledger = RewardLedger(out / "reward-ledger.sqlite")
    assert ledger.rounds(state["mlflow_run_id"]) == {1, 2}
    before = _spend(out)
    crashed_eps = {fid: doc for fid, doc in before.items()}
    assert all(len(doc["rounds"]) == 3 for doc in crashed_eps.values())  # round 3 was reserved

    summary = _run(cfg)  # the restarted server, same output folder

    run_id = summary["mlflow_run_id"]
    assert run_id == state["mlflow_run_id"]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3, 4]
    # Resumed from the round-2 checkpoint's weights: its metrics are the history's round 2.
    assert summary["rounds"][2]["loss"] == pytest.approx(checkpoint["metrics"]["loss"])
    final = load_latest(out / "checkpoints")
    assert final["round"] == 4

    # Every round paid exactly once; the chain verifies against the head MLflow keeps.
    entries = ledger.entries(run_id=run_id)
    per_round = {}
    for e in entries:
        per_round.setdefault(e.round, []).append(e.factory_id)
    assert sorted(per_round) == [1, 2, 3, 4]
    assert all(len(f) == len(set(f)) for f in per_round.values())
    assert sum(e.payout for e in entries) + summary["reward_carry"] == 4 * 300
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert verify_ledger(out / "reward-ledger.sqlite", run.data.tags["ledger_head"]).ok
    steps = [m.step for m in client.get_metric_history(run_id, "server/pr_auc")]
    assert set(steps) == {0, 1, 2, 3, 4}

    # Privacy: every factory's ledger kept the crashed round's spend and went on from it.
    # The retried round 3 is charged again (its noise is fresh), which costs the budget of the
    # planned last round: each factory then declines round 4 rather than overspend.
    after = _spend(out)
    declined = {
        (f["round"], f["factory"]) for f in summary["failures"] if f["status"] == "declined"
    }
    for fid, doc in after.items():
        rounds = [r["round"] for r in doc["rounds"]]
        assert rounds[:4] == [1, 2, 3, 3], (fid, rounds)
        assert rounds[4:] == [4] or (4, fid) in declined, (fid, rounds, declined)
        assert 0 < summary["factory_epsilon"][fid] <= 6.0 + 1e-9
    # The resumed run's first round started from the checkpoint, not from a fresh model.
    fresh = torch.load(out / "checkpoints" / "round_0000.pt", weights_only=True)["metrics"]
    assert summary["rounds"][0]["loss"] == pytest.approx(fresh["loss"])

    # The folder now holds a finished run: neither the ServerApp nor the main job's launcher
    # (which clears the old summary before a run) may take it for an interrupted one.
    from experiments.run import run_simulation

    with pytest.raises(RuntimeError, match="holds a finished run"):
        resumable_state(out)
    with pytest.raises(RuntimeError, match="holds a finished run"):
        run_simulation(cfg)
    assert (out / "summary.json").exists()
