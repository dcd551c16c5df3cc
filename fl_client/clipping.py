"""Per-sample gradient clipping in a single backward pass for networks built from ``Linear``.

DP-SGD needs, at every step, the sum over the batch of each sample's gradient clipped to norm
``C``. Opacus obtains it either by materialising per-sample gradients (``hooks``) or, with ghost
clipping, by two full backward passes (one for the per-sample norms, one for the re-weighted
loss). For a ``Linear`` layer applied to a 2-D input ``A`` (batch x features) there is a cheaper
exact route. Sample ``i``'s weight gradient is the outer product ``g_i a_i^T`` of the gradient
``g_i`` of its loss with respect to the layer's output and its input ``a_i``, so

* its squared norm is ``|g_i|^2 |a_i|^2`` (``|g_i|^2`` for the bias), and
* the clipped sum is ``sum_i c_i g_i a_i^T = (c * G)^T A`` (``sum_i c_i g_i`` for the bias).

One backward pass from the per-sample losses to the layer outputs gives every ``G`` (no
parameter gradient is formed), the norms and the clipping factors
``c_i = min(1, C / (norm_i + 1e-6))`` (Opacus's formula) follow, and one matrix product per layer
gives the clipped sum: the book-keeping technique of Z. Bu, Y.-X. Wang, S. Zha and G. Karypis,
"Differentially private optimization on large model at small cost", ICML 2023.

Unit-level DP-SGD clips the summed gradient of each *group* of samples (all examples of one
privacy unit) instead of each sample's. The clipped sum keeps the same form with ``c_i`` the
factor of sample ``i``'s group; the group's squared weight-gradient norm is
``|sum_{i in u} g_i a_i^T|^2 = sum_{i,j in u} (g_i . g_j)(a_i . a_j)``, computed from the
group's Gram matrices or, when a group is larger than the layer, from its materialised
gradient ``G_u^T A_u``, whichever is cheaper (the trick of ghost clipping, applied per group).

Only the clipping is computed here. Poisson sampling, the Gaussian noise, the scaling by the
expected batch size and the privacy accounting stay with Opacus (its ``DPDataLoader``,
``DPOptimizerFastGradientClipping`` and accountant), exactly as in its ghost clipping mode.
"""

from __future__ import annotations

import torch
from torch import nn


def bk_supported(model: nn.Module) -> bool:
    """Whether every module holding trainable parameters is exactly ``nn.Linear``.

    Parameter-free modules (activations, ``Flatten``, ``LayerNorm`` without affine parameters,
    dropout) are allowed anywhere. Whether each ``Linear`` sees a 2-D input and runs once per
    forward pass can only be seen while training; :class:`BookKeepingClipper` checks it then.
    """
    trainable = False
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) is not nn.Linear:
            return False
        trainable = True
    return trainable


class BookKeepingClipper:
    """Computes the clipped per-sample gradient sum of ``model`` into each parameter's ``.grad``.

    Forward hooks record each ``Linear``'s input and output during training forward passes;
    :meth:`backward` then consumes them. The model must process samples independently (no
    BatchNorm or other batch statistics; Opacus's ``ModuleValidator`` rejects those), which makes
    row ``i`` of each output gradient depend on sample ``i`` alone.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        if not bk_supported(model):
            raise ValueError("book-keeping clipping needs every trainable module to be nn.Linear")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        self.layers = [
            m
            for m in model.modules()
            if type(m) is nn.Linear and any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._records: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [layer.register_forward_hook(self._capture) for layer in self.layers]

    def _capture(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if module in self._records:
            raise RuntimeError(
                "a Linear layer ran twice in one forward pass (shared weights); "
                "book-keeping clipping cannot separate its per-sample gradients"
            )
        (x,) = inputs
        if x.dim() != 2 or output.dim() != 2:
            raise RuntimeError(
                f"book-keeping clipping needs 2-D Linear inputs, got shape {tuple(x.shape)}"
            )
        self._records[module] = (x.detach(), output)

    def reset(self) -> None:
        """Forget what the last forward pass recorded (call before each forward pass)."""
        self._records.clear()

    def backward(
        self, per_sample_loss: torch.Tensor, groups: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Set ``.grad`` of every trainable parameter to the clipped sum; return the norms.

        ``per_sample_loss`` has shape ``(batch,)``: one loss per sample of the forward pass just
        recorded. Without ``groups`` each sample's gradient is clipped and the returned tensor
        holds each sample's unclipped gradient norm. With ``groups`` (shape ``(batch,)``, values
        ``0..k-1``, every value present) the gradient of each group's summed loss is clipped
        as one, and the ``k`` unclipped group norms are returned.
        """
        records, self._records = self._records, {}
        if per_sample_loss.dim() != 1:
            raise ValueError(
                f"expected one loss per sample, got shape {tuple(per_sample_loss.shape)}"
            )
        batch = per_sample_loss.shape[0]
        ran = [layer for layer in self.layers if layer in records]
        for layer in ran:
            if records[layer][0].shape[0] != batch:
                raise RuntimeError("recorded activations do not match the batch of the loss")
        grads: tuple[torch.Tensor | None, ...] = ()
        if ran:
            grads = torch.autograd.grad(
                per_sample_loss.sum(), [records[layer][1] for layer in ran], allow_unused=True
            )
        layout: _GroupLayout | None = None
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.long, device=per_sample_loss.device)
            if groups.shape != (batch,):
                raise ValueError(
                    f"groups needs one entry per sample, got shape {tuple(groups.shape)}"
                )
            if batch:
                layout = _GroupLayout(groups)
        outputs: dict[nn.Module, torch.Tensor] = {}
        squared = per_sample_loss.new_zeros(batch if groups is None else layout_size(groups))
        for layer, g in zip(ran, grads, strict=True):
            if g is None:
                continue
            g = g.detach()
            outputs[layer] = g
            if groups is not None:
                if layout is None:
                    continue
                if layer.weight.requires_grad:
                    squared += layout.weight_sq_norms(g, records[layer][0])
                if layer.bias is not None and layer.bias.requires_grad:
                    squared += layout.bias_sq_norms(g)
                continue
            # |g a^T|^2 = |g|^2 |a|^2 per sample, plus |g|^2 for the bias: one product.
            g_sq = (g * g).sum(dim=1)
            has_bias = layer.bias is not None and layer.bias.requires_grad
            if layer.weight.requires_grad:
                a = records[layer][0]
                a_sq = (a * a).sum(dim=1)
                squared.addcmul_(g_sq, a_sq + 1.0 if has_bias else a_sq)
            elif has_bias:
                squared += g_sq
        norms = squared.sqrt()
        coef = torch.clamp_max_(self.max_grad_norm / (norms + 1e-6), 1.0)
        if groups is not None:
            coef = coef[groups]
        coef = coef.unsqueeze(1)
        for layer in self.layers:
            g = outputs.get(layer)
            weight, bias = layer.weight, layer.bias
            if g is None:
                if weight.requires_grad:
                    weight.grad = torch.zeros_like(weight)
                if bias is not None and bias.requires_grad:
                    bias.grad = torch.zeros_like(bias)
                continue
            scaled = g * (coef if coef.dtype == g.dtype else coef.to(g.dtype))
            if weight.requires_grad:
                a = records[layer][0]
                grad = scaled.t() @ (a if a.dtype == g.dtype else a.to(g.dtype))
                weight.grad = grad if grad.dtype == weight.dtype else grad.to(weight.dtype)
            if bias is not None and bias.requires_grad:
                grad = scaled.sum(dim=0)
                bias.grad = grad if grad.dtype == bias.dtype else grad.to(bias.dtype)
        return norms

    def remove(self) -> None:
        """Remove the forward hooks; the model is left as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()


def layout_size(groups: torch.Tensor) -> int:
    """Number of groups ``k`` in a group index vector with values ``0..k-1`` (0 when empty)."""
    return int(groups.max()) + 1 if groups.numel() else 0


class _GroupLayout:
    """Per-group squared gradient norms of ``Linear`` layers for one batch's grouping.

    Samples are scattered into a zero-padded ``(k, m, .)`` layout (``m`` = largest group); the
    padding rows are zero and contribute nothing to either norm formula.
    """

    def __init__(self, groups: torch.Tensor) -> None:
        counts = torch.bincount(groups)
        if bool((counts == 0).any()):
            raise ValueError("groups must use every index 0..k-1")
        self.groups = groups
        self.k = len(counts)
        self.m = int(counts.max())
        order = torch.argsort(groups, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        self.rows = torch.empty_like(groups)
        self.rows[order] = torch.arange(len(groups), device=groups.device) - starts[groups[order]]

    def _padded(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(self.k, self.m, t.shape[1])
        out[self.groups, self.rows] = t
        return out

    def weight_sq_norms(self, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``|sum_{i in u} g_i a_i^T|^2`` for every group ``u``."""
        a = a.to(g.dtype)
        if self.m == 1:
            return self._padded((g * g).sum(1, keepdim=True) * (a * a).sum(1, keepdim=True))[
                :, 0, 0
            ]
        gp, ap = self._padded(g), self._padded(a)
        if self.m * self.m <= g.shape[1] * a.shape[1]:
            return ((gp @ gp.transpose(1, 2)) * (ap @ ap.transpose(1, 2))).sum(dim=(1, 2))
        w = gp.transpose(1, 2) @ ap
        return (w * w).sum(dim=(1, 2))

    def bias_sq_norms(self, g: torch.Tensor) -> torch.Tensor:
        """``|sum_{i in u} g_i|^2`` for every group ``u``."""
        summed = g.new_zeros(self.k, g.shape[1]).index_add_(0, self.groups, g)
        return (summed * summed).sum(dim=1)
