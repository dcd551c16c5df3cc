"""Writing a generated federation to disk, and recognising one that is already there.

Layout of a data directory::

    factory_000.parquet ... factory_NNN.parquet   one private file per factory
    validation.parquet, test.parquet             the server's held-out sets
    manifest.json                                parameters, rows and sha256 of every file

In a deployment each factory receives only its own ``factory_XXX.parquet`` (its SuperNode's
``data-path``); simulations point every virtual client at its file in the same directory.
The manifest is written last, so a directory with a manifest is complete, and
:func:`data_matches` lets callers skip regeneration when parameters have not changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from .base import DataValidationError, PartitionConfig
from .registry import get_task

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VALIDATION_NAME = "validation.parquet"
TEST_NAME = "test.parquet"


def factory_path(data_dir: str | Path, index: int) -> Path:
    """Path of factory ``index``'s file (``factory_000.parquet`` for index 0)."""
    if index < 0:
        raise ValueError(f"factory index must be non-negative, got {index}")
    return Path(data_dir) / f"factory_{index:03d}.parquet"


def holdout_paths(data_dir: str | Path) -> tuple[Path, Path]:
    """Paths of the server's ``(validation, test)`` files."""
    return Path(data_dir) / VALIDATION_NAME, Path(data_dir) / TEST_NAME


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _partition_dict(partition: PartitionConfig) -> dict[str, Any]:
    return {
        "scheme": str(partition.scheme),
        "alpha": float(partition.alpha),
        "quantity_skew": float(partition.quantity_skew),
        "feature_shift": float(partition.feature_shift),
    }


def _write_atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False, engine="pyarrow")
    os.replace(tmp, path)


def make_federated_data(
    task_name: str,
    num_factories: int,
    seed: int,
    partition: PartitionConfig,
    out_dir: str | Path,
) -> Path:
    """Generate ``task_name``'s federation and write it to ``out_dir``; returns ``out_dir``.

    Any previous manifest is removed first and factory files beyond ``num_factories`` are
    deleted, so a reader never mixes two generations. Every frame is checked against the
    task's schema before it is written.
    """
    task = get_task(task_name)
    data = task.generate(num_factories, seed, partition)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_file = out / MANIFEST_NAME
    manifest_file.unlink(missing_ok=True)
    keep = {factory_path(out, i).name for i in range(len(data.factories))}
    for stale in out.glob("factory_[0-9][0-9][0-9].parquet"):
        if stale.name not in keep:
            stale.unlink()
    targets = [(factory_path(out, i), "factory", df) for i, df in enumerate(data.factories)]
    val_file, test_file = holdout_paths(out)
    targets += [(val_file, "validation", data.validation), (test_file, "test", data.test)]
    files = []
    for path, role, df in targets:
        task.schema.validate(df, path)
        _write_atomic_parquet(df, path)
        files.append(
            {"name": path.name, "role": role, "rows": int(len(df)), "sha256": sha256_file(path)}
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": task_name,
        "seed": int(seed),
        "num_factories": int(num_factories),
        "partition": _partition_dict(partition),
        "files": files,
        "info": data.info,
    }
    tmp = manifest_file.with_name(MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_file)
    return out


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a data directory.

    Raises ``FileNotFoundError`` when there is none and :class:`DataValidationError` when it
    is not a JSON object with a ``files`` list.
    """
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run 'factoryfed data make' first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataValidationError(path, f"unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise DataValidationError(path, "manifest lacks a 'files' list")
    return manifest


def data_matches(
    data_dir: str | Path,
    task_name: str,
    num_factories: int,
    seed: int,
    partition: PartitionConfig,
    *,
    verify_hashes: bool = False,
) -> bool:
    """True iff ``data_dir`` holds a complete generation with exactly these parameters.

    Compares format version, task, seed, factory count and every partition field, and checks
    that every listed file exists; with ``verify_hashes`` also recomputes each file's SHA-256.
    """
    try:
        manifest = read_manifest(data_dir)
    except (FileNotFoundError, DataValidationError):
        return False
    expected = {
        "format_version": FORMAT_VERSION,
        "task": task_name,
        "seed": int(seed),
        "num_factories": int(num_factories),
        "partition": _partition_dict(partition),
    }
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    names = {entry.get("name") for entry in manifest["files"] if isinstance(entry, dict)}
    required = {factory_path(data_dir, i).name for i in range(num_factories)}
    required |= {VALIDATION_NAME, TEST_NAME}
    if not required <= names:
        return False
    for entry in manifest["files"]:
        path = Path(data_dir) / str(entry.get("name"))
        if not path.is_file():
            return False
        if verify_hashes and sha256_file(path) != entry.get("sha256"):
            return False
    return True


def partition_from_manifest(manifest: dict[str, Any]) -> PartitionConfig:
    """The :class:`PartitionConfig` a manifest was generated with."""
    fields = {f.name for f in dataclasses.fields(PartitionConfig)}
    return PartitionConfig(**{k: v for k, v in manifest["partition"].items() if k in fields})
