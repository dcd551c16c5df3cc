"""Slower end-to-end checks through Flower's real runtime (run in CI by `make test-slow`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from experiments.run import FederationFailed, run_simulation
from fl_common.env import QUIET_ENV
from fl_server.checkpoint import load_run_state
from fl_server.config import compose_config, finalize

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, *overrides, output="out"):
    cfg = compose_config(
        [
            "federation.num_factories=2",
            "federation.min_factories=1",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            f"data_root={tmp_path / 'data'}",
            "tracking.register_model=false",
            *overrides,
        ]
    )
    return finalize(cfg, base=tmp_path, output_dir=tmp_path / output)


@pytest.mark.timeout(600)
def test_budget_spent_in_an_earlier_run_counts(tmp_path):
    """A second run on the same privacy ledgers finds the budget spent and declines."""
    cfg = _cfg(
        tmp_path, "task=rul", "strategy=fedprox", "federation.num_rounds=2", "privacy.epsilon=2"
    )
    first = run_simulation(cfg)
    assert set(first["factory_epsilon"]) == {"factory_000", "factory_001"}
    assert all(0 < e <= 2.0 for e in first["factory_epsilon"].values())
    ledgers = {
        p.stem: json.loads(p.read_text()) for p in (tmp_path / "out" / "privacy").glob("*.json")
    }
    assert len(ledgers) == 2

    # The next federation has its own output folder; the factories bring their privacy ledgers.
    cfg = _cfg(
        tmp_path,
        "task=rul",
        "strategy=fedprox",
        "federation.num_rounds=2",
        "privacy.epsilon=2",
        output="out2",
    )
    shutil.copytree(tmp_path / "out" / "privacy", tmp_path / "out2" / "privacy")
    # Every factory declines every round, so the run trains nothing: that is a failed run.
    with pytest.raises(FederationFailed):
        run_simulation(cfg)
    state = load_run_state(tmp_path / "out2")
    statuses = {f["status"] for f in state["failures"]}
    assert statuses == {"declined"}
    assert len(state["failures"]) == 2 * 2  # both factories, both rounds
    # Nothing was aggregated: the global model stayed at its initial evaluation.
    scores = [r[first["main_metric"]] for r in state["history"]]
    assert len(scores) == 3 and scores[0] == scores[1] == scores[2]
    # No factory spent anything more than its budget allowed in the first run.
    after = {
        p.stem: json.loads(p.read_text()) for p in (tmp_path / "out2" / "privacy").glob("*.json")
    }
    assert {k: v["rounds"] for k, v in after.items()} == {
        k: v["rounds"] for k, v in ledgers.items()
    }
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "no round accepted an update" in run.data.tags["failure_reason"]
    declined = client.get_metric_history(run.info.run_id, "factory/factory_000/declined")
    assert [m.value for m in declined] == [1.0, 1.0]


@pytest.mark.timeout(600)
def test_hydra_multirun_sweep(tmp_path):
    """`python -m experiments.run --multirun privacy.epsilon=1,8` runs one federation each."""
    env = {**os.environ, **QUIET_ENV}
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--multirun",
        "task=molding_quality",
        "privacy.epsilon=1,8",
        "federation.num_factories=2",
        "federation.num_rounds=1",
        "federation.min_factories=1",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_root={tmp_path / 'artifacts'}",
        f"data_root={tmp_path / 'data'}",
        "tracking.register_model=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [
        json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))
    ]
    assert len(summaries) == 2
    budgets = sorted(s["epsilon_budget"] for s in summaries)
    assert budgets == [1.0, 8.0]
    for s in summaries:
        assert all(0 < e <= s["epsilon_budget"] for e in s["factory_epsilon"].values())
    runs = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [
            MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
            .get_experiment_by_name("factoryfed")
            .experiment_id
        ]
    )
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
