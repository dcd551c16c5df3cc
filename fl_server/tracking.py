"""MLflow tracking for a federation run: params, config, batched per-round metrics, the model.

One MLflow run per federation run. Metrics are sent with ``MlflowClient.log_batch`` once per
round (one call instead of hundreds), named ``server/<metric>`` for central evaluation and
``factory/<id>/<metric>`` for per-factory values, with step = round number.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

_BATCH_METRICS = 1000
_BATCH_PARAMS = 100
_PARAM_MAX_LEN = 6000


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
        self.run_id: str | None = None

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """Create the run and log every param in batches; returns the MLflow run id."""
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
        assert self.run_id is not None
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        for i in range(0, len(items), _BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH_METRICS])

    def set_tags(self, tags: dict[str, str]) -> None:
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

    def log_model(self, model: Any, input_example: Any, registered_name: str | None) -> str | None:
        """Log the final global model as an MLflow PyTorch model and register it.

        ``input_example`` (a small numpy batch) lets MLflow trace the model and record its
        signature. Returns the registered model version, or None when not registered.
        Requirements are given explicitly so MLflow does not spend seconds inferring them.
        """
        import torch

        with mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                input_example=input_example,
                registered_model_name=registered_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        return str(info.registered_model_version) if registered_name else None

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
