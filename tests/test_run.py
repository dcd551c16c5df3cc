"""The main job fails fast and clearly, and never shares an output folder with another run.

The subprocess tests start ``python -m experiments.run`` as a user does and check what the user
sees: the exit status, one line on stderr without a traceback, and that nothing expensive
(data, MLflow database, Flower) was started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fl_server.config import CONF_DIR
from fl_server.rundir import RunDirInUse, run_dir_lock, server_run_dir_lock

ROOT = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HYDRA_FULL_ERROR": "0",
}


# --- the output folder lock ------------------------------------------------------------------


def test_a_folder_in_use_is_refused_with_one_line(tmp_path):
    with run_dir_lock(tmp_path / "run"):
        with pytest.raises(RunDirInUse, match=r"run is in use by another run \(pid \d+\)"):
            with run_dir_lock(tmp_path / "run"):
                pass
    with run_dir_lock(tmp_path / "run"):  # free again once the first run ended
        pass


def test_another_process_holding_the_folder_is_seen(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from fl_server.rundir import run_dir_lock
                with run_dir_lock({str(tmp_path)!r}):
                    print("held", flush=True)
                    sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=rf"pid {holder.pid}\)"):
            with run_dir_lock(tmp_path):
                pass
    finally:
        holder.communicate("\n", timeout=30)
    with run_dir_lock(tmp_path):  # the lock went with the process
        pass


def test_the_serverapp_runs_under_its_launchers_lock_only(tmp_path):
    config = tmp_path / "config.yaml"
    with run_dir_lock(tmp_path, for_config=config):
        with server_run_dir_lock(tmp_path, str(config)):
            pass  # the launcher's own ServerApp: no deadlock, no refusal
        with pytest.raises(RunDirInUse):
            with server_run_dir_lock(tmp_path, str(tmp_path / "other.yaml")):
                pass
    # Started on its own (flwr run), the ServerApp takes the lock itself.
    with server_run_dir_lock(tmp_path, str(config)):
        with pytest.raises(RunDirInUse):
            with run_dir_lock(tmp_path):
                pass


def test_runs_started_in_the_same_second_get_their_own_folders():
    def run_dir() -> str:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", return_hydra_config=True)
        return str(cfg.hydra.run.dir), str(cfg.hydra.sweep.dir)

    first, second = run_dir(), run_dir()
    assert first[0] != second[0] and first[1] != second[1]


# --- what a user sees ------------------------------------------------------------------------


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"data_root={tmp_path / 'data'}",
            f"hydra.run.dir={tmp_path / 'out'}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=120,
    )


def _one_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["task.train.lr=abc"], "task.train.lr"),
        (["federation.num_rounds=0"], "federation.num_rounds"),
        (["strategy=bulyan", "federation.num_factories=2"], "federation.num_factories"),
    ],
)
def test_a_bad_config_stops_before_anything_starts(tmp_path, overrides, key):
    result = _run(tmp_path, *overrides)
    assert result.returncode == 2
    assert _one_line(result).startswith(f"factoryfed: error: config {key}=")
    assert not (tmp_path / "data").exists()  # no data generated
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run created
    assert not (tmp_path / "out" / "flower.log").exists()  # Flower never started


def test_an_unreachable_tracking_server_stops_the_run_at_once(tmp_path):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = _run(tmp_path, f"tracking.uri={uri}")
    assert result.returncode == 1
    assert f"MLflow tracking server {uri} is not reachable" in _one_line(result)
    assert not (tmp_path / "data").exists()


def test_a_corrupt_file_of_ones_own_is_named_in_one_line(tmp_path):
    from standard_models import PartitionConfig
    from standard_models.datafiles import make_federated_data

    own = tmp_path / "own"
    make_federated_data("molding_quality", 3, 0, PartitionConfig(scheme="iid"), own)
    (own / "validation.parquet").write_bytes(b"PAR1 truncated")
    result = _run(tmp_path, "task=molding_quality", "federation.num_factories=3", f"data_dir={own}")
    assert result.returncode == 1
    line = _one_line(result)
    assert str(own / "validation.parquet") in line and "unreadable Parquet" in line
    assert not (tmp_path / "mlflow.db").exists()


# --- the MLflow run is never left RUNNING ----------------------------------------------------


def _crashed_run(tmp_path: Path, data_dir: Path):
    """A folder holding the state of a crashed run whose MLflow run is still RUNNING."""
    from mlflow.tracking import MlflowClient

    from fl_server.checkpoint import save_run_state
    from fl_server.config import compose_config, finalize
    from fl_server.tracking import MlflowTracker

    cfg = finalize(
        compose_config(
            [
                "task=molding_quality",
                "federation.num_factories=3",
                f"data_dir={data_dir}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            ]
        ),
        base=tmp_path,
        output_dir=tmp_path / "out",
    )
    tracker = MlflowTracker(cfg.tracking.uri, "factoryfed", str(tmp_path / "art"))
    run_id = tracker.start("crashed", {}, {})
    (tmp_path / "out").mkdir()
    save_run_state(tmp_path / "out", {"mlflow_run_id": run_id, "history": [], "failures": []})
    return cfg, run_id, MlflowClient(tracking_uri=cfg.tracking.uri)


def test_a_failing_restart_ends_the_mlflow_run_failed(tmp_path):
    from experiments.run import run_simulation

    cfg, run_id, client = _crashed_run(tmp_path, tmp_path / "missing-data")
    with pytest.raises(FileNotFoundError, match="missing-data"):
        run_simulation(cfg)
    assert client.get_run(run_id).info.status == "FAILED"


def test_an_interrupted_run_ends_the_mlflow_run_killed(tmp_path, monkeypatch):
    import fl_server.data
    from experiments.run import run_simulation

    cfg, run_id, client = _crashed_run(tmp_path, tmp_path / "data")

    def interrupted(cfg):
        raise KeyboardInterrupt  # Ctrl-C while the run prepares its data

    monkeypatch.setattr(fl_server.data, "ensure_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_simulation(cfg)
    assert client.get_run(run_id).info.status == "KILLED"
