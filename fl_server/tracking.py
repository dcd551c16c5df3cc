"""MLflow tracking for a federation run: params, config, batched per-round metrics, the model.

One MLflow run per federation run. Metrics are sent with ``MlflowClient.log_batch`` once per
round (one call instead of hundreds), named ``server/<metric>`` for central evaluation and
``factory/<id>/<metric>`` for per-factory values, with step = round number.

MLflow is imported where it is used, so :func:`check_tracking` can run before a run starts
without paying for MLflow's import.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
_PARAM_MAX_LEN = 6000
#: Seconds the reachability check waits for a tracking server (MLflow's own client would retry
#: for minutes: MLFLOW_HTTP_REQUEST_MAX_RETRIES x MLFLOW_HTTP_REQUEST_TIMEOUT).
CHECK_TIMEOUT = 5.0


#: The run tag MLflow shows as the run's description (markdown) on its overview page.
NOTE_TAG = "mlflow.note.content"
#: The experiment tag that tells MLflow's UI what kind of experiment this is; with
#: ``custom_model_development`` it opens on runs and metrics, not on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be used; the message is one line naming the URI."""


def _local_path(uri: str) -> Path | None:
    """The file or folder a local tracking URI writes to (None for remote stores)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db and sqlite:////absolute.db (SQLAlchemy's spelling)
        return Path(uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else parsed.path)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def check_tracking(uri: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Refuse a tracking URI that a run could not write to, in seconds rather than minutes.

    ``http(s)://``: the server must answer its ``/health`` endpoint within ``timeout``
    seconds, without MLflow's retries. ``sqlite:///`` and local folders: the folder must exist
    and be writable (and the database file, if present). Other schemes are left to MLflow.

    Raises:
        TrackingUnavailable: one line naming the URI and what is wrong.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it or set "
                "tracking.uri to a running server or to sqlite:///mlflow.db"
            ) from None
        if status in (401, 403):
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} refuses access (HTTP {status}); set "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            )
        if status >= 500:
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is not healthy (HTTP {status} from {url})"
            )
        return
    path = _local_path(uri)
    if path is None:
        return
    folder = path.parent if parsed.scheme == "sqlite" else path
    if parsed.scheme != "sqlite" and not folder.exists():
        folder = folder.parent  # MLflow creates a file store's own folder
    if not folder.is_dir():
        raise TrackingUnavailable(f"tracking.uri {uri}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (
        parsed.scheme == "sqlite" and path.exists() and not os.access(path, os.W_OK)
    ):
        raise TrackingUnavailable(f"tracking.uri {uri}: {path} is not writable")


def mark_run_ended(uri: str, run_id: str, status: str = "FAILED") -> bool:
    """End MLflow run ``run_id`` as ``status`` if it is still RUNNING; True if it was changed.

    For a process that outlives the one that created the run (the runner of a federation whose
    ServerApp died): a run is never left RUNNING. Does nothing when the store is unreachable.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        check_tracking(uri)
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status=status)
    except (TrackingUnavailable, MlflowException):
        return False
    return True


class MlflowTracker:
    """Writes one federation run to an MLflow tracking store.

    Parameters
    ----------
    uri : str
        Tracking URI (``sqlite:///abs/path.db`` by default, or an ``http://`` MLflow server).
    experiment : str
        Experiment name; created with ``artifact_root`` as its artifact location if missing.
    artifact_root : str
        Folder for artifacts of a newly created experiment.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: str) -> None:
        check_tracking(uri)  # seconds, not MLflow's minutes of retries, for a dead server
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None and uri.startswith(("http://", "https://")):
            # A tracking server decides where artifacts live (it serves them to the UI); a
            # local folder here would leave them on the ServerApp's disk, out of its reach.
            self.experiment_id = self.client.create_experiment(experiment)
        elif exp is None:
            location = (
                Path(artifact_root).resolve().as_uri()
                if "://" not in artifact_root
                else artifact_root
            )
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:  # never overrule an operator's
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.run_id: str | None = None

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """Create the run and log every param in batches; returns the MLflow run id."""
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:_PARAM_MAX_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH_PARAMS])
        return self.run_id

    def resume(self, run_id: str) -> str:
        """Continue logging into an existing run (a restarted server), marked running again."""
        self.client.get_run(run_id)  # fails clearly if the run is not in this tracking store
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Log a round's metrics in as few calls as possible (step = round number)."""
        from mlflow.entities import Metric

        assert self.run_id is not None
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH_METRICS])

    def log_params(self, params: dict[str, str]) -> None:
        """Log params in one batch (a param, once logged, keeps its value)."""
        from mlflow.entities import Param

        assert self.run_id is not None
        items = [Param(k, str(v)[:_PARAM_MAX_LEN]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH_PARAMS])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        assert self.run_id is not None
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        assert self.run_id is not None
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        assert self.run_id is not None
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        assert self.run_id is not None
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        """Log every file under ``folder`` (under ``artifact_path`` in the run)."""
        assert self.run_id is not None
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_model(
        self,
        model: Any,
        input_example: Any,
        registered_name: str | None,
        step: int = 0,
        description: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Log the final global model as an MLflow PyTorch model and register it.

        ``input_example`` (a small numpy batch) lets MLflow trace the model and record its
        signature. ``step`` is the run's final round: MLflow links the metrics logged at that
        step to the model (without it the model page shows the untrained model's step-0
        scores). The registered version gets ``description`` and ``tags``. Returns the
        registered model version, or None when not registered. Requirements are given
        explicitly so MLflow does not spend seconds inferring them.
        """
        import mlflow
        import torch

        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=input_example,
                registered_model_name=registered_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                step=step,
                tags=tags,
            )
        if not registered_name:
            return None
        version = str(info.registered_model_version)
        if description:
            self.client.update_model_version(registered_name, version, description=description)
        for key, value in (tags or {}).items():
            self.client.set_model_version_tag(registered_name, version, key, str(value))
        return version

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
