"""MLflow's multi-user setup: ``mlflow server`` with a real PostgreSQL backend store.

A PostgreSQL server (the Debian ``postgresql`` package's binaries) is initialised in a temporary
folder and started on a free port of 127.0.0.1, password authentication only; the operator's
launcher (:func:`fl_server.launch.mlflow_server.start_mlflow`, what ``factoryfed deploy mlflow
--backend-store-uri postgresql://...`` runs) starts the tracking server on it, with artifacts
proxied through the server. A 2-factory, 2-round federation (the in-process runner, which runs
the project's ServerApp logic and ClientApp) logs into it. The MLflow client then finds the run,
its per-round metrics and the registered model (loaded back through the server), and SQL run
against PostgreSQL itself finds the same run and model version, so the records really live in
PostgreSQL. The server is stopped by its postmaster PID at the end.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user that the
Debian package creates. Without PostgreSQL the test is skipped with the install command; under
CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from ci_helpers import missing
from test_run_records import small_run_config

from fl_server.launch.mlflow_server import start_mlflow
from fl_server.launch.process import free_port, pid_alive

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

INSTALL = "apt-get install -y postgresql"
#: The Debian package's server binaries (PostgreSQL 15 on bookworm).
PG_ROOT = Path("/usr/lib/postgresql")
#: The run's overrides besides the tracking URI: 2 factories x 2 rounds, model registered.
OVERRIDES = ["federation.num_factories=2", "tracking.register_model=true"]


def postgres_bindir() -> Path:
    """The newest installed PostgreSQL server's ``bin`` folder (``initdb``, ``pg_ctl``...)."""
    candidates = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        missing(f"no PostgreSQL server under {PG_ROOT}/*/bin: {INSTALL}")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("the PostgreSQL driver psycopg is missing: pip install -e '.[postgres]'")
    return candidates[-1]


@dataclass
class Postgres:
    """A running PostgreSQL server on 127.0.0.1 and the ``mlflow`` database on it."""

    bindir: Path
    folder: Path
    port: int
    superuser_password: str
    user: str = "mlflow"
    password: str = ""
    database: str = "mlflow"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def uri(self) -> str:
        """The backend store URI MLflow is given (password inline, as an operator writes it)."""
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"
        )

    def postmaster_pid(self) -> int:
        """The server's PID, from the first line of ``postmaster.pid``."""
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def sql(self, statement: str, database: str = "postgres") -> list[list[str]]:
        """Rows of ``statement`` run by ``psql`` as the superuser (fields split on ``|``)."""
        out = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
                "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-c", statement,
            ],  # fmt: skip
            env={**os.environ, "PGPASSWORD": self.superuser_password, "PGCONNECT_TIMEOUT": "10"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, f"psql {statement!r}: {out.stderr}"
        return [line.split("|") for line in out.stdout.splitlines() if line]


def _as_server_user() -> dict:
    """``subprocess`` arguments that run PostgreSQL as a non-root user (it refuses root)."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        missing(f"running as root and there is no 'postgres' user to run the server: {INSTALL}")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@contextmanager
def postgres_server(bindir: Path) -> Iterator[Postgres]:
    """initdb in a fresh folder, ``pg_ctl start`` on a free port, stop by PID at the end.

    The folder comes from :func:`tempfile.mkdtemp` (not pytest's per-user tmp tree, which only
    root can enter) and is owned by the server's user.
    """
    folder = Path(tempfile.mkdtemp(prefix="factoryfed-postgres-"))
    run_as = _as_server_user()
    if run_as:
        os.chown(folder, run_as["user"], run_as["group"])
    pg = Postgres(bindir, folder, free_port(), secrets.token_urlsafe(16))
    pwfile = folder / "superuser-password"
    pwfile.write_text(pg.superuser_password + "\n")
    if run_as:
        os.chown(pwfile, run_as["user"], run_as["group"])
    pid: int | None = None
    try:
        subprocess.run(
            [
                str(bindir / "initdb"), "-D", str(pg.data), "-U", "postgres",
                "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
            ],  # fmt: skip
            cwd=folder,
            capture_output=True,
            check=True,
            timeout=120,
            **run_as,
        )
        pwfile.unlink()
        # Loopback TCP only; the Unix socket goes into the private folder, not /run/postgresql.
        options = f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {folder}"
        started = subprocess.run(
            [
                str(bindir / "pg_ctl"), "-D", str(pg.data), "-l", str(folder / "server.log"),
                "-o", options, "-w", "-t", "60", "start",
            ],  # fmt: skip
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            **run_as,
        )
        if (pg.data / "postmaster.pid").is_file():
            pid = pg.postmaster_pid()
        log = folder / "server.log"
        assert started.returncode == 0, (
            f"pg_ctl start: {started.stderr}\n{log.read_text() if log.is_file() else ''}"
        )
        pg.password = secrets.token_urlsafe(16)
        pg.sql(f"CREATE ROLE {pg.user} LOGIN PASSWORD '{pg.password}'")
        pg.sql(f"CREATE DATABASE {pg.database} OWNER {pg.user}")
        yield pg
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            deadline = time.monotonic() + 30
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def test_mlflow_server_on_postgresql_records_a_federation(tmp_path: Path) -> None:
    bindir = postgres_bindir()
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from experiments.inprocess import run_inprocess
    from fl_server.checkpoint import load_latest
    from fl_server.data import ensure_data
    from standard_models.registry import get_task

    with postgres_server(bindir) as pg:
        version = pg.sql("SHOW server_version")[0][0]
        with start_mlflow(tmp_path / "mlflow", port=None, backend_store_uri=pg.uri) as server:
            uri = server.info["uri"]
            cfg = small_run_config(tmp_path, "postgres", f"tracking.uri={uri}", *OVERRIDES)
            data_dir, _ = ensure_data(cfg)
            summary = run_inprocess(cfg, quiet=True)

            client = MlflowClient(tracking_uri=uri)
            run = client.get_run(summary["mlflow_run_id"])
            run_id = run.info.run_id
            assert run.info.status == "FINISHED"
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
            assert run.data.params["task.name"] == "molding_quality"
            assert run.data.params["federation.num_factories"] == "2"
            main = f"server/{summary['main_metric']}"
            assert sorted(m.step for m in client.get_metric_history(run_id, main)) == [0, 1, 2]
            factories = ("factory_000", "factory_001")
            for fid in factories:
                for name in ("epsilon", "train_loss", "num_examples", "contribution"):
                    history = client.get_metric_history(run_id, f"factory/{fid}/{name}")
                    assert sorted(m.step for m in history) == [1, 2], (fid, name)
            assert "factory/factory_002/participated" not in run.data.metrics

            # The registered model is the run's final global model, served back by the server.
            name = f"factoryfed-{cfg.task.name}"
            versions = client.search_model_versions(f"name='{name}'")
            assert [v.run_id for v in versions] == [run_id]
            mlflow.set_tracking_uri(uri)
            try:
                exported = mlflow.pytorch.load_model(f"models:/{name}/{versions[0].version}")
            finally:
                mlflow.set_tracking_uri(None)
            final = load_latest(Path(cfg.output_dir) / "checkpoints")
            assert final["round"] == 2
            model = get_task(cfg.task.name).build_model()
            model.load_state_dict(final["state_dict"])
            model.eval()
            task = get_task(cfg.task.name)
            validation = task.to_dataset(task.load_frame(data_dir / "validation.parquet"))
            x = torch.stack([validation[i][0] for i in range(16)])
            with torch.no_grad():
                assert torch.allclose(exported(x), model(x), atol=1e-5)

            # The same records, read from PostgreSQL itself.
            rows = pg.sql(
                f"SELECT status FROM runs WHERE run_uuid = '{run_id}'", database=pg.database
            )
            assert rows == [["FINISHED"]]
            rows = pg.sql(
                f"SELECT name, run_id FROM model_versions WHERE run_id = '{run_id}'",
                database=pg.database,
            )
            assert rows == [[name, run_id]]
            metric_rows = pg.sql(
                f"SELECT count(*) FROM metrics WHERE run_uuid = '{run_id}'", database=pg.database
            )
            assert int(metric_rows[0][0]) > 0
            log = server.log_text()
        assert pg.password not in log, "the MLflow server logged the database password"
        print(
            f"\n[postgres] PostgreSQL {version}: run {run_id} with "
            f"{metric_rows[0][0]} metric rows, model {name} v{versions[0].version}"
        )
