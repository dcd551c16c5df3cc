"""Local training: Opacus step/sample-rate semantics, ghost vs hooks, FedProx, empty batches."""

from __future__ import annotations

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_client.training import (
    LocalTrainConfig,
    PerSampleLoss,
    sample_rate_for,
    steps_per_epoch,
    train_local,
)


def _classification(n: int = 400, d: int = 6, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, generator=gen)
    y = (x @ w > 0).long()
    return TensorDataset(x, y)


def _mlp(d: int = 6, out: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, out))


def _full_loss(model: nn.Module, ds: TensorDataset, loss_fn: nn.Module) -> float:
    x, y = ds.tensors
    with torch.no_grad():
        return float(loss_fn(model(x), y))


@pytest.mark.parametrize(
    ("n", "batch"), [(1, 1), (10, 64), (100, 7), (93, 1), (99, 1), (1000, 64), (6000, 64)]
)
def test_sample_rate_and_steps_match_opacus(n: int, batch: int) -> None:
    ds = TensorDataset(torch.zeros(n, 1), torch.zeros(n))
    dp_loader = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=batch))
    assert sample_rate_for(n, batch) == dp_loader.sample_rate
    assert steps_per_epoch(n, batch) == len(dp_loader) == len(list(dp_loader))


def test_steps_differ_from_loader_length_where_opacus_rounds_down() -> None:
    # 93 batches: Opacus samples int(1 / (1 / 93)) == 92 batches per epoch.
    assert steps_per_epoch(93, 1) == 92
    assert steps_per_epoch(92, 1) == 92


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_dp_training_reduces_loss_and_takes_planned_steps(mode: str) -> None:
    ds = _classification()
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    before = _full_loss(model, ds, loss_fn)
    cfg = LocalTrainConfig(
        local_epochs=3, batch_size=32, lr=0.3, grad_sample_mode=mode, reproducible_dp=True
    )
    result = train_local(model, ds, loss_fn, cfg, noise_multiplier=0.7)
    after = _full_loss(model, ds, loss_fn)
    assert after < 0.8 * before
    assert result.steps == 3 * steps_per_epoch(len(ds), 32)
    assert result.sample_rate == sample_rate_for(len(ds), 32)
    assert result.noise_multiplier == 0.7
    assert result.num_examples == len(ds)
    assert set(result.state_dict) == set(_mlp().state_dict())
    assert not any(k.startswith("_module.") for k in result.state_dict)
    for key, value in model.state_dict().items():
        assert torch.equal(result.state_dict[key], value)


def test_every_mode_trains_identically_with_the_same_batches() -> None:
    # Same seed, hence the same Poisson batches; no noise, so every difference would be in the
    # clipping, the scaling or the sampling. The noise of each mode (drawn per parameter by
    # Opacus, in one flat buffer for "bk") is compared by its measured std in test_dp_mechanism.
    ds = _classification(n=200)
    results = {}
    for mode in ("bk", "ghost", "hooks"):
        cfg = LocalTrainConfig(
            local_epochs=2, batch_size=16, lr=0.2, max_grad_norm=0.5, grad_sample_mode=mode,
            reproducible_dp=True, seed=3,
        )
        results[mode] = train_local(
            _mlp(seed=1), ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=0.0
        ).state_dict
    for mode in ("bk", "ghost"):
        for key in results[mode]:
            torch.testing.assert_close(results[mode][key], results["hooks"][key])


def test_ghost_clipping_is_correct_for_losses_with_extra_dimensions() -> None:
    # MSELoss on [batch, 1] targets: Opacus's ghost criterion alone broadcasts the clipping
    # coefficients to [batch, batch]; PerSampleLoss reduces the loss to [batch] first.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen) * 3
    ds = TensorDataset(x, x @ torch.tensor([[2.0], [-1.0], [0.5]]) * 4)
    results = {}
    for mode in ("bk", "ghost", "hooks"):
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        cfg = LocalTrainConfig(
            batch_size=16, lr=0.1, max_grad_norm=0.1, grad_sample_mode=mode, reproducible_dp=True
        )
        train_local(model, ds, nn.MSELoss(), cfg, noise_multiplier=0.0)
        results[mode] = model.state_dict()
    for mode in ("bk", "ghost"):
        for key in results[mode]:
            torch.testing.assert_close(results[mode][key], results["hooks"][key])


def test_per_sample_loss_matches_mean_reduction() -> None:
    out, target = torch.randn(5, 3), torch.randn(5, 3)
    wrapped = PerSampleLoss(nn.MSELoss())
    torch.testing.assert_close(wrapped(out, target), nn.MSELoss()(out, target))
    wrapped.reduction = "none"
    assert wrapped(out, target).shape == (5,)
    assert wrapped(out[:0], target[:0]).shape == (0,)


@pytest.mark.parametrize("dp", [True, False])
def test_fedprox_keeps_weights_closer_to_the_global_model(dp: bool) -> None:
    ds = _classification(n=300, seed=1)
    global_state = {k: v.clone() for k, v in _mlp(seed=5).state_dict().items()}

    def distance(mu: float) -> float:
        model = _mlp(seed=5)
        cfg = LocalTrainConfig(
            local_epochs=2, batch_size=32, lr=0.2, proximal_mu=mu, dp=dp, reproducible_dp=True
        )
        state = train_local(
            model, ds, nn.CrossEntropyLoss(), cfg,
            noise_multiplier=0.5 if dp else None, global_state=global_state,
        ).state_dict
        return sum(float((state[k] - global_state[k]).pow(2).sum()) for k in state) ** 0.5

    without, with_prox = distance(0.0), distance(1.0)
    assert with_prox < 0.8 * without


def test_empty_poisson_batches_do_not_crash() -> None:
    ds = _classification(n=5)
    cfg = LocalTrainConfig(local_epochs=4, batch_size=1, lr=0.1, reproducible_dp=True, seed=2)
    for mode in ("bk", "ghost", "hooks"):
        cfg.grad_sample_mode = mode
        result = train_local(_mlp(), ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=1.0)
        # q = 0.2 per sample over 20 steps: empty batches are all but certain
        assert result.steps == 4 * 5
        assert all(torch.isfinite(v).all() for v in result.state_dict.values())


def test_same_module_can_be_trained_again_after_a_round() -> None:
    ds = _classification(n=64)
    model = _mlp()
    cfg = LocalTrainConfig(batch_size=16, reproducible_dp=True)
    train_local(model, ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=1.0)
    again = train_local(model, ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=1.0)
    assert not any(k.startswith("_module.") for k in again.state_dict)


def test_non_private_training_reduces_loss_without_noise() -> None:
    ds = _classification()
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    before = _full_loss(model, ds, loss_fn)
    cfg = LocalTrainConfig(local_epochs=2, batch_size=32, lr=0.3, dp=False)
    result = train_local(model, ds, loss_fn, cfg, noise_multiplier=None)
    assert _full_loss(model, ds, loss_fn) < 0.8 * before
    assert result.noise_multiplier == 0.0
    assert result.steps == 2 * len(DataLoader(ds, batch_size=32))


def test_dp_requires_a_noise_multiplier() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        train_local(
            _mlp(), _classification(n=10), nn.CrossEntropyLoss(), LocalTrainConfig(),
            noise_multiplier=None,
        )


@pytest.fixture
def modes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ``grad_sample_mode`` of every call to Opacus's ``make_private``, in order."""
    from opacus import PrivacyEngine

    seen: list[str] = []
    original = PrivacyEngine.make_private

    def spy(self: PrivacyEngine, **kwargs: object) -> object:
        seen.append(str(kwargs["grad_sample_mode"]))
        return original(self, **kwargs)

    monkeypatch.setattr(PrivacyEngine, "make_private", spy)
    return seen


def test_ghost_falls_back_to_hooks_when_the_task_says_so(modes: list[str]) -> None:
    ds = _classification(n=100)
    cfg = LocalTrainConfig(batch_size=16, grad_sample_mode="ghost", reproducible_dp=True)
    for ghost_ok in (False, True):
        train_local(
            _mlp(), ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=1.0, supports_ghost=ghost_ok
        )
    assert modes == ["hooks", "ghost"]


def test_book_keeping_falls_back_to_ghost_for_other_layers(modes: list[str]) -> None:
    ds = _classification(n=100)
    cfg = LocalTrainConfig(batch_size=16, grad_sample_mode="bk", reproducible_dp=True)
    torch.manual_seed(0)
    with_norm = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    train_local(with_norm, ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=1.0)
    result = train_local(_mlp(), ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=1.0)
    assert modes == ["ghost"]  # the all-Linear model never went through make_private
    assert result.steps == steps_per_epoch(100, 16)
    assert not any(m._forward_hooks for m in with_norm.modules())


def test_training_reports_setup_and_epoch_times() -> None:
    ds = _classification(n=128)
    for dp in (True, False):
        cfg = LocalTrainConfig(local_epochs=3, batch_size=32, dp=dp, reproducible_dp=True)
        result = train_local(_mlp(), ds, nn.CrossEntropyLoss(), cfg,
                             noise_multiplier=1.0 if dp else None)
        assert len(result.epoch_seconds) == 3 and all(t > 0 for t in result.epoch_seconds)
        assert sum(result.epoch_seconds) <= result.train_seconds
        assert (result.setup_seconds > 0) is dp


def test_batched_fetching_yields_the_same_batches_as_item_fetching() -> None:
    """Fetching whole batches from the tensors changes no sample, order or Poisson draw."""
    from torch.utils.data import ConcatDataset, Dataset

    class ItemsOnly(Dataset):
        def __init__(self, ds: TensorDataset) -> None:
            self.ds = ds

        def __len__(self) -> int:
            return len(self.ds)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
            return self.ds[i]

    ds = _classification(n=150)
    halves = ConcatDataset([TensorDataset(*(t[:70] for t in ds.tensors)),
                            TensorDataset(*(t[70:] for t in ds.tensors))])
    for dp in (True, False):
        cfg = LocalTrainConfig(local_epochs=2, batch_size=16, lr=0.2, dp=dp,
                               reproducible_dp=True, seed=4)
        states = [
            train_local(_mlp(seed=2), data, nn.CrossEntropyLoss(), cfg,
                        noise_multiplier=0.8 if dp else None).state_dict
            for data in (ds, halves, ItemsOnly(ds))
        ]
        for other in states[1:]:
            for key in states[0]:
                torch.testing.assert_close(other[key], states[0][key])
