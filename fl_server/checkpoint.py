"""Round checkpoints of the global model and the server's run state, written atomically.

A crash never leaves half a file (:mod:`fl_common.storage`: temporary file, fsync, rename).
The run state (MLflow run id, per-round history, failures) is what a restarted server needs,
next to the latest checkpoint, to continue the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fl_common.storage import atomic_open, atomic_write_json


def save_checkpoint(out_dir: Path, server_round: int, state_dict: dict, metrics: dict) -> Path:
    """Write ``round_<r>.pt`` and point ``latest.json`` at it; returns the checkpoint path."""
    path = Path(out_dir) / f"round_{server_round:04d}.pt"
    with atomic_open(path, "wb") as handle:
        torch.save({"round": server_round, "state_dict": state_dict, "metrics": metrics}, handle)
    info = {"round": server_round, "path": path.name, "metrics": metrics}
    atomic_write_json(Path(out_dir) / "latest.json", info)
    return path


def load_latest(out_dir: Path) -> dict | None:
    """The newest checkpoint (``round``, ``state_dict``, ``metrics``) or None if there is none."""
    latest = Path(out_dir) / "latest.json"
    if not latest.exists():
        return None
    info = json.loads(latest.read_text())
    return torch.load(Path(out_dir) / info["path"], weights_only=True)


RUN_STATE = "server-state.json"


def save_run_state(out_dir: Path, state: dict) -> None:
    """Write the server's run state (JSON) atomically into ``out_dir``."""
    atomic_write_json(Path(out_dir) / RUN_STATE, state, indent=2)


def load_run_state(out_dir: Path) -> dict | None:
    """The saved run state, or None when this output folder has none."""
    path = Path(out_dir) / RUN_STATE
    return json.loads(path.read_text()) if path.exists() else None
