"""Making sure the data a run needs exists: all factories' files in simulation, the server's
validation and test files in deployment (where each factory's file stays at the factory)."""

from __future__ import annotations

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


def ensure_data(cfg: DictConfig) -> tuple[Path, bool]:
    """Generate the factories' data into ``cfg.data_dir`` unless identical data is there.

    With ``holdout_only`` (an operator who named its ``data-dir``), only the server's own
    validation and test files are required and nothing is ever generated: the operator holds
    no factory's data. Returns the folder and whether it was (re)generated.
    """
    from standard_models.datafiles import data_matches, holdout_paths, make_federated_data

    data_dir = Path(cfg.data_dir)
    if cfg.get("holdout_only"):
        missing = [str(p) for p in holdout_paths(data_dir) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"data-dir {data_dir}: the server's {', '.join(missing)} missing (the operator "
                "needs only validation.parquet and test.parquet there)"
            )
        return data_dir, False
    args = (str(cfg.task.name), int(cfg.federation.num_factories), int(cfg.seed), partition_of(cfg))
    if data_matches(data_dir, *args):
        return data_dir, False
    make_federated_data(*args, out_dir=data_dir)
    return data_dir, True
