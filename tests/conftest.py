"""Test-wide settings: no telemetry from any process we start, one torch thread per process."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

# Two cores shared by the runner and any simulated factories: extra threads only contend.
torch.set_num_threads(1)
