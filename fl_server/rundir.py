"""One run per output folder: an advisory lock held for the run's whole lifetime.

A run's folder holds its checkpoints, run state, reward ledger and logs; two processes writing
there would corrupt each other's records (a second server would "resume" the first's MLflow run
and pay its rounds twice). :func:`run_dir_lock` takes an exclusive ``fcntl`` lock on
``<folder>/.lock`` and refuses, with one line, a folder another live process holds. The lock
goes with the process: a crashed run leaves no stale lock behind.

When a launcher (``python -m experiments.run``) starts the ServerApp in another process, it
holds the lock for the run and names the config file it wrote (``for_config``); a ServerApp
started with exactly that ``config-file`` then runs under the launcher's lock instead of
refusing its own folder. Anything else targeting the folder is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirInUse(RuntimeError):
    """Another live process holds the output folder; the message names it and the holder."""


def _holder(path: Path) -> dict:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_locked(path: Path) -> bool:
    """Whether some process holds the lock on ``path`` now (probes without keeping it)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock the probe may have taken
    return False


@contextmanager
def run_dir_lock(folder: str | Path, for_config: str | Path | None = None) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for the duration of the ``with`` block.

    Args:
        folder: the run's output folder.
        for_config: the config file this holder hands to a ServerApp in another process;
            :func:`server_run_dir_lock` lets exactly that ServerApp in.

    Raises:
        RunDirInUse: another live process holds the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _holder(path)
        raise RunDirInUse(
            f"output folder {folder} is in use by another run (pid {holder.get('pid', '?')}); "
            "give this run its own folder or wait for that one to end"
        ) from None
    try:
        record = {"pid": os.getpid()}
        if for_config is not None:
            record["config_file"] = str(Path(for_config).resolve())
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield folder
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


@contextmanager
def server_run_dir_lock(folder: str | Path, config_file: str | Path | None) -> Iterator[Path]:
    """The ServerApp's side: run under the launcher's lock if it was taken for ``config_file``.

    A ServerApp started by ``flwr run`` on its own takes the lock itself (and is refused if
    the folder is in use); one started by a launcher that holds the folder for this very
    config file runs under that lock.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    delegated = _holder(path).get("config_file") if path.exists() else None
    if (
        config_file
        and delegated is not None
        and delegated == str(Path(config_file).resolve())
        and _is_locked(path)
    ):
        yield folder
        return
    with run_dir_lock(folder) as held:
        yield held
