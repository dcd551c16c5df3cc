"""A 3-factory, 2-round federation through Flower's real runtime, checked in MLflow.

One factory's data file is corrupted: its error must reach the server and MLflow while the
other factories' round goes on.
"""

import json
import os
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.run import run_simulation
from fl_server.checkpoint import load_latest
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from fl_server.rewards.ledger import RewardLedger, verify_ledger
from standard_models.registry import get_task

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def _processes_in(folder) -> list[int]:
    """PIDs whose working directory is inside ``folder`` (the SuperLink runs in its home)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd").startswith(str(folder)):
                    out.append(int(entry))
            except OSError:
                pass
    return out


def test_federation_end_to_end(tmp_path):
    db = tmp_path / "mlflow.db"
    cfg = compose_config(
        [
            "federation.num_factories=3",
            "federation.num_rounds=2",
            "federation.min_factories=2",
            f"tracking.uri=sqlite:///{db}",
            f"data_root={tmp_path / 'data'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            "privacy.epsilon=4",
            "contribution=exact",
            "rewards=per_run",
            "rewards.amount=1001",
        ]
    )
    cfg = finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")
    data_dir, _ = ensure_data(cfg)
    (data_dir / "factory_002.parquet").write_bytes(b"not a parquet file")

    summary = run_simulation(cfg)

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert float(run.data.params["privacy.epsilon"]) == 4.0
    assert run.data.params["federation.num_factories"] == "3"

    main = f"server/{summary['main_metric']}"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, main)]
    assert sorted(steps) == [0, 1, 2]
    for fid in ("factory_000", "factory_001"):
        for name in (
            "epsilon",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "train_loss",
            "num_examples",
            "participated",
        ):
            history = client.get_metric_history(run.info.run_id, f"factory/{fid}/{name}")
            assert [m.step for m in history] == [1, 2], (fid, name)
        eps = [
            m.value for m in client.get_metric_history(run.info.run_id, f"factory/{fid}/epsilon")
        ]
        assert 0 < eps[0] < eps[1] <= 4.0
        ledger = json.loads((tmp_path / "out" / "privacy" / f"{fid}.json").read_text())
        assert ledger["factory_id"] == fid
    broken = client.get_metric_history(run.info.run_id, "factory/factory_002/failed")
    assert [m.value for m in broken] == [1.0, 1.0]
    participated = client.get_metric_history(run.info.run_id, "factory/factory_002/participated")
    assert [m.value for m in participated] == [0.0, 0.0]
    failures = summary["failures"]
    assert {f["status"] for f in failures} == {"data-error"}
    assert all("factory_002.parquet" in f["reason"] for f in failures)

    # Contributions of the two working factories, paid from the pool through the ledger.
    for fid in ("factory_000", "factory_001"):
        for name in ("contribution", "contribution_cumulative", "payout_cumulative"):
            history = client.get_metric_history(run.info.run_id, f"factory/{fid}/{name}")
            assert [m.step for m in history] == [1, 2], (fid, name)
    for name in ("contribution_evaluations", "contribution_seconds"):
        history = client.get_metric_history(run.info.run_id, f"server/{name}")
        assert [m.step for m in history] == [1, 2], name
    evaluations = client.get_metric_history(run.info.run_id, "server/contribution_evaluations")
    assert [m.value for m in evaluations] == [3.0, 3.0]  # exact over 2 players
    ledger_path = Path(summary["ledger"])
    assert verify_ledger(ledger_path, expected_head=summary["ledger_head"]).ok
    entries = RewardLedger(ledger_path).entries(run_id=summary["mlflow_run_id"])
    assert {e.factory_id for e in entries} == {"factory_000", "factory_001"}
    assert sum(e.payout for e in entries) + summary["reward_carry"] == 1001
    assert run.data.tags["ledger_head"] == summary["ledger_head"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "summary.json", "failures.json", "rewards"} <= artifacts
    versions = client.search_model_versions(f"name='factoryfed-{cfg.task.name}'")
    assert versions and versions[0].run_id == run.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    exported = mlflow.pytorch.load_model(
        f"models:/factoryfed-{cfg.task.name}/{versions[0].version}"
    )
    final = load_latest(tmp_path / "out" / "checkpoints")
    assert final["round"] == 2
    task = get_task(cfg.task.name)
    model = task.build_model()
    model.load_state_dict(final["state_dict"])
    model.eval()
    validation = task.to_dataset(task.load_frame(data_dir / "validation.parquet"))
    x = torch.stack([validation[i][0] for i in range(16)])
    with torch.no_grad():  # the registered model is the final global model
        assert torch.allclose(exported(x), model(x), atol=1e-5)
    assert (tmp_path / "out" / "checkpoints" / "round_0002.pt").exists()
    # The federation learned: the final model beats the untrained one (round 0) on the
    # validation set, and on the test set too.
    main = summary["main_metric"]
    assert summary["rounds"][0]["round"] == 0
    assert summary["rounds"][-1][main] > summary["rounds"][0][main]
    assert summary["test"][main] > summary["rounds"][0][main]
    # The SuperLink and every worker it started are gone (killed ones may take a moment to exit).
    deadline = time.monotonic() + 10
    while _processes_in(tmp_path / "out" / ".flwr") and time.monotonic() < deadline:
        time.sleep(0.5)
    leftover = _processes_in(tmp_path / "out" / ".flwr")
    assert leftover == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in leftover]
