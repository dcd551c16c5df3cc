"""The contract every standard model implements.

A *standard model* is a task the federation trains together (fault diagnosis, quality
prediction, predictive maintenance...). Each task lives in its own folder with the same files
(``dataset.py`` for schema and loader, ``model.py``, ``loss.py``, ``metrics.py``, ``source.py``
for the data source) and exposes one :class:`StandardTask` object, so a newcomer finds every
piece in the same place and the server and client code never branch on task names.

One job, the task contract; its length is the machinery every task inherits from it (schema
checks, the privacy-unit datasets, the windowed time-series base), which keeps each task
folder small.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


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


@dataclass(frozen=True)
class PrivacyUnit:
    """What one record is for a task's differential privacy: the unit its epsilon protects.

    ``name`` is what a firm would call one record of its production (a shot, a 15-minute
    window of a process, a machine's whole life); ``why`` says in one sentence why that is the
    right unit. DP-SGD on a task protects exactly this unit: every raw row of a unit reaches
    the training only through that unit, so the reported epsilon bounds what an observer can
    learn about any one unit (and, a fortiori, about any single row inside it).
    """

    name: str
    why: str


class UnitDataset(Dataset):
    """Training examples grouped by privacy unit; one item is one whole unit.

    For units that hold several overlapping examples (all windows of one machine, of one run),
    differentially private training must sample and clip whole units: ``len()`` is the number
    of units, so Opacus's Poisson sampler draws units, and an item is all examples of that
    unit. A batch fetched with :meth:`__getitems__` is ``(x, y, group)``: the examples of the
    drawn units, concatenated, and for each example the position of its unit in the batch
    (``0..k-1``), which per-unit clipping groups by.

    Args:
        x, y: the examples, sorted so that every unit's examples are contiguous.
        unit_of: for every example, the index of its unit (non-decreasing, ``0..n_units-1``,
            every unit present).
        unit: the unit's name, e.g. ``"machine"``.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, unit_of: torch.Tensor, unit: str
    ) -> None:
        unit_of = torch.as_tensor(unit_of, dtype=torch.long)
        if not (len(x) == len(y) == len(unit_of)) or len(x) == 0:
            raise ValueError(
                f"x, y and unit_of need the same non-zero length, got "
                f"{len(x)}, {len(y)}, {len(unit_of)}"
            )
        counts = torch.bincount(unit_of)
        if bool((torch.diff(unit_of) < 0).any()) or bool((counts == 0).any()):
            raise ValueError("unit_of must be non-decreasing and cover every unit index")
        self.x, self.y, self.unit = x, y, unit
        self.counts = counts
        self.offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def num_examples(self) -> int:
        """Number of examples over all units."""
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.x[start:end], self.y[start:end], torch.zeros(end - start, dtype=torch.long)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        units = torch.as_tensor(indices, dtype=torch.long)
        counts = self.counts[units]
        group = torch.repeat_interleave(torch.arange(len(units)), counts)
        starts = self.offsets[units]
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        rows = torch.repeat_interleave(starts, counts) + within
        return self.x[rows], self.y[rows], group

    def examples(self) -> TensorDataset:
        """All examples as a plain dataset (for training without DP, or evaluation)."""
        return TensorDataset(self.x, self.y)


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
        privacy_unit: the unit a factory's epsilon protects by default (one record of a
            firm's production for this task); :meth:`to_train_dataset` builds the training
            examples so that DP-SGD protects exactly it. The base default, ``row``, fits
            tasks whose :meth:`to_dataset` turns each row into one example; every standard
            model states its own.
        coarser_units: further units a factory may choose instead (each covering whole
            default units), trained with unit-level DP-SGD.
    """

    name: str
    schema: Schema
    main_metric: str
    greater_is_better: bool = True
    supports_ghost: bool = True
    privacy_unit: PrivacyUnit = PrivacyUnit(
        "row",
        "Each row of the factory's file is one training example, so per-example DP-SGD "
        "protects each row.",
    )
    coarser_units: tuple[PrivacyUnit, ...] = ()

    def unit_names(self) -> list[str]:
        """The privacy units a factory may choose, the declared default first."""
        return [self.privacy_unit.name, *(u.name for u in self.coarser_units)]

    def get_privacy_unit(self, name: str | None = None) -> PrivacyUnit:
        """The unit called ``name`` (``None``: the declared default).

        Raises ``ValueError`` naming the value and the units this task allows.
        """
        if name is None or name == self.privacy_unit.name:
            return self.privacy_unit
        for unit in self.coarser_units:
            if unit.name == name:
                return unit
        raise ValueError(
            f"privacy unit {name!r} is not one of task {self.name!r}'s units "
            f"{self.unit_names()}"
        )

    def to_train_dataset(self, df: pd.DataFrame, unit: str | None = None) -> Dataset:
        """Training examples whose DP-SGD protects privacy unit ``unit`` (default: declared).

        The declared unit gives a plain dataset in which every raw row is in exactly one
        example (so per-example DP-SGD is per-unit DP-SGD); a coarser unit gives a
        :class:`UnitDataset` whose items are whole units, which
        :func:`fl_client.training.train_local` samples and clips as one. ``len()`` of the
        result is the number of units, the ``n`` of the privacy accounting. Evaluation keeps
        using :meth:`to_dataset`. Raises ``ValueError`` for a unit the task does not offer.
        """
        return self._unit_dataset(df, self.get_privacy_unit(unit).name)

    def rows_are_units(self, unit: str | None = None) -> bool:
        """Whether every row of a factory file is one training unit for ``unit`` (default:
        declared), so that a file's row count is its unit count (tasks that build their own
        units, such as windows or machines, override :meth:`_unit_dataset`)."""
        return (
            type(self)._unit_dataset is StandardTask._unit_dataset
            and self.get_privacy_unit(unit) is self.privacy_unit
        )

    def _unit_dataset(self, df: pd.DataFrame, unit: str) -> Dataset:
        """Build :meth:`to_train_dataset`'s examples for a known unit name.

        The default suits tasks whose rows are independent examples and whose only unit is
        one row; tasks with windows or coarser units override it.
        """
        if unit != self.privacy_unit.name:
            raise NotImplementedError(f"task {self.name!r} builds no dataset for unit {unit!r}")
        return self.to_dataset(df)

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

    def main_scores(self, outputs: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """:meth:`main_score` of each output set of a batch ``(m, ...)``, as an array.

        Contribution scoring scores hundreds of output mixtures a round; tasks whose metric
        batches well override this (one call instead of ``m``), the rest loop.
        """
        return np.array([self.main_score(out, target) for out in outputs], dtype=np.float64)

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


class WindowedTask(StandardTask):
    """A standard model whose examples are windows of consecutive rows of one recording.

    The time-series tasks (a run of a process, a machine's life) share everything but their
    data: an example is a window of ``window`` consecutive rows, evaluation sets start a
    window every ``stride`` rows, the default privacy unit is one non-overlapping window (so
    every raw row is in exactly one training example), the one coarser unit is a whole
    recording with all its stride-1 windows, and the network takes the window length. A
    subclass names its folder's builders as static methods: :meth:`windows`
    (``(df, window, stride) -> TensorDataset``), :meth:`recording_units`
    (``(df, window) -> UnitDataset``) and :meth:`network` (``(window) -> nn.Module``), and
    its default window length in ``default_window``.

    Args:
        window: consecutive rows per input window (``default_window`` when omitted).
        stride: step between window starts in :meth:`to_dataset` (evaluation sets); training
            sets follow the privacy unit (:meth:`to_train_dataset`).
    """

    default_window: int

    def __init__(self, window: int | None = None, stride: int = 1) -> None:
        self.window = int(self.default_window if window is None else window)
        self.stride = int(stride)

    @staticmethod
    @abstractmethod
    def windows(df: pd.DataFrame, window: int, stride: int) -> TensorDataset:
        """Standardised, flattened windows and the target at each window's last row."""

    @staticmethod
    @abstractmethod
    def recording_units(df: pd.DataFrame, window: int) -> UnitDataset:
        """Every stride-1 window, grouped so that one unit is one whole recording."""

    @staticmethod
    @abstractmethod
    def network(window: int) -> nn.Module:
        """A fresh network over one window of ``window`` rows."""

    def to_dataset(self, df: pd.DataFrame) -> TensorDataset:
        """Windows every ``stride`` rows and the target at each window's last row."""
        return self.windows(df, self.window, self.stride)

    def _unit_dataset(self, df: pd.DataFrame, unit: str) -> Dataset:
        """Non-overlapping windows for the default unit, else whole recordings."""
        if unit == self.privacy_unit.name:
            return self.windows(df, self.window, self.window)
        return self.recording_units(df, self.window)

    def build_model(self) -> nn.Module:
        """A fresh network over one window."""
        return self.network(self.window)
