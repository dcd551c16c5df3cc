"""A 3-factory, 2-round federation through Flower's real runtime, checked in MLflow.

One factory's data file is corrupted: its error must reach the server and MLflow while the
other factories' round goes on.
"""

import os
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from run_helpers import (
    BROKEN_RUN,
    break_factory_data,
    check_run_with_a_broken_factory,
    small_run_config,
)

from experiments.run import run_simulation
from fl_server.checkpoint import load_latest
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
    cfg = small_run_config(tmp_path, "out", *BROKEN_RUN, task="tep_fault")
    data_dir = break_factory_data(cfg)

    summary = run_simulation(cfg)

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = check_run_with_a_broken_factory(
        client,
        summary,
        tmp_path / "out",
        factory_metrics=(
            "epsilon",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "train_loss",
            "num_examples",
            "participated",
            # Contributions of the two working factories, paid from the pool through the ledger.
            "contribution",
            "contribution_cumulative",
            "payout_cumulative",
        ),
        server_metrics=("contribution_evaluations", "contribution_seconds"),
    )
    assert float(run.data.params["privacy.epsilon"]) == 4.0
    participated = client.get_metric_history(run.info.run_id, "factory/factory_002/participated")
    assert [m.value for m in participated] == [0.0, 0.0]
    evaluations = client.get_metric_history(run.info.run_id, "server/contribution_evaluations")
    assert [m.value for m in evaluations] == [3.0, 3.0]  # exact over 2 players
    assert run.data.tags["ledger_head"] == summary["ledger_head"]

    versions = client.search_model_versions(f"name='factoryfed-{cfg.task.name}'")
    assert versions and versions[0].run_id == run.info.run_id
    mlflow.set_tracking_uri(cfg.tracking.uri)
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
