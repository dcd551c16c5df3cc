"""Privacy units: every task declares one, DP-SGD protects it, and epsilon counts it.

The accounting is checked against Google's ``dp_accounting`` (an accountant independent of
Opacus) and the sample rate against a count of units made from the raw frame, not from the
dataset the training uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting import dp_event, rdp
from round_helpers import instruction_for
from torch import nn

from fl_client.factory import FactorySite, run_factory_round
from fl_client.privacy import epsilon_of
from fl_client.training import LocalTrainConfig, train_local
from standard_models import get_task
from standard_models.base import UnitDataset
from standard_models.registry import task_names
from standard_models.rul import source as rul_source
from standard_models.tep_fault import source as tep_source

DELTA = 1e-5


def dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float = DELTA) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps by ``dp_accounting``'s RDP."""
    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def tep_frame(lengths: tuple[int, ...], gap_after: int | None = None) -> pd.DataFrame:
    """TEP rows whose first variable holds the row number (decodable from the windows)."""
    rows = []
    row_id = 0
    mean, std = tep_source.reference_stats()
    for run, length in enumerate(lengths):
        for t in range(length):
            time = t + (5 if gap_after is not None and run == 0 and t > gap_after else 0)
            values = dict(zip(tep_source.FEATURES, mean, strict=True))
            values[tep_source.FEATURES[0]] = mean[0] + std[0] * row_id
            rows.append(
                {
                    tep_source.RUN: f"run-{run}",
                    tep_source.TIME: time,
                    **values,
                    tep_source.LABEL: run % 3,
                }
            )
            row_id += 1
    return pd.DataFrame(rows)


def rul_frame(lengths: tuple[int, ...]) -> pd.DataFrame:
    """Run-to-failure rows whose first channel holds the row number."""
    rows = []
    row_id = 0
    for machine, length in enumerate(lengths):
        for cycle in range(1, length + 1):
            values = dict(zip(rul_source.FEATURES, rul_source.FEATURE_CENTER, strict=True))
            values[rul_source.FEATURES[0]] = (
                rul_source.FEATURE_CENTER[0] + rul_source.FEATURE_SCALE[0] * row_id
            )
            rows.append(
                {
                    rul_source.UNIT: f"m{machine:02d}",
                    rul_source.CYCLE: cycle,
                    **values,
                    rul_source.LABEL: float(length - cycle),
                }
            )
            row_id += 1
    return pd.DataFrame(rows)


def decoded_rows(x: torch.Tensor, window: int, features: int) -> np.ndarray:
    """Row numbers carried by the first variable of every sample of every window."""
    return np.rint(x.reshape(len(x), window, features)[:, :, 0].numpy()).astype(int)


# ------------------------------------------------------------------ declared units


@pytest.mark.parametrize("name", task_names())
def test_every_task_declares_its_own_unit(name: str) -> None:
    task = get_task(name)
    assert "privacy_unit" in type(task).__dict__, f"{name} must state its privacy unit"
    unit = task.privacy_unit
    assert unit.name and " " not in unit.name
    assert len(unit.why) > 40 and unit.why.endswith(".")
    assert task.unit_names()[0] == unit.name
    assert task.get_privacy_unit(None) is unit
    with pytest.raises(ValueError, match=rf"'lot'.*{name}"):
        task.get_privacy_unit("lot")


@pytest.mark.parametrize(
    ("task_name", "frame", "features"),
    [
        ("tep_fault", tep_frame((23, 10, 4, 12), gap_after=6), len(tep_source.FEATURES)),
        ("rul", rul_frame((95, 31, 29, 64)), len(rul_source.FEATURES)),
    ],
)
def test_default_unit_puts_every_raw_row_in_exactly_one_example(
    task_name: str, frame: pd.DataFrame, features: int
) -> None:
    task = get_task(task_name)
    window = task.window  # type: ignore[attr-defined]
    train = task.to_train_dataset(frame)
    rows = decoded_rows(train.tensors[0], window, features)  # type: ignore[attr-defined]
    assert len(np.unique(rows)) == rows.size, "a raw row sits in two training examples"
    # Every row is used unless its block's length is not a multiple of the window.
    group_col = tep_source.RUN if task_name == "tep_fault" else rul_source.UNIT
    order_col = tep_source.TIME if task_name == "tep_fault" else rul_source.CYCLE
    expected = 0
    for _, run in frame.groupby(group_col):
        order = np.sort(run[order_col].to_numpy())
        blocks = np.split(order, np.flatnonzero(np.diff(order) != 1) + 1)
        expected += sum(len(b) // window for b in blocks)
    assert len(train) == expected
    # Evaluation keeps every stride-1 window.
    assert len(task.to_dataset(frame)) > len(train)


def test_machine_units_hold_all_windows_of_one_machine() -> None:
    task = get_task("rul")
    lengths = (95, 31, 29, 64)
    units = task.to_train_dataset(rul_frame(lengths), "machine")
    assert isinstance(units, UnitDataset) and units.unit == "machine"
    assert len(units) == 3  # the 29-cycle machine is too short for one window
    assert units.counts.tolist() == [95 - 29, 31 - 29, 64 - 29]
    x, y, group = units.__getitems__([2, 0])
    rows = decoded_rows(x, 30, len(rul_source.FEATURES))
    starts = np.cumsum((0, *lengths))
    assert set(rows[group == 0].ravel()) == set(range(starts[3], starts[4]))
    assert set(rows[group == 1].ravel()) == set(range(starts[0], starts[1]))
    assert len(units.examples()) == len(task.to_dataset(rul_frame(lengths)))


def test_tep_run_units_and_unknown_units() -> None:
    task = get_task("tep_fault")
    units = task.to_train_dataset(tep_frame((23, 10, 4)), "run")
    assert isinstance(units, UnitDataset) and len(units) == 2
    assert units.counts.tolist() == [23 - 4, 10 - 4]
    with pytest.raises(ValueError, match="'machine'.*'tep_fault'"):
        task.to_train_dataset(tep_frame((23,)), "machine")


# ------------------------------------------------------------------ unit-level DP-SGD


def _unit_dataset(sizes: list[int], features: int = 3) -> UnitDataset:
    unit_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(unit_of), features, generator=gen)
    x[:, 0] = unit_of.float()  # the unit's index travels with each example
    y = torch.randn(len(unit_of), generator=gen)
    return UnitDataset(x, y, unit_of, unit="machine")


class _Regressor(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def test_unit_sampler_draws_whole_units_at_the_accounted_rate() -> None:
    sizes = [1 + (7 * i) % 6 for i in range(40)]
    units = _unit_dataset(sizes)
    model = _Regressor(3)
    batches: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: batches.append(args[0][:, 0].clone()))
    cfg = LocalTrainConfig(local_epochs=40, batch_size=8, lr=0.01, reproducible_dp=True)
    result = train_local(model, units, nn.MSELoss(), cfg, noise_multiplier=1.0)

    # Independent recomputation: 40 units, 8 expected per batch.
    q = 1 / math.ceil(40 / 8)
    assert result.num_examples == 40
    assert result.sample_rate == q
    assert result.steps == len(batches) == 40 * int(1 / q)
    drawn = 0
    for ids in batches:
        present, counts = torch.unique(ids.long(), return_counts=True)
        for unit, count in zip(present.tolist(), counts.tolist(), strict=True):
            assert count == sizes[unit], "a batch holds part of a unit"
        drawn += len(present)
    rate = drawn / (len(batches) * 40)
    assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / (len(batches) * 40))
    # The spend of these steps, per unit, by Opacus's RDP and by dp_accounting.
    ours = epsilon_of([(1.0, result.sample_rate, result.steps)], DELTA)
    assert ours == pytest.approx(dp_accounting_epsilon(1.0, q, result.steps), rel=0.02)


def test_unit_level_training_needs_book_keeping_clipping() -> None:
    units = _unit_dataset([2, 3, 1, 4])
    cfg = LocalTrainConfig(batch_size=2, grad_sample_mode="hooks")
    with pytest.raises(ValueError, match="unit-level DP-SGD.*'machine'.*'hooks'"):
        train_local(_Regressor(3), units, nn.MSELoss(), cfg, noise_multiplier=1.0)


def test_unit_dataset_without_dp_trains_on_its_examples() -> None:
    units = _unit_dataset([2, 3, 1, 4])
    cfg = LocalTrainConfig(batch_size=4, dp=False)
    result = train_local(_Regressor(3), units, nn.MSELoss(), cfg, noise_multiplier=None)
    assert result.num_examples == 4 and result.steps == math.ceil(10 / 4)


@pytest.mark.parametrize("unit_level", [False, True])
def test_noise_has_scale_sigma_c_over_expected_batch(unit_level: bool) -> None:
    """Zero inputs give zero gradients, so each weight moves by the Gaussian noise alone."""
    dim, sigma, clip, lr = 4000, 0.7, 1.5, 1.0
    if unit_level:
        sizes = [1 + i % 3 for i in range(50)]
        unit_of = torch.repeat_interleave(torch.arange(50), torch.tensor(sizes))
        n = len(unit_of)
        dataset = UnitDataset(torch.zeros(n, dim), torch.zeros(n), unit_of, unit="machine")
    else:
        dataset = torch.utils.data.TensorDataset(torch.zeros(50, dim), torch.zeros(50))
    model = nn.Sequential(nn.Linear(dim, 1, bias=False), nn.Flatten(0))
    before = model[0].weight.detach().clone()
    cfg = LocalTrainConfig(batch_size=10, lr=lr, max_grad_norm=clip, reproducible_dp=True, seed=3)
    result = train_local(model, dataset, nn.MSELoss(), cfg, noise_multiplier=sigma)
    # 50 units (or examples), 10 expected per batch: q = 1/5, 5 steps, expected batch 10.
    assert result.steps == 5
    moved = (model[0].weight.detach() - before).ravel() / lr
    expected_var = result.steps * (sigma * clip / 10) ** 2
    measured = float(moved.var())
    # The sample variance of 4000 Gaussian draws has a relative sd of sqrt(2/4000) = 2.2%.
    assert measured == pytest.approx(expected_var, rel=0.1)
    assert abs(float(moved.mean())) < 4 * math.sqrt(expected_var / dim)


# ------------------------------------------------------------------ reported epsilon


@pytest.mark.filterwarnings("ignore:Optimal order is the")
@pytest.mark.parametrize(
    ("task_name", "unit", "batch_size"),
    [("rul", "machine", 3), ("tep_fault", None, 8)],
)
def test_reported_epsilon_is_per_unit_and_matches_dp_accounting(
    tmp_path: Path, task_name: str, unit: str | None, batch_size: int
) -> None:
    task = get_task(task_name)
    if task_name == "rul":
        frame = rul_frame((95, 31, 80, 64, 120, 45, 70, 33, 52, 101))
        # Independent count of units: machines with at least one 30-cycle window.
        n_units = int((frame.groupby(rul_source.UNIT).size() >= 30).sum())
    else:
        frame = tep_frame((23, 10, 4, 12, 40, 17))
        n_units = int(sum(n // 5 for n in frame.groupby(tep_source.RUN).size()))
    data = tmp_path / "factory.parquet"
    frame.to_parquet(data)
    planned, budget = 3, 3.0
    cfg = LocalTrainConfig(local_epochs=2, batch_size=batch_size, lr=0.01, reproducible_dp=True)
    instruction = instruction_for(cfg, "run", 1, planned, task=task.name, delta=DELTA)
    site = FactorySite("f0", data, tmp_path / "ledger.json", budget, DELTA)
    result = run_factory_round(
        task,
        instruction,
        site,
        task.build_model().state_dict(),
        reproducible_dp=cfg.reproducible_dp,
        privacy_unit=unit,
    )
    metrics = result.metrics
    q = 1 / math.ceil(n_units / batch_size)
    round_steps = cfg.local_epochs * int(1 / q)
    assert metrics["num-examples"] == n_units
    assert metrics["sample_rate"] == q
    assert metrics["steps"] == round_steps
    sigma = metrics["noise_multiplier"]
    # The round's reported spend, and the whole run's planned spend (the budget).
    assert metrics["epsilon"] == pytest.approx(
        dp_accounting_epsilon(sigma, q, round_steps), rel=0.02
    )
    assert budget == pytest.approx(dp_accounting_epsilon(sigma, q, planned * round_steps), rel=0.02)


def test_rows_are_units_only_where_every_row_is_one_training_unit():
    """A factory's row count is its unit count for row-level units only: the policy plans from
    it before reading data there, and from the true count after loading elsewhere."""
    assert get_task("molding_quality").rows_are_units()
    assert get_task("cell_defect").rows_are_units()
    assert not get_task("tep_fault").rows_are_units()
    assert not get_task("tep_fault").rows_are_units("run")
    assert not get_task("rul").rows_are_units("machine")
