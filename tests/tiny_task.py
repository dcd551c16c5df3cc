"""A tiny stand-in task for tests of privacy, training rounds and attacks.

Binary classification of four synthetic sensor readings with a linear model: fast enough for
whole factory rounds, and independent of the real standard models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from standard_models.base import Column, FederatedData, PartitionConfig, Schema, StandardTask

FEATURES = ["s0", "s1", "s2", "s3"]
WEIGHTS = np.array([1.0, -2.0, 0.5, 1.5])


def make_frame(n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of standard-normal sensors and the label ``x @ WEIGHTS > 0``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    df = pd.DataFrame(x, columns=FEATURES)
    df["label"] = (x @ WEIGHTS > 0).astype(np.int64)
    return df


def write_frame(folder: Path, n: int, seed: int = 0) -> Path:
    """A factory file of :func:`make_frame` rows in ``folder``; returns its path."""
    path = folder / f"factory_{seed}_{n}.parquet"
    make_frame(n, seed).to_parquet(path)
    return path


class TinyTask(StandardTask):
    """Binary classification of four sensor readings with a linear model."""

    name = "tiny"
    schema = Schema(tuple(Column(c, "float") for c in FEATURES) + (Column("label", "int"),))
    main_metric = "accuracy"

    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        frames = [make_frame(100, seed + i) for i in range(num_factories)]
        return FederatedData(frames, make_frame(50, seed + 100), make_frame(50, seed + 200))

    def to_dataset(self, df: pd.DataFrame) -> Dataset:
        x = torch.tensor(df[FEATURES].to_numpy(), dtype=torch.float32)
        return TensorDataset(x, torch.tensor(df["label"].to_numpy(), dtype=torch.long))

    def build_model(self) -> nn.Module:
        return nn.Linear(len(FEATURES), 2)

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {"accuracy": float((outputs.argmax(1) == target).float().mean())}


def molding_frame(n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of a moulding factory's file: the real schema, a learnable defect label."""
    from standard_models.molding_quality import source as molding_source

    rng = np.random.default_rng(seed)
    reference = molding_source.REFERENCE
    z = rng.normal(size=(n, len(reference)))
    df = pd.DataFrame(
        {name: c + h * z[:, i] for i, (name, (c, h)) in enumerate(reference.items())}
    )
    df[molding_source.LABEL] = (z[:, 0] + z[:, 1] > 1).astype(np.int64)
    return df[[*molding_source.FEATURES, molding_source.LABEL]]
