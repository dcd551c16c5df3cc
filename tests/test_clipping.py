"""Book-keeping clipping: per-sample norms and clipped sums against explicit computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_client.clipping import BookKeepingClipper, bk_supported


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(7, 16),
        nn.LayerNorm(16, elementwise_affine=False),
        nn.GELU(),
        nn.Linear(16, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def _explicit_grouped(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, max_norm: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each group's summed-loss gradient by autograd, one group at a time: norms, clipped sum."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    per_group = []
    for u in range(int(groups.max()) + 1):
        rows = groups == u
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum")
        per_group.append(torch.autograd.grad(loss, params))
    norms = torch.stack([torch.sqrt(sum((g * g).sum() for g in grads)) for grads in per_group])
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {
        name: sum(c * grads[k] for c, grads in zip(coef, per_group, strict=True))
        for k, name in enumerate(names)
    }
    return norms, summed


def _explicit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_norm: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample gradients one sample at a time: their norms and the clipped sum."""
    return _explicit_grouped(model, x, y, torch.arange(len(x)), max_norm)


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 100.0])
def test_clipped_sum_matches_explicit_per_sample_gradients(max_norm: float) -> None:
    model = _net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(20, 7, generator=gen) * 3
    y = torch.randint(0, 3, (20,), generator=gen)
    expected_norms, expected = _explicit(model, x, y, max_norm)

    clipper = BookKeepingClipper(model, max_norm)
    clipper.reset()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    norms = clipper.backward(losses)
    clipper.remove()
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_parameters_and_empty_batches() -> None:
    model = _net()
    model[0].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 7, generator=gen), torch.randint(0, 3, (9,), generator=gen)
    _, expected = _explicit(model, x, y, 0.5)
    clipper = BookKeepingClipper(model, 0.5)
    clipper.reset()
    clipper.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p.grad is None

    for p in model.parameters():
        p.grad = None
    clipper.reset()
    empty = model(torch.zeros(0, 7))
    norms = clipper.backward(nn.functional.cross_entropy(empty, y[:0], reduction="none"))
    assert norms.shape == (0,)
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and not p.grad.any()


def test_hooks_record_only_training_passes_and_are_removed() -> None:
    model = _net()
    clipper = BookKeepingClipper(model, 1.0)
    with torch.no_grad():
        model(torch.randn(4, 7))
    model.eval()
    model(torch.randn(4, 7))
    assert not clipper._records
    clipper.remove()
    model.train()
    model(torch.randn(4, 7))
    assert not clipper._records
    assert all(not m._forward_hooks for m in model.modules())


def test_unsupported_models_are_refused() -> None:
    assert bk_supported(_net())
    assert not bk_supported(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))
    assert not bk_supported(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError):
        BookKeepingClipper(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), 1.0)

    shared = nn.Linear(4, 4)
    tied = BookKeepingClipper(nn.Sequential(shared, nn.ReLU(), shared), 1.0)
    tied.reset()
    with pytest.raises(RuntimeError, match="twice"):
        nn.Sequential(shared, nn.ReLU(), shared)(torch.randn(2, 4))
    tied.remove()

    seq = nn.Linear(4, 2)
    clipper = BookKeepingClipper(seq, 1.0)
    with pytest.raises(RuntimeError, match="2-D"):
        seq(torch.randn(2, 3, 4))
    clipper.remove()


@pytest.mark.parametrize(
    ("sizes", "max_norm"),
    [
        ((3, 1, 5, 2), 0.5),  # small groups: Gram-matrix path
        ((40, 1, 25), 1.0),  # groups larger than a layer: materialised-gradient path
        ((1, 1, 1, 1), 0.05),  # groups of one equal per-sample clipping
    ],
)
def test_grouped_clipping_clips_each_groups_summed_gradient(
    sizes: tuple[int, ...], max_norm: float
) -> None:
    model = _net(3)
    gen = torch.Generator().manual_seed(4)
    n = sum(sizes)
    x = torch.randn(n, 7, generator=gen) * 2
    y = torch.randint(0, 3, (n,), generator=gen)
    # Groups interleaved rather than contiguous: the clipper must not rely on the order.
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    perm = torch.randperm(n, generator=gen)
    x, y, groups = x[perm], y[perm], groups[perm]
    expected_norms, expected = _explicit_grouped(model, x, y, groups, max_norm)

    clipper = BookKeepingClipper(model, max_norm)
    clipper.reset()
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    norms = clipper.backward(losses, groups=groups)
    clipper.remove()
    assert norms.shape == (len(sizes),)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-4, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_clipping_rejects_a_missing_group_index() -> None:
    model = _net()
    clipper = BookKeepingClipper(model, 1.0)
    clipper.reset()
    x = torch.randn(4, 7)
    target = torch.zeros(4, dtype=torch.long)
    losses = nn.functional.cross_entropy(model(x), target, reduction="none")
    with pytest.raises(ValueError, match="every index"):
        clipper.backward(losses, groups=torch.tensor([0, 0, 2, 2]))
    clipper.remove()
