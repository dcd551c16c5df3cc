"""The ``cell_defect`` standard model on a small slice of the real ELPV images.

Data split and schema checks, the CNN and its DP-SGD clipping (checked against per-sample
gradients from ``torch.func``), the numpy metrics against scikit-learn, and one 2-factory,
1-round federation through the real ServerApp and ClientApp.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from PIL import Image
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from fl_client.clipping import bk_supported
from fl_client.training import LocalTrainConfig, steps_per_epoch, train_local
from standard_models import DataValidationError, PartitionConfig, get_task
from standard_models.cell_defect import source
from standard_models.cell_defect.dataset import decode_images
from standard_models.cell_defect.metrics import (
    balanced_accuracy_at,
    best_f1_threshold,
    f1_at,
    pr_auc,
)
from standard_models.common import count_parameters

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
SLICE = 4  # cells per module block in the sliced data (45 blocks)


def _slice(num_factories: int, partition: PartitionConfig | None = None):
    return source.generate(num_factories, 0, partition or PartitionConfig(), cells_per_block=SLICE)


@pytest.fixture(scope="module")
def sliced():
    return _slice(4)


# ------------------------------------------------------------------------------ data


def test_catalogue_matches_the_published_counts() -> None:
    cat = source.catalogue()
    assert len(cat) == 2624
    counts = cat.groupby([source.TYPE, source.PROBABILITY]).size()
    assert counts["mono"].tolist() == [588, 117, 56, 313]
    assert counts["poly"].tolist() == [920, 178, 50, 402]
    assert int(cat[source.LABEL].sum()) == 56 + 313 + 50 + 402


def test_module_blocks_are_single_type_and_at_most_a_module() -> None:
    cat = source.catalogue()
    per_block = cat.groupby(source.MODULE)
    assert per_block.size().max() <= source.MODULE_CELLS
    assert (per_block[source.TYPE].nunique() == 1).all()
    assert 40 <= per_block.ngroups <= 50
    # consecutive cells only: every block's cell numbers are one contiguous range
    numbers = cat[source.CELL].str[4:].astype(int)
    spans = numbers.groupby(cat[source.MODULE]).agg(["min", "max", "size"])
    assert ((spans["max"] - spans["min"] + 1) == spans["size"]).all()
    assert source.module_blocks(np.array(["a"] * 130 + ["b"] * 5)).tolist() == (
        [0] * 43 + [1] * 44 + [2] * 43 + [3] * 5
    )


def test_holdout_is_whole_blocks_of_both_types() -> None:
    cat = source.catalogue()
    val, test = source.holdout_blocks(cat)
    assert not set(val) & set(test)
    for blocks in (val, test):
        held = cat[cat[source.MODULE].isin(blocks)]
        assert set(held[source.TYPE]) == {"mono", "poly"}
        assert 0.1 < held[source.LABEL].mean() < 0.5
        assert 300 < len(held) < 600


@pytest.mark.parametrize("num_factories", [1, 2, 4, 7])
def test_natural_plants_make_one_cell_type_each(num_factories: int) -> None:
    cat = source.catalogue()
    val, test = source.holdout_blocks(cat)
    train = sorted(set(cat[source.MODULE]) - set(val) - set(test))
    plants = source.natural_plants(cat, train, num_factories)
    assert len(plants) == num_factories
    assert sorted(b for p in plants for b in p) == train
    if num_factories > 1:
        kinds = [set(cat[cat[source.MODULE].isin(p)][source.TYPE]) for p in plants]
        assert all(len(k) == 1 for k in kinds) and set.union(*kinds) == {"mono", "poly"}
    with pytest.raises(ValueError, match="at most"):
        source.natural_plants(cat, train, len(train) + 1)


def test_natural_plants_differ_in_defect_rate(sliced) -> None:
    rates = [f[source.LABEL].mean() for f in sliced.factories]
    types = [set(f[source.TYPE]) for f in sliced.factories]
    assert types == [{"mono"}, {"mono"}, {"poly"}, {"poly"}]
    assert rates[0] < rates[1] and rates[2] < rates[3]


@pytest.mark.parametrize("scheme", ["natural", "dirichlet", "iid"])
def test_no_cell_in_two_places(scheme: str) -> None:
    data = _slice(3, PartitionConfig(scheme=scheme, alpha=0.3))
    frames = [*data.factories, data.validation, data.test]
    ids = [c for f in frames for c in f[source.CELL]]
    assert len(ids) == len(set(ids)) == 45 * SLICE
    train_modules = {m for f in data.factories for m in f[source.MODULE]}
    assert not train_modules & set(data.validation[source.MODULE])
    assert not train_modules & set(data.test[source.MODULE])


def test_feature_shift_changes_exposure_per_factory() -> None:
    plain = _slice(2)
    shifted = _slice(2, PartitionConfig(feature_shift=0.5))
    task = get_task("cell_defect")
    a = task.to_dataset(plain.factories[0]).tensors[0]
    b = task.to_dataset(shifted.factories[0]).tensors[0]
    assert not torch.equal(a, b)
    assert (a.mean() - b.mean()).abs() > 0.01
    pd.testing.assert_frame_equal(plain.validation, shifted.validation)


def test_images_are_downsampled_real_cells(sliced) -> None:
    task = get_task("cell_defect")
    x, y = task.to_dataset(sliced.validation).tensors
    assert x.shape[1:] == (1, 48, 48) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert -4 < float(x.mean()) < 4 and float(x.std()) > 0.3
    row = sliced.validation.iloc[0]
    rows = np.flatnonzero(source.labels()[source.CELL].to_numpy() == row[source.CELL])
    expected = source.load_images(rows, 48)[0]
    np.testing.assert_array_equal(decode_images(sliced.validation.iloc[:1], "v")[0], expected)


# ------------------------------------------------------------------------------ schema


def _png(array: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, "PNG")
    return buf.getvalue()


def test_parquet_round_trip_and_validation(tmp_path, sliced) -> None:
    task = get_task("cell_defect")
    path = tmp_path / "factory_000.parquet"
    sliced.factories[0].to_parquet(path, index=False)
    df = task.load_frame(path)
    pd.testing.assert_frame_equal(df, sliced.factories[0])

    bad = {
        "not a readable image": lambda d: d.assign(image=[b"garbage"] + list(d.image[1:])),
        "is 32x32, expected 48x48": lambda d: d.assign(
            image=[_png(np.zeros((32, 32), np.uint8))] + list(d.image[1:])
        ),
        "mode RGB": lambda d: d.assign(
            image=[_png(np.zeros((48, 48, 3), np.uint8), "RGB")] + list(d.image[1:])
        ),
        "missing column": lambda d: d.drop(columns=["image"]),
        "above the allowed maximum": lambda d: d.assign(defect=d.defect + 2),
    }
    for message, corrupt in bad.items():
        corrupt(sliced.factories[0]).to_parquet(path, index=False)
        with pytest.raises(DataValidationError, match=message) as err:
            task.load_frame(path)
        assert "factory_000.parquet" in str(err.value)
    in_memory = sliced.factories[0].assign(image=["a string"] + list(sliced.factories[0].image[1:]))
    with pytest.raises(DataValidationError, match="row 0: expected PNG bytes, found str"):
        task.schema.validate(in_memory, "factory_000.parquet")
    sliced.factories[0].assign(image=[b"garbage"] + list(sliced.factories[0].image[1:])).to_parquet(
        path, index=False
    )
    with pytest.raises(DataValidationError, match=r"column 'image': row 0"):
        task.load_frame(path)


def test_other_image_sizes_need_matching_files(sliced) -> None:
    task = get_task("cell_defect", image_size=64)
    with pytest.raises(DataValidationError, match="expected 64x64"):
        task.schema.validate(sliced.validation, "validation.parquet")
    assert task.build_model()(torch.zeros(2, 1, 64, 64)).shape == (2,)


# ------------------------------------------------------------------------------ model


def test_model_is_small_opacus_compatible_and_has_no_batchnorm() -> None:
    task = get_task("cell_defect")
    model = task.build_model()
    assert count_parameters(model) < 20_000
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    ModuleValidator.validate(model, strict=True)
    assert model(torch.zeros(3, 1, 48, 48)).shape == (3,)
    with pytest.raises(ValueError, match="expected"):
        model(torch.zeros(3, 48, 48))


def _manual_clipped_step(model, x, y, loss_fn, clip: float, lr: float) -> dict:
    """One DP-SGD step without noise from per-sample gradients computed by torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def sample_loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum((g.flatten(1) ** 2).sum(1) for g in grads.values()))
    coef = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {
        k: params[k] - lr * torch.einsum("i,i...->...", coef, g) / len(x) for k, g in grads.items()
    }


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_clipping_matches_torch_func_per_sample_gradients(sliced, mode: str) -> None:
    task = get_task("cell_defect")
    x, y = task.to_dataset(sliced.factories[1]).tensors
    x, y = x[:32], y[:32]
    torch.manual_seed(3)
    model = task.build_model()
    expected = _manual_clipped_step(copy.deepcopy(model), x, y, task.loss_fn(), 0.05, 0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=32),
            criterion=task.loss_fn(),
            noise_multiplier=0.0,
            max_grad_norm=0.05,
            grad_sample_mode=mode,
            poisson_sampling=False,
        )
    private, dp_opt, criterion = made[0], made[1], made[2] if mode == "ghost" else task.loss_fn()
    dp_opt.zero_grad()
    criterion(private(x), y).backward()
    dp_opt.step()
    state = private._module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_default_dp_training_runs_with_hooks_and_reports_every_metric(sliced) -> None:
    task = get_task("cell_defect")
    ds = task.to_dataset(pd.concat(sliced.factories, ignore_index=True))
    torch.manual_seed(0)
    model = task.build_model()
    # the default mode "bk" covers only Linear layers and the task declines ghost: hooks run
    assert not bk_supported(model) and not task.supports_ghost
    cfg = LocalTrainConfig(local_epochs=2, batch_size=32, lr=0.1, momentum=0.9, seed=1)
    result = train_local(
        model, ds, task.loss_fn(), cfg, noise_multiplier=0.5, supports_ghost=task.supports_ghost
    )
    assert result.steps == 2 * steps_per_epoch(len(ds), 32)
    assert result.noise_multiplier == 0.5
    metrics = task.evaluate(model, task.to_dataset(sliced.validation))
    assert set(metrics) == {"loss", "pr_auc", "f1", "balanced_accuracy", "precision", "recall"}
    assert all(isinstance(v, float) for v in metrics.values())


# ------------------------------------------------------------------------------ metrics


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=400)
    scores = np.round(rng.normal(size=400) + y, 1)  # rounding makes ties
    st, yt = torch.tensor(scores), torch.tensor(y)
    assert pr_auc(st, yt) == pytest.approx(average_precision_score(y, scores), abs=1e-12)
    for threshold in (-0.5, 0.0, 0.7):
        pred = (scores >= threshold).astype(int)
        assert f1_at(st, yt, threshold) == pytest.approx(f1_score(y, pred))
        assert balanced_accuracy_at(st, yt, threshold) == pytest.approx(
            balanced_accuracy_score(y, pred)
        )
    best = best_f1_threshold(st, yt)
    brute = max(np.unique(scores), key=lambda t: (f1_score(y, scores >= t), -t))
    assert best == pytest.approx(brute)
    assert np.isnan(pr_auc(st, torch.zeros_like(yt)))
    assert f1_at(st, torch.zeros_like(yt), 0.0) == 0.0


def test_main_score_is_the_main_metric(sliced) -> None:
    task = get_task("cell_defect")
    ds = task.to_dataset(sliced.validation)
    torch.manual_seed(0)
    out, target = task.predict(task.build_model(), ds)
    assert task.main_score(out, target) == task.output_metrics(out, target)["pr_auc"]
    assert task.privacy_unit.name == "image"


# ------------------------------------------------------------------------------ federation


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_two_factory_federation_on_a_slice(tmp_path, monkeypatch) -> None:
    from experiments.inprocess import run_inprocess
    from fl_server.config import compose_config, finalize
    from standard_models.cell_defect import CellDefectTask

    def sliced_generate(self, num_factories, seed, partition):
        return source.generate(num_factories, seed, partition, self.image_size, SLICE)

    monkeypatch.setattr(CellDefectTask, "generate", sliced_generate)
    cfg = compose_config(
        [
            "task=cell_defect",
            "federation.num_factories=2",
            "federation.num_rounds=1",
            "contribution=none",
            "privacy.epsilon=8",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_root={tmp_path / 'artifacts'}",
            "tracking.register_model=false",
            f"data_root={tmp_path / 'data'}",
        ]
    )
    summary = run_inprocess(finalize(cfg, base=tmp_path, output_dir=tmp_path / "out"), quiet=True)
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert set(summary["factory_epsilon"]) == {"factory_000", "factory_001"}
    assert all(0 < e <= 8.0 for e in summary["factory_epsilon"].values())
    assert 0.0 <= summary["test"]["pr_auc"] <= 1.0
    assert not summary["failures"]
