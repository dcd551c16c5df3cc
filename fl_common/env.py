"""The quiet environment: no telemetry and no update checks, defined once for every process.

:data:`QUIET_ENV` is what the tests and the benchmarks set for themselves (:func:`set_quiet`);
:data:`CHILD_ENV` is what every process launched by :mod:`fl_server.launch` gets: the same, plus
Ray's log lines unmerged, its accelerator variable left alone and unbuffered output, so that a
log follows the run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

#: No telemetry, no update checks (Flower and MLflow).
QUIET_ENV: Mapping[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

#: The environment every launched Flower or MLflow process gets on top of the parent's.
CHILD_ENV: Mapping[str, str] = {
    **QUIET_ENV,
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}


def set_quiet(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`QUIET_ENV` in ``environ`` (default ``os.environ``), keeping values already set
    (a user who exported one of them decides)."""
    target = os.environ if environ is None else environ
    for key, value in QUIET_ENV.items():
        target.setdefault(key, value)
