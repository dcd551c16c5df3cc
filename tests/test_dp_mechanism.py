"""The DP-SGD mechanism of local training, measured: noise std, clipping bound, Poisson batches.

Every clipping mode must release the same mechanism: the clipped sum plus Gaussian noise of std
``noise_multiplier * max_grad_norm`` per coordinate, divided by the expected batch size, over
batches drawn by Opacus's Poisson sampler. These tests measure each part through
``train_local`` itself rather than trusting how it is computed.
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fl_client.training import (
    LocalTrainConfig,
    _as_batch,
    _BatchIndexed,
    _PoissonBatches,
    _PreClippedOptimizer,
    train_local,
)
from standard_models.base import UnitDataset


def _one_step_update(mode: str, noise_multiplier: float, max_grad_norm: float) -> torch.Tensor:
    """The flat weight change of one DP step (lr 1, no momentum) on a single example.

    One example and batch size 1 give sample rate 1, one step per epoch and an expected batch
    size of 1, so the change is minus (clipped gradient + noise).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 60), nn.Tanh(), nn.Linear(60, 2))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    gen = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(1, 100, generator=gen) * 50, torch.tensor([1]))
    cfg = LocalTrainConfig(
        batch_size=1, lr=1.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
        reproducible_dp=True, seed=5,
    )
    result = train_local(model, ds, nn.CrossEntropyLoss(), cfg, noise_multiplier=noise_multiplier)
    assert result.steps == 1
    after = torch.cat([result.state_dict[k].flatten() for k in ("0.weight", "0.bias",
                                                                "2.weight", "2.bias")])
    return before - after


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_clipped_gradient_has_exactly_the_clipping_norm(mode: str) -> None:
    # The example's gradient is far above the bound, so its clipped norm is the bound itself
    # (Opacus's factor C / (norm + 1e-6), hence a relative shortfall of about 1e-6 / norm).
    bound = 0.05
    update = _one_step_update(mode, noise_multiplier=0.0, max_grad_norm=bound)
    norm = float(update.norm())
    assert norm <= bound * (1 + 1e-5)
    assert norm == pytest.approx(bound, rel=1e-4)


@pytest.mark.parametrize("mode", ["bk", "ghost", "hooks"])
def test_noise_has_the_std_the_accountant_assumes(mode: str) -> None:
    # Same seed, with and without noise: the same batch and clipped gradient, so the difference
    # is the noise alone. Its 6182 coordinates must be N(0, (sigma * C)^2).
    sigma, bound = 1.3, 0.2
    noise = _one_step_update(mode, sigma, bound) - _one_step_update(mode, 0.0, bound)
    n = noise.numel()
    std = float(noise.std())
    assert std == pytest.approx(sigma * bound, rel=0.04)  # sampling error of the std ~0.9 %
    assert abs(float(noise.mean())) < 4 * sigma * bound / math.sqrt(n)
    # Gaussian tails, not another distribution of the same std (e.g. uniform): about 4.6 %
    # of coordinates beyond two std, 0.27 % beyond three.
    beyond2 = float((noise.abs() > 2 * sigma * bound).float().mean())
    assert 0.035 < beyond2 < 0.058
    assert float((noise.abs() > 3 * sigma * bound).float().mean()) < 0.006


def _bk_optimizer(params: list[nn.Parameter], seed: int, sigma: float, bound: float,
                  batch: int) -> _PreClippedOptimizer:
    return _PreClippedOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=sigma,
        max_grad_norm=bound,
        expected_batch_size=batch,
        loss_reduction="mean",
        generator=torch.Generator().manual_seed(seed),
    )


def test_flat_noise_is_the_seeded_stream_laid_over_the_parameters() -> None:
    # Pins the layout: one normal_ draw of all coordinates, in parameter order, added to the
    # clipped sums and divided by the expected batch size, step after step.
    sigma, bound, batch = 0.9, 0.5, 8
    params = [nn.Parameter(torch.zeros(7, 5)), nn.Parameter(torch.zeros(7)),
              nn.Parameter(torch.zeros(1, 7)), nn.Parameter(torch.zeros(1))]
    opt = _bk_optimizer(params, seed=11, sigma=sigma, bound=bound, batch=batch)
    reference = torch.Generator().manual_seed(11)
    total = sum(p.numel() for p in params)
    for step in range(3):
        grads = [torch.full_like(p, float(step + 1)) * (i + 1) for i, p in enumerate(params)]
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        assert opt.pre_step()
        noise = torch.empty(total).normal_(mean=0.0, std=sigma * bound, generator=reference)
        expected = (torch.cat([g.flatten() for g in grads]) + noise) / batch
        got = torch.cat([p.grad.flatten() for p in params])
        assert torch.equal(got, expected)


def test_one_call_step_equals_the_general_path_and_leaves_skipped_steps_to_it() -> None:
    # The usual step (one gather into the buffer) and Opacus's pre_step through accumulate,
    # add_noise and scale_grad: the same noisy, scaled sums bit for bit, step after step.
    sigma, bound, batch = 0.8, 0.3, 5
    shapes = [(6, 4), (6,), (2, 6), (2,)]

    def run(general: bool) -> list[torch.Tensor]:
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = _bk_optimizer(params, seed=4, sigma=sigma, bound=bound, batch=batch)
        out = []
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.5 * step - i)
            if general:
                assert DPOptimizerFastGradientClipping.pre_step(opt)
            else:
                assert opt.pre_step()
            out.append(torch.cat([p.grad.flatten() for p in params]))
        return out

    for fast, general in zip(run(False), run(True), strict=True):
        assert torch.equal(fast, general)
    # A step to skip (gradient accumulation) is the general path's: nothing noised, the sums
    # kept for the next step.
    params = [nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = _bk_optimizer(params, seed=4, sigma=sigma, bound=bound, batch=batch)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.signal_skip_step(do_skip=True)
    assert not opt.pre_step()
    assert all(torch.equal(p.summed_grad, torch.ones_like(p)) for p in params)


def test_flat_noise_matches_opacus_in_distribution() -> None:
    # Opacus's own optimizer and the flat one, on the same clipped sums: the same mean and the
    # same std per coordinate (measured over 400 steps of 4 parameters).
    sigma, bound, batch = 1.1, 0.7, 4
    shapes = [(20, 10), (20,), (3, 20), (3,)]

    def noise_of(cls: type) -> torch.Tensor:
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = cls(
            torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=bound,
            expected_batch_size=batch, loss_reduction="mean",
            generator=torch.Generator().manual_seed(3),
        )
        draws = []
        for _ in range(400):
            opt.zero_grad(set_to_none=True)
            for p in params:
                p.grad = torch.ones_like(p)
            opt.pre_step()
            draws.append(torch.cat([p.grad.flatten() for p in params]) * batch - 1.0)
        return torch.stack(draws)

    ours, opacus = noise_of(_PreClippedOptimizer), noise_of(DPOptimizerFastGradientClipping)
    for draws in (ours, opacus):
        assert float(draws.std()) == pytest.approx(sigma * bound, rel=0.01)
        assert abs(float(draws.mean())) < 4 * sigma * bound / math.sqrt(draws.numel())
    # Per coordinate too (no coordinate left without noise or with another scale).
    per_coordinate = ours.std(dim=0) / (sigma * bound)
    assert float(per_coordinate.min()) > 0.8 and float(per_coordinate.max()) < 1.2


def test_poisson_batches_are_opacus_batches() -> None:
    # Sample rate 0.1 over 10 examples: about a third of the batches are empty. The same
    # generator seed on both sides.
    x, y = torch.arange(20.0).reshape(10, 2), torch.arange(10)
    seed = 9

    def opacus_loader() -> DPDataLoader:
        base = DataLoader(_BatchIndexed((x, y)), batch_size=1, collate_fn=_as_batch,
                          generator=torch.Generator().manual_seed(seed))
        return DPDataLoader.from_data_loader(base)

    ours = _PoissonBatches(opacus_loader().batch_sampler, _BatchIndexed((x, y)).__getitems__)
    theirs = opacus_loader()
    assert len(ours) == len(theirs) and ours.sample_rate == theirs.sample_rate
    sizes = []
    for _ in range(3):  # epochs: the generator's stream continues across them
        pairs = list(zip(ours, theirs, strict=True))
        assert len(pairs) == 10
        for (xa, ya), (xb, yb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.shape[1:] == (2,) and xa.dtype == xb.dtype and ya.dtype == yb.dtype
            sizes.append(len(ya))
    assert 0 in sizes and max(sizes) > 1


def test_poisson_batches_draw_whole_units_as_opacus_does() -> None:
    unit_of = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    units = UnitDataset(torch.randn(10, 3), torch.arange(10), unit_of, unit="machine")

    def opacus_loader() -> DPDataLoader:
        base = DataLoader(units, batch_size=2, collate_fn=_as_batch,
                          generator=torch.Generator().manual_seed(4))
        return DPDataLoader.from_data_loader(base)

    ours = _PoissonBatches(opacus_loader().batch_sampler, units.__getitems__)
    for a, b in zip(ours, opacus_loader(), strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
