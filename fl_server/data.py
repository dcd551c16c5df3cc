"""Making sure the federation's data exists before a run (the simulation's factories' files)."""

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

    Returns the folder and whether it was (re)generated.
    """
    from standard_models.datafiles import data_matches, make_federated_data

    data_dir = Path(cfg.data_dir)
    args = (str(cfg.task.name), int(cfg.federation.num_factories), int(cfg.seed), partition_of(cfg))
    if data_matches(data_dir, *args):
        return data_dir, False
    make_federated_data(*args, out_dir=data_dir)
    return data_dir, True
