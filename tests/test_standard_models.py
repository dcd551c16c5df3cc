"""Datasets, networks, losses, metrics and Opacus compatibility of every standard model."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from fl_client.clipping import bk_supported
from fl_client.training import LocalTrainConfig, train_local
from standard_models import FederatedData, PartitionConfig, get_task, ghost_supported
from standard_models.common import MLP, count_parameters, window_end_indices
from standard_models.tep_fault import dataset as tep_dataset
from standard_models.tep_fault import source as tep_source

TASKS = ("tep_fault", "molding_quality", "rul")
# Opacus' hooks warn that the input needs no gradient, which is expected for a first layer.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models train fastest single-threaded; extra threads only contend on a busy host."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def federations() -> dict[str, FederatedData]:
    return {name: get_task(name).generate(4, 0, PartitionConfig()) for name in TASKS}


def _small(ds: TensorDataset, n: int = 256) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in ds.tensors))


# --------------------------------------------------------------------------- windowing


def test_window_indices_respect_runs_and_gaps() -> None:
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    order = np.array([0, 1, 2, 3, 5, 6, 8, 9, 10])  # gap between 6 and 8 in group 1
    np.testing.assert_array_equal(window_end_indices(groups, order, 3), [2, 3, 8])
    np.testing.assert_array_equal(window_end_indices(groups, order, 2, stride=2), [1, 3, 5, 7])
    with pytest.raises(ValueError):
        window_end_indices(groups, order, 0)


def test_tep_windows_hold_consecutive_standardised_samples(federations) -> None:
    task = get_task("tep_fault")
    df = federations["tep_fault"].factories[0]
    ds = task.to_dataset(df)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    w = tep_dataset.DEFAULT_WINDOW
    assert x.shape[1] == w * 52
    runs = df.groupby("run_id").size()
    assert len(ds) == int((runs - (w - 1)).clip(lower=0).sum())
    # The first window of the first run (sorted) is that run's first w samples, standardised.
    first = df[df["run_id"] == sorted(df["run_id"].unique())[0]].sort_values("t")
    mean, std = tep_source.reference_stats()
    expected = (first[list(tep_source.FEATURES)].to_numpy()[:w] - mean) / std
    np.testing.assert_allclose(x[0].reshape(w, 52).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert y[0].item() == first["fault"].iloc[w - 1]
    # Shuffled rows give the same windows: the loader sorts by run and time itself.
    shuffled = task.to_dataset(df.sample(frac=1.0, random_state=0))
    torch.testing.assert_close(shuffled.tensors[0], x)


def test_normal_operation_is_standardised_near_zero() -> None:
    mean, std = tep_source.reference_stats()
    z = (tep_source.train_runs()[0] - mean) / std
    assert np.abs(z.mean(axis=0)).max() < 1e-6 and np.allclose(z.std(axis=0), 1.0)


@pytest.mark.parametrize(
    ("task", "columns"), [("tep_fault", ("run_id", "t")), ("rul", ("unit_id", "cycle"))]
)
def test_too_short_runs_give_no_window(federations, task: str, columns: tuple[str, str]) -> None:
    df = federations[task].factories[0]
    window = get_task(task).window
    first = df[df[columns[0]] == df[columns[0]].iloc[0]].head(window - 1)
    with pytest.raises(ValueError, match="no"):
        get_task(task).to_dataset(first)


def test_rul_target_is_scaled_and_capped(federations) -> None:
    task = get_task("rul")
    df = federations["rul"].factories[0]
    y = task.to_dataset(df).tensors[1]
    assert y.dtype == torch.float32 and 0.0 <= y.min() and y.max() == 1.0
    uncapped = df.assign(rul=df["rul"] * 3.0)
    assert task.to_dataset(uncapped).tensors[1].max() == 1.0


def test_molding_tensors_use_fixed_reference(federations) -> None:
    task = get_task("molding_quality")
    df = federations["molding_quality"].factories[1]
    x, y = task.to_dataset(df).tensors
    assert x.shape == (len(df), 11) and y.dtype == torch.int64
    # Fixed reference: the scaling of a row does not depend on the other rows.
    torch.testing.assert_close(task.to_dataset(df.head(3)).tensors[0], x[:3])
    assert x.abs().mean() < 1.5


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name", TASKS)
def test_forward_shapes_and_no_batchnorm(federations, name: str) -> None:
    task = get_task(name)
    ds = _small(task.to_dataset(federations[name].validation), 32)
    model = task.build_model()
    out = model(ds.tensors[0])
    expected = (32, 22) if name == "tep_fault" else (32,)
    assert out.shape == expected
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loss = task.loss_fn()(out, ds.tensors[1])
    assert loss.ndim == 0 and torch.isfinite(loss)
    # An empty Poisson batch (DP-SGD draws one now and then, often with coarse units) keeps
    # its feature axes and must pass through the model without a shape error.
    empty = model(ds.tensors[0][:0])
    assert empty.shape == (0, *expected[1:])


def test_parameter_counts() -> None:
    assert 20_000 <= count_parameters(get_task("tep_fault").build_model()) <= 150_000
    assert 50_000 <= count_parameters(get_task("rul").build_model()) <= 150_000
    assert count_parameters(get_task("molding_quality").build_model()) < 20_000


def test_mlp_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        MLP(4, 2, activation="tanh")
    with pytest.raises(ValueError):
        MLP(4, 2, squeeze_output=True)


@pytest.mark.parametrize("name", TASKS)
def test_opacus_validator_and_ghost_support(name: str) -> None:
    task = get_task(name)
    model = task.build_model()
    assert ModuleValidator.validate(model, strict=True) == []
    assert task.supports_ghost is ghost_supported(model) is True
    assert bk_supported(model)  # every trainable layer is a Linear: one-pass DP clipping
    assert task.loss_fn().reduction == "mean"


def test_ghost_supported_detects_unsupported_layers() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    assert not ghost_supported(nn.Sequential(nn.Linear(3, 3), Scale()))


def _private_step(task, model, ds, mode: str, noise: float) -> tuple[nn.Module, float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(ds, batch_size=64, shuffle=False)
    criterion = task.loss_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=criterion,
            noise_multiplier=noise,
            max_grad_norm=0.5,
            grad_sample_mode=mode,
            poisson_sampling=False,
        )
    if mode == "ghost":
        private, dp_opt, dp_criterion, private_loader = result
    else:
        private, dp_opt, private_loader = result
        dp_criterion = criterion
    x, y = next(iter(private_loader))
    dp_opt.zero_grad()
    loss = dp_criterion(private(x), y)
    loss.backward()
    dp_opt.step()
    return private, float(loss.item())


@pytest.mark.parametrize("name", TASKS)
def test_one_dp_sgd_step_with_ghost_clipping(federations, name: str) -> None:
    task = get_task(name)
    ds = _small(task.to_dataset(federations[name].factories[0]), 128)
    torch.manual_seed(0)
    model = task.build_model()
    before = copy.deepcopy(model.state_dict())
    _, loss = _private_step(task, model, ds, "ghost", noise=1.0)
    assert math.isfinite(loss)
    changed = [not torch.equal(before[k], v) for k, v in model.state_dict().items()]
    assert all(changed)


@pytest.mark.parametrize("name", TASKS)
def test_ghost_clipping_matches_per_sample_hooks(federations, name: str) -> None:
    """Without noise, ghost clipping must produce the same update as explicit per-sample clipping,
    which holds only if the loss really decomposes per sample."""
    task = get_task(name)
    ds = _small(task.to_dataset(federations[name].factories[0]), 64)
    torch.manual_seed(1)
    ghost_model = task.build_model()
    hooks_model = copy.deepcopy(ghost_model)
    _private_step(task, ghost_model, ds, "ghost", noise=0.0)
    _private_step(task, hooks_model, ds, "hooks", noise=0.0)
    for (k, a), b in zip(
        ghost_model.state_dict().items(), hooks_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", TASKS)
def test_book_keeping_training_matches_per_sample_hooks(federations, name: str) -> None:
    """The default one-pass clipping trains each standard model exactly as Opacus's explicit
    per-sample clipping does, Poisson batches included; without noise, whose draw order differs
    between the modes (its distribution is measured in test_dp_mechanism.py)."""
    task = get_task(name)
    ds = _small(task.to_dataset(federations[name].factories[0]), 300)
    states = {}
    for mode in ("bk", "hooks"):
        torch.manual_seed(2)
        model = task.build_model()
        cfg = LocalTrainConfig(
            local_epochs=2,
            batch_size=32,
            lr=0.1,
            momentum=0.9,
            max_grad_norm=0.5,
            grad_sample_mode=mode,
            reproducible_dp=True,
        )
        states[mode] = train_local(model, ds, task.loss_fn(), cfg, noise_multiplier=0.0).state_dict
    for key, value in states["bk"].items():
        torch.testing.assert_close(value, states["hooks"][key], rtol=1e-4, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------ metrics


@pytest.mark.parametrize("name", TASKS)
def test_evaluate_returns_python_floats_and_restores_mode(federations, name: str) -> None:
    task = get_task(name)
    ds = task.to_dataset(federations[name].validation)
    model = task.build_model().train()
    metrics = task.evaluate(model, ds)
    assert model.training
    assert "loss" in metrics and task.main_metric in metrics
    assert all(type(v) is float and math.isfinite(v) for v in metrics.values())


def test_metric_values_on_known_predictions() -> None:
    tep, molding, rul = (get_task(n) for n in TASKS)
    y = torch.tensor([0, 1, 2, 2])
    perfect = nn.functional.one_hot(y, 22).float() * 10

    class Fixed(nn.Module):
        def __init__(self, out: torch.Tensor) -> None:
            super().__init__()
            self.out = out

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out[: len(x)]

    ds = TensorDataset(torch.zeros(4, 1), y)
    m = tep.evaluate(Fixed(perfect), ds)
    assert m["macro_f1"] == 1.0 and m["accuracy"] == 1.0
    wrong = nn.functional.one_hot((y + 1) % 22, 22).float() * 10
    m = tep.evaluate(Fixed(wrong), ds)
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0

    yb = torch.tensor([0, 0, 1, 0])
    m = molding.evaluate(Fixed(torch.tensor([-3.0, -2.0, 4.0, -1.0])), TensorDataset(yb, yb))
    assert m["pr_auc"] == 1.0 and m["f1"] == 1.0
    m = molding.evaluate(
        Fixed(torch.tensor([-3.0, -2.0, 4.0])), TensorDataset(yb[:3] * 0, yb[:3] * 0)
    )
    assert math.isnan(m["pr_auc"])

    target = torch.tensor([1.0, 0.5, 0.0])
    m = rul.evaluate(Fixed(torch.tensor([0.9, 0.5, -0.2])), TensorDataset(target, target))
    assert m["mae"] == pytest.approx(12.5 / 3) and m["rmse"] == pytest.approx(12.5 / 3**0.5)


# ------------------------------------------------------------------------------ learning


def _train(task, datasets, steps: int, lr: float = 0.05) -> nn.Module:
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loader = DataLoader(ConcatDataset(datasets), batch_size=64, shuffle=True)
    loss_fn = task.loss_fn()
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return model


def test_tep_training_beats_chance(federations) -> None:
    task = get_task("tep_fault")
    data = federations["tep_fault"]
    model = _train(task, [task.to_dataset(f) for f in data.factories], steps=300, lr=0.1)
    val = task.evaluate(model, task.to_dataset(data.validation))
    assert val["macro_f1"] > 0.4, val  # chance is 1/22 = 0.045


def test_molding_training_beats_prevalence(federations) -> None:
    task = get_task("molding_quality")
    data = federations["molding_quality"]
    model = _train(task, [task.to_dataset(f) for f in data.factories], steps=400)
    val = task.evaluate(model, task.to_dataset(data.validation))
    prevalence = data.validation["defect"].mean()
    assert val["pr_auc"] > 4 * prevalence, (val, prevalence)


def test_rul_training_beats_predicting_the_mean(federations) -> None:
    task = get_task("rul")
    data = federations["rul"]
    train = [task.to_dataset(f) for f in data.factories]
    model = _train(task, train, steps=300)
    val_ds = task.to_dataset(data.validation)
    val = task.evaluate(model, val_ds)
    mean = torch.cat([d.tensors[1] for d in train]).mean()
    baseline = float(((val_ds.tensors[1] - mean) * 125).pow(2).mean().sqrt())
    assert val["rmse"] < 0.6 * baseline, (val, baseline)


def test_frames_round_trip_through_parquet(tmp_path, federations) -> None:
    for name in TASKS:
        task = get_task(name)
        df = federations[name].factories[0]
        path = tmp_path / f"{name}.parquet"
        df.to_parquet(path, index=False)
        loaded = task.load_frame(path)
        pd.testing.assert_frame_equal(loaded, df)
        torch.testing.assert_close(
            task.to_dataset(loaded).tensors[0], task.to_dataset(df).tensors[0]
        )


@pytest.mark.parametrize("task_name", ["tep_fault", "molding_quality", "rul"])
def test_main_score_is_the_main_metric(task_name):
    """The cheap path contribution scoring uses agrees with the full metrics."""
    task = get_task(task_name)
    gen = torch.Generator().manual_seed(3)
    n = 500
    if task_name == "tep_fault":
        outputs = torch.randn(n, 22, generator=gen)
        target = torch.randint(0, 20, (n,), generator=gen)  # two classes absent
    elif task_name == "molding_quality":
        outputs = torch.randn(n, generator=gen)
        target = (torch.rand(n, generator=gen) < 0.1).float()
    else:
        outputs = torch.rand(n, generator=gen)
        target = torch.rand(n, generator=gen)
    full = task.output_metrics(outputs, target)[task.main_metric]
    assert task.main_score(outputs, target) == pytest.approx(full, rel=1e-9)


@pytest.mark.parametrize("task_name", ["tep_fault", "molding_quality", "rul"])
def test_main_scores_of_a_batch_equal_its_items_scored_one_at_a_time(task_name):
    """Contribution scoring scores permutation prefixes as one batch: bit for bit the same
    numbers as one call per output set (``tep_fault`` batches its count, the others loop)."""
    task = get_task(task_name)
    gen = torch.Generator().manual_seed(4)
    m, n = 7, 400
    if task_name == "tep_fault":
        outputs = torch.randn(m, n, 22, generator=gen)
        outputs[3] = 0.0  # every row predicts class 0: one class present in the predictions
        target = torch.randint(0, 20, (n,), generator=gen)
    elif task_name == "molding_quality":
        outputs = torch.randn(m, n, generator=gen)
        target = (torch.rand(n, generator=gen) < 0.1).float()
    else:
        outputs = torch.rand(m, n, generator=gen)
        target = torch.rand(n, generator=gen)
    batch = task.main_scores(outputs, target)
    assert batch.shape == (m,)
    np.testing.assert_array_equal(batch, [task.main_score(out, target) for out in outputs])
    assert task.main_scores(outputs[:0], target).shape == (0,)


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    from standard_models.tep_fault.metrics import macro_f1

    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        logits = torch.randn(300, 22, generator=gen)
        target = torch.randint(0, 15, (300,), generator=gen)
        y, pred = target.numpy(), logits.argmax(1).numpy()
        expected = f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)
        assert macro_f1(logits, target) == pytest.approx(expected, abs=1e-12)


def test_pr_auc_matches_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score

    from standard_models.molding_quality.metrics import pr_auc

    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        logits = torch.randint(-3, 4, (400,), generator=gen).float()  # many ties
        target = (torch.rand(400, generator=gen) < 0.1).float()
        expected = average_precision_score(target.numpy(), torch.sigmoid(logits).numpy())
        assert pr_auc(logits, target) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(pr_auc(torch.zeros(5), torch.zeros(5)))
