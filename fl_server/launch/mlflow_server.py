"""The operator's MLflow tracking server, and the experiment the runs log into."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_server.launch.process import Handle, LaunchError, bind_port, child_env, spawn_healthy

DEFAULT_MLFLOW_PORT = 5000


def start_mlflow(
    home: str | Path,
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_MLFLOW_PORT,
    *,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    allowed_hosts: Sequence[str] = (),
    experiment: str | None = "factoryfed",
    workers: int = 1,
    ready_timeout: float = 90.0,
    extra_env: Mapping[str, str] | None = None,
) -> Handle:
    """Start an MLflow tracking server; returns once it answers, with ``info["uri"]``.

    ``backend_store_uri`` defaults to ``sqlite:///<home>/mlflow.db``; PostgreSQL is
    ``postgresql://user:password@db:5432/mlflow`` (needs ``psycopg2`` in the image).
    Artifacts are served by the server itself (proxied, ``mlflow-artifacts:/``) from
    ``artifacts_destination`` (default ``<home>/artifacts``; ``s3://...`` works too), so
    the ServerApp uploads them over HTTP instead of writing into a local folder.

    ``experiment`` (default ``factoryfed``, the config's ``tracking.experiment``) is created
    on the server if missing, with the server's proxied artifact location. The ServerApp would
    otherwise create it with the local ``tracking.artifact_root`` folder of the machine it
    runs on, which the MLflow server cannot serve.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port, address = bind_port(host, port)
    backend = backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = artifacts_destination or str(home / "artifacts")
    env = child_env()
    env.pop("FLWR_HOME", None)  # the quiet flags and PATH only
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else TERM orphans job workers
    env.update(extra_env or {})
    cmd = [
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(int(workers)),
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", ",".join(allowed_hosts)]
    uri = f"http://{address}"
    handle = spawn_healthy(
        "mlflow",
        cmd,
        env,
        home,
        home / "mlflow.log",
        f"{uri}/health",
        timeout=ready_timeout,
        what=f"mlflow server ({uri})",
        info={"uri": uri},
    )
    if experiment:
        try:
            ensure_experiment(uri, experiment)
        except BaseException as exc:
            handle.stop()
            if isinstance(exc, Exception):
                raise LaunchError(f"creating experiment {experiment!r} on {uri}: {exc}") from exc
            raise
    return handle


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` on the tracking server, created with its defaults."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)
