"""The contract every standard model implements.

A *standard model* is a task the federation trains together (fault diagnosis, quality
prediction, predictive maintenance...). Each task lives in its own folder with the same files
(``dataset.py`` for schema and loader, ``model.py``, ``loss.py``, ``metrics.py``, ``source.py``
for the data source) and exposes one :class:`StandardTask` object, so a newcomer finds every
piece in the same place and the server and client code never branch on task names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset


class DataValidationError(ValueError):
    """A factory's data file is unusable; the message names the file and the column at fault."""

    def __init__(self, source: str | Path, message: str, column: str | None = None) -> None:
        self.source = str(source)
        self.column = column
        where = f"{self.source}" + (f", column '{column}'" if column else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Column:
    """One column of a task's tabular schema. ``dtype`` is ``"float"``, ``"int"`` or ``"str"``.

    ``low`` and ``high`` optionally bound numeric values (inclusive), so that a label outside
    the task's classes is reported against the file instead of failing deep inside the loss.
    """

    name: str
    dtype: str
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Schema:
    """The columns a factory's Parquet file must hold for one task."""

    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def validate(self, df: pd.DataFrame, source: str | Path) -> None:
        """Raise :class:`DataValidationError` naming ``source`` and the column at fault.

        Checks: non-empty, every column present, dtype kind matches, no NaN or +-inf in
        numeric columns, numeric values inside the column's optional ``[low, high]`` bounds.
        Extra columns are allowed (factories may keep their own fields).
        """
        if len(df) == 0:
            raise DataValidationError(source, "the file holds no rows")
        for col in self.columns:
            if col.name not in df.columns:
                raise DataValidationError(source, "missing column", col.name)
            series = df[col.name]
            kind = series.dtype.kind
            if col.dtype == "float":
                ok = kind in "fiu"
            elif col.dtype == "int":
                ok = kind in "iu"
            else:
                ok = kind in "OSUT" or str(series.dtype) in ("string", "str")
            if not ok:
                raise DataValidationError(
                    source, f"expected dtype {col.dtype}, found {series.dtype}", col.name
                )
            if col.dtype in ("float", "int"):
                values = series.to_numpy()
                if not np.isfinite(values.astype(np.float64, copy=False)).all():
                    bad = int((~np.isfinite(values.astype(np.float64))).sum())
                    raise DataValidationError(
                        source, f"{bad} value(s) are NaN or infinite", col.name
                    )
                if col.low is not None and (values < col.low).any():
                    raise DataValidationError(
                        source, f"value(s) below the allowed minimum {col.low}", col.name
                    )
                if col.high is not None and (values > col.high).any():
                    raise DataValidationError(
                        source, f"value(s) above the allowed maximum {col.high}", col.name
                    )
            elif series.isna().any():
                raise DataValidationError(source, "holds missing values", col.name)


@dataclass(frozen=True)
class PartitionConfig:
    """How the pooled data is split into factories (non-IID knobs).

    scheme: ``natural`` (the task's own factory structure), ``dirichlet`` (label skew with
        concentration ``alpha``) or ``iid``.
    alpha: Dirichlet concentration; small values give each factory few labels.
    quantity_skew: sigma of a log-normal draw of factory sizes; 0 gives equal sizes.
    feature_shift: scale of each factory's sensor offset and gain (calibration differences).
    """

    scheme: str = "natural"
    alpha: float = 0.5
    quantity_skew: float = 0.5
    feature_shift: float = 0.0


@dataclass
class FederatedData:
    """Everything ``factoryfed data make`` writes: one frame per factory plus server sets."""

    factories: list[pd.DataFrame]
    validation: pd.DataFrame
    test: pd.DataFrame
    info: dict = field(default_factory=dict)


class StandardTask(ABC):
    """One standard model: its data contract, network, loss and metrics.

    Attributes:
        name: registry name, also the Hydra ``task`` choice.
        schema: columns a factory file must have.
        main_metric: the metric used for model selection, contribution utility and reports.
        greater_is_better: direction of ``main_metric``.
        supports_ghost: whether Opacus ghost clipping handles every layer of the model.
    """

    name: str
    schema: Schema
    main_metric: str
    greater_is_better: bool = True
    supports_ghost: bool = True

    @abstractmethod
    def generate(self, num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
        """Produce the factories' private frames and the server's validation and test frames."""

    @abstractmethod
    def to_dataset(self, df: pd.DataFrame) -> Dataset:
        """Turn a validated frame into a dataset of ``(x, y)`` tensors (windows where relevant)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh, Opacus-compatible network (no BatchNorm)."""

    @abstractmethod
    def loss_fn(self) -> nn.Module:
        """The training criterion, ``reduction="mean"``."""

    @abstractmethod
    def output_metrics(self, outputs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Task metrics (``main_metric`` among them) from model outputs and targets.

        Separate from :meth:`evaluate` so that callers holding outputs of many models at once
        (contribution scoring evaluates hundreds of coalition models a round) score them without
        running each model through a data loader again.
        """

    def main_score(self, outputs: torch.Tensor, target: torch.Tensor) -> float:
        """Only ``main_metric`` from outputs and targets; tasks override it with a cheaper path.

        Contribution scoring needs this one number for hundreds of models a round.
        """
        return float(self.output_metrics(outputs, target)[self.main_metric])

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """``loss`` and the task metrics of ``model`` on ``dataset``."""
        outputs, target = self.predict(model, dataset)
        metrics = {"loss": float(self.loss_fn()(outputs, target).item())}
        metrics.update(self.output_metrics(outputs, target))
        return metrics

    def load_frame(self, path: str | Path) -> pd.DataFrame:
        """Read and validate a factory's Parquet file; errors name the file and column."""
        path = Path(path)
        if not path.exists():
            raise DataValidationError(path, "file does not exist")
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types for corrupt files
            raise DataValidationError(path, f"unreadable Parquet file ({exc})") from exc
        self.schema.validate(df, path)
        return df

    @torch.no_grad()
    def predict(
        self, model: nn.Module, dataset: Dataset, batch_size: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model outputs and targets over ``dataset`` in eval mode.

        The model's previous train/eval mode is restored afterwards, so evaluating between
        local training steps does not silently switch training off.
        """
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        outs, ys = [], []
        try:
            for x, y in loader:
                outs.append(model(x))
                ys.append(y)
        finally:
            model.train(was_training)
        return torch.cat(outs), torch.cat(ys)


def ghost_supported(model: nn.Module) -> bool:
    """Whether Opacus ghost clipping (``grad_sample_mode="ghost"``) covers every layer.

    Ghost clipping computes per-sample gradient norms without materialising per-sample
    gradients for layers with a registered norm sampler (``Linear``, ``Embedding``) and falls
    back to per-layer grad samplers (e.g. ``LayerNorm``) for the rest. A trainable layer with
    neither would need the slow functorch path, so such models should use another mode.
    """
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Ghost

    supported = set(Ghost.NORM_SAMPLERS) | set(Ghost.GRAD_SAMPLERS)
    for module in model.modules():
        own_params = any(p.requires_grad for p in module.parameters(recurse=False))
        if own_params and type(module) not in supported:
            return False
    return True
