"""A small federation in tests, and what a run with one broken factory must leave in MLflow.

The in-process runner (``tests/test_inprocess.py``) and Flower's simulation
(``tests/test_integration.py``) run the same 3-factory, 2-round federation in which
``factory_002``'s data file is corrupt; both must leave the same traces, checked here once:
per-round server and factory metrics, the broken factory's error, the factories' privacy
ledgers and the reward ledger.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from fl_server.rewards.ledger import RewardLedger, verify_ledger

#: The factory whose data file :func:`break_factory_data` corrupts, and the two that work.
BROKEN = "factory_002"
WORKING = ("factory_000", "factory_001")
#: The broken-factory run: epsilon 4, exact Shapley values, 1001 minor units paid at the end.
BROKEN_RUN = ("privacy.epsilon=4", "contribution=exact", "rewards=per_run", "rewards.amount=1001")


def small_run_config(
    tmp_path: Path, name: str, *overrides: str, task: str = "molding_quality"
) -> DictConfig:
    """A 3-factory, 2-round run of ``task`` named ``name``, its MLflow store, data and output
    folder (``tmp_path / name``) in ``tmp_path``; ``overrides`` come last."""
    cfg = compose_config(
        [
            f"task={task}",
            "federation.num_factories=3",
            "federation.num_rounds=2",
            "federation.min_factories=2",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            f"data_root={tmp_path / 'data'}",
            f"run_name={name}",
            *overrides,
        ]
    )
    return finalize(cfg, base=tmp_path, output_dir=tmp_path / name)


def break_factory_data(cfg: DictConfig) -> Path:
    """Write the run's data and corrupt :data:`BROKEN`'s file; returns the data folder."""
    data_dir, _ = ensure_data(cfg)
    (data_dir / f"{BROKEN}.parquet").write_bytes(b"not a parquet file")
    return data_dir


def check_run_with_a_broken_factory(
    client: MlflowClient,
    summary: dict,
    out_dir: Path,
    factory_metrics: Iterable[str],
    server_metrics: Iterable[str] = (),
) -> Run:
    """Check what a :data:`BROKEN_RUN` with :data:`BROKEN`'s data corrupt left; returns the
    MLflow run.

    The run finished; the main metric was logged for rounds 0-2 and ``server_metrics`` and
    every working factory's ``factory_metrics`` for rounds 1 and 2; a working factory's epsilon
    grew each round within the budget of 4 and its privacy ledger is in ``out_dir``; the
    broken factory failed in both rounds with a data error naming its file; the reward ledger
    verifies and paid the 1001 units to the working factories only; the config, summary,
    failures and rewards were logged as artifacts.
    """
    run = client.get_run(summary["mlflow_run_id"])
    run_id = run.info.run_id

    def steps(key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, key)]

    def values(key: str) -> list[float]:
        return [m.value for m in client.get_metric_history(run_id, key)]

    assert run.info.status == "FINISHED"
    assert run.data.params["federation.num_factories"] == "3"
    assert sorted(steps(f"server/{summary['main_metric']}")) == [0, 1, 2]
    for name in server_metrics:
        assert steps(f"server/{name}") == [1, 2], name
    for fid in WORKING:
        for name in factory_metrics:
            assert steps(f"factory/{fid}/{name}") == [1, 2], (fid, name)
        eps = values(f"factory/{fid}/epsilon")
        assert 0 < eps[0] < eps[1] <= 4.0
        privacy = json.loads((out_dir / "privacy" / f"{fid}.json").read_text())
        assert privacy["factory_id"] == fid
    assert values(f"factory/{BROKEN}/failed") == [1.0, 1.0]
    failures = summary["failures"]
    assert {f["status"] for f in failures} == {"data-error"}
    assert all(f"{BROKEN}.parquet" in f["reason"] for f in failures)
    assert {f["factory"] for f in failures} == {BROKEN}

    assert verify_ledger(summary["ledger"], expected_head=summary["ledger_head"]).ok
    entries = RewardLedger(summary["ledger"]).entries(run_id=summary["mlflow_run_id"])
    assert {e.factory_id for e in entries} == set(WORKING)
    assert sum(e.payout for e in entries) + summary["reward_carry"] == 1001
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "summary.json", "failures.json", "rewards"} <= artifacts
    return run
