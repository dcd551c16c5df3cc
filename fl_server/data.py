"""Making sure the data a run needs exists: all factories' files in simulation, the server's
validation and test files in deployment (where each factory's file stays at the factory).

Three sources, one check: generated data (made under ``data_root`` unless identical data is
there), the user's own files (``data_dir=PATH``: never generated into, only checked), and an
operator's folder holding the server's files only (``holdout_only``). The server's files, and
all of a user's own files, are checked against the task's schema before the federation starts,
so a missing, corrupt or wrongly shaped file stops the run with one line naming it. A damaged
file of generated data that a factory reads stays that factory's data error (reported for it
every round while the others train), as it would be in a deployment.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig

from standard_models.base import PartitionConfig


def partition_of(cfg: DictConfig) -> PartitionConfig:
    """The partition group of the config as the data generator's dataclass."""
    p = cfg.partition
    return PartitionConfig(
        scheme=str(p.scheme),
        alpha=float(p.alpha),
        quantity_skew=float(p.quantity_skew),
        feature_shift=float(p.feature_shift),
    )


_FACTORY_FILE = re.compile(r"factory_(\d{3,})\.parquet")


def check_data_files(task_name: str, data_dir: Path, num_factories: int | None) -> None:
    """Check every file a run reads from ``data_dir`` against the task's schema.

    ``num_factories`` None checks the server's validation and test files only; otherwise the
    folder must hold exactly ``factory_000.parquet .. factory_{n-1}.parquet`` as well.

    Raises:
        FileNotFoundError: the folder or a required file is missing.
        DataValidationError: a file is unreadable or breaks the task's schema (names the file,
            and the column where one is at fault), or the factory files do not match
            ``num_factories``.
    """
    from standard_models.base import DataValidationError
    from standard_models.datafiles import factory_path, holdout_paths
    from standard_models.registry import get_task

    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir}: no such folder")
    paths = list(holdout_paths(data_dir))
    if num_factories is not None:
        found = sorted(p.name for p in data_dir.glob("factory_*.parquet"))
        expected = [factory_path(data_dir, i).name for i in range(num_factories)]
        if found != expected:
            have = f"{len(found)} factory files" + (
                f" ({found[0]} .. {found[-1]})" if found else ""
            )
            raise DataValidationError(
                data_dir,
                f"holds {have}, but federation.num_factories={num_factories} needs exactly "
                f"{expected[0]} .. {expected[-1]}; set federation.num_factories to the number of "
                "factory files, named factory_000.parquet, factory_001.parquet, ...",
            )
        paths += [data_dir / name for name in expected]
    task = get_task(task_name)
    for path in paths:
        task.load_frame(path)  # raises DataValidationError naming the file (and column)


def ensure_data(cfg: DictConfig) -> tuple[Path, bool]:
    """Generate the factories' data into ``cfg.data_dir`` unless identical data is there.

    With ``data_given`` (the user's own ``data_dir``) nothing is generated: the folder must
    hold one file per factory and the server's files, all valid for the task. With
    ``holdout_only`` (an operator who named its ``data-dir``), only the server's own
    validation and test files are required and nothing is ever generated: the operator holds
    no factory's data. Returns the folder and whether it was (re)generated.
    """
    from standard_models.datafiles import data_matches, holdout_paths, make_federated_data

    data_dir = Path(cfg.data_dir)
    task, n = str(cfg.task.name), int(cfg.federation.num_factories)
    if cfg.get("holdout_only"):
        missing = [str(p) for p in holdout_paths(data_dir) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"data-dir {data_dir}: the server's {', '.join(missing)} missing (the operator "
                "needs only validation.parquet and test.parquet there)"
            )
        check_data_files(task, data_dir, None)
        return data_dir, False
    if cfg.get("data_given"):
        check_data_files(task, data_dir, n)
        return data_dir, False
    args = (task, n, int(cfg.seed), partition_of(cfg))
    if data_matches(data_dir, *args):
        # The server's own files; a damaged factory file stays that factory's data error,
        # reported for it each round while the others train (as in a deployment).
        check_data_files(task, data_dir, None)
        return data_dir, False
    make_federated_data(*args, out_dir=data_dir)
    return data_dir, True
