"""One round of local training at a factory, with or without DP-SGD (Opacus).

One job (the factory's local training loop); its length is the three per-sample clipping modes
and the unit-level sampling that feed the same Opacus noise and accountant.

The step count and sample rate used for privacy accounting must be the ones Opacus actually
trains with. :func:`sample_rate_for` and :func:`steps_per_epoch` reproduce Opacus's own
definitions for ``make_private(poisson_sampling=True)``, and :func:`train_local` checks the
Opacus accountant's record against them after training, so the ledger (which reserves the
spend beforehand from these helpers) always matches what was trained.

Everything counts privacy units. A plain dataset is one unit per example; a
:class:`~standard_models.base.UnitDataset` (a privacy unit holding several examples, such as a
machine's windows) has one item per unit, so Poisson sampling draws whole units, the sample
rate and steps are over units, and book-keeping clipping bounds each drawn unit's summed
gradient (unit-level DP-SGD). The epsilon of the accounting is then per unit.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from fl_client.clipping import BookKeepingClipper, bk_supported
from standard_models.base import UnitDataset

GRAD_SAMPLE_MODES = ("bk", "ghost", "hooks", "functorch")


@dataclass
class LocalTrainConfig:
    """Hyper-parameters of one factory's local training.

    ``grad_sample_mode`` chooses how the per-sample clipping is computed; every mode clips to
    the same bound and feeds the same Opacus noise, sampling and accounting:

    * ``"bk"`` (default): book-keeping clipping in one backward pass
      (:mod:`fl_client.clipping`), for models whose trainable layers are all ``nn.Linear``;
      other models fall back to ``"ghost"``;
    * ``"ghost"``: Opacus ghost clipping (two backward passes), falling back to ``"hooks"``
      when the task's model does not support it;
    * ``"hooks"`` / ``"functorch"``: Opacus with materialised per-sample gradients.

    ``seed`` fixes the non-private randomness (data order without DP, dropout). With DP the
    Poisson sampling and the Gaussian noise draw from fresh OS entropy, because a seed the
    server knows would let it predict the noise and the batches and void the guarantee; set
    ``reproducible_dp=True`` to derive them from ``dp_seed`` (default: ``seed``) instead, for
    tests and benchmarks only. Factories simulated side by side need distinct DP seeds:
    with one seed they would all draw the same noise, which then no longer averages out in the
    aggregate (:func:`fl_client.factory.local_train_config` gives each factory its own).
    The noise generator is torch's PRNG seeded from OS entropy, not Opacus's ``secure_mode``
    (a CSPRNG with protection against floating-point attacks, which needs ``torchcsprng``).
    """

    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    proximal_mu: float = 0.0
    dp: bool = True
    grad_sample_mode: str = "bk"
    seed: int = 0
    reproducible_dp: bool = False
    dp_seed: int | None = None

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
                f"got {self.grad_sample_mode!r}"
            )


@dataclass
class TrainResult:
    """What one round of local training produced.

    ``state_dict`` is the original module's (no ``_module.`` prefix); ``steps`` is the number of
    optimizer steps actually taken and ``sample_rate``/``noise_multiplier`` the values Opacus
    accounted them with (for non-private training: the nominal batch fraction and 0.0).

    Timing: ``setup_seconds`` is the one-off privacy wrapping of the round (``make_private``;
    0.0 without DP), ``epoch_seconds`` the wall time of each epoch's training loop and
    ``train_seconds`` the whole loop including unwrapping the model afterwards (setup excluded).
    """

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    steps: int
    sample_rate: float
    noise_multiplier: float
    train_seconds: float
    setup_seconds: float = 0.0
    epoch_seconds: tuple[float, ...] = ()


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sample rate Opacus uses for a data loader of ``batch_size`` over the data.

    ``make_private`` sets ``sample_rate = 1 / len(data_loader)`` with
    ``len(data_loader) = ceil(num_examples / batch_size)``, which is not ``batch_size / n``.
    """
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return 1 / math.ceil(num_examples / batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of Poisson-sampled batches Opacus draws per epoch.

    Opacus's ``UniformWithReplacementSampler`` yields ``int(1 / sample_rate)`` batches. In
    floating point this is one less than ``len(data_loader)`` for some sizes (93 batches give
    92 steps), so the same expression is used here rather than the loader length.
    """
    return int(1 / sample_rate_for(num_examples, batch_size))


class PerSampleLoss(nn.Module):
    """Wrap a criterion so ``reduction="none"`` yields exactly one loss per sample.

    Opacus ghost clipping evaluates the criterion with ``reduction="none"`` and multiplies the
    result by a per-sample clipping coefficient of shape ``[batch]``. A criterion whose
    unreduced output keeps extra dimensions (``MSELoss`` on ``[batch, 1]`` targets, or on
    several outputs) then broadcasts to ``[batch, batch]`` and Opacus silently computes wrong,
    unclipped gradients. Averaging the unreduced loss over every non-batch dimension gives the
    ``[batch]`` shape ghost clipping needs and leaves ``reduction="mean"`` unchanged (the mean
    of per-sample means is the overall mean when samples have equal size).
    """

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self.reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample losses reduced according to ``self.reduction``."""
        saved = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            loss = self.criterion(output, target)
        finally:
            self.criterion.reduction = saved
        if loss.dim() > 1:
            loss = loss.flatten(1).mean(dim=1)
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.mean()


class _BatchIndexed(Dataset):
    """A view of in-memory tensors that serves a whole batch with one indexing per tensor.

    PyTorch's data loaders (Opacus's Poisson-sampling ``DPDataLoader`` included) fetch a batch
    through ``__getitems__`` when the dataset has one, so a batch of ``k`` indices costs one
    gather per tensor instead of ``k`` item look-ups and a stack. Only the fetching changes: the
    loader's sampler, hence which samples form each batch, is untouched. An empty index list
    (an empty Poisson batch) gives tensors with a leading dimension of 0.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def _as_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate function for :class:`_BatchIndexed`: the fetched batch is already collated."""
    return batch


def _in_memory_tensors(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors behind a ``TensorDataset`` (or a ``ConcatDataset`` of them), else ``None``."""
    if isinstance(dataset, TensorDataset):
        return tuple(dataset.tensors)
    if isinstance(dataset, ConcatDataset):
        parts = [_in_memory_tensors(d) for d in dataset.datasets]
        if parts and all(p is not None and len(p) == len(parts[0]) for p in parts):
            return tuple(torch.cat(ts) for ts in zip(*parts, strict=True))  # type: ignore[misc]
    return None


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


class _PoissonBatches:
    """Opacus's Poisson sampling, fetching each batch with one indexing per tensor.

    Iterates exactly what Opacus's ``DPDataLoader`` built on the same data loader yields: for
    each of the ``sampler.steps`` batches, one ``torch.rand(num_samples)`` draw from the
    sampler's generator keeps every item whose draw is below ``sampler.sample_rate``
    (:class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler`, whose attributes
    are read here, so the rate, the step count and the random stream are Opacus's). Only the
    fetching is shorter: the kept positions stay a tensor that indexes the data directly,
    where the data loader turns them into a Python list, back into a tensor, and runs its
    fetcher and collate wrapper on every batch. ``fetch`` is the dataset's ``__getitems__``
    (``_BatchIndexed`` or :class:`~standard_models.base.UnitDataset`), which gives an empty
    batch tensors with a leading dimension of 0, as Opacus's empty-batch collate does.
    ``tests/test_dp_mechanism.py`` checks the batches against Opacus's loader.
    """

    def __init__(self, sampler: UniformWithReplacementSampler, fetch: Any) -> None:
        self.sampler = sampler
        self.sample_rate = sampler.sample_rate
        self.fetch = fetch

    def __len__(self) -> int:
        return self.sampler.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        sampler = self.sampler
        # The data loader draws its workers' base seed from the same generator at the start of
        # every epoch; drawing it too keeps the batches those of Opacus's loader, number for
        # number (it only shifts the stream: every draw stays uniform and independent).
        torch.empty((), dtype=torch.int64).random_(generator=sampler.generator)
        n, q, gen = sampler.num_samples, sampler.sample_rate, sampler.generator
        for _ in range(sampler.steps):
            mask = torch.rand(n, generator=gen) < q
            yield self.fetch(mask.nonzero(as_tuple=False).reshape(-1))


class _PreClippedOptimizer(DPOptimizerFastGradientClipping):
    """Opacus's optimizer for pre-clipped gradients, with the noise drawn in one call per step.

    :class:`~fl_client.clipping.BookKeepingClipper` hands over each parameter's clipped sum as a
    fresh ``.grad`` every step. Opacus then, per parameter, deep-copies it, allocates and draws
    a noise tensor, allocates the noisy sum and divides it by the expected batch size: four
    to five tensor operations per parameter and step, which for the small standard models
    cost as much as the clipping itself. Here every parameter's summed gradient is a view of
    one flat buffer allocated once per round: the clipped sums are copied in, the noise is
    drawn into a second preallocated buffer with one ``normal_`` call and added with one
    addition, and the scaling is one division, so a step costs one copy per parameter and
    three whole-buffer operations.

    The privacy mechanism is Opacus's, unchanged: each coordinate of the clipped sum gets
    independent Gaussian noise of std ``noise_multiplier * max_grad_norm`` (the adjusted
    multiplier, if Opacus's adaptive clipping set one) from the optimizer's generator, then
    the sum is divided by the expected batch size. Only the order in which the generator's
    numbers land on the coordinates differs from Opacus's per-parameter draws, so a seeded run
    is reproducible but not bit-identical to ``ghost``/``hooks`` with noise
    (``tests/test_training.py`` checks the modes agree exactly without noise,
    ``tests/test_dp_mechanism.py`` measures the noise). Step skipping, the processed-gradient
    checks and the accountant hook are Opacus's. Parameters of mixed dtypes or devices, and
    Opacus's ``secure_mode`` noise, take Opacus's own per-parameter path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._param_list: list[nn.Parameter] = list(super().params)
        self._numels = [p.numel() for p in self._param_list]
        kinds = {(p.dtype, p.device) for p in self._param_list}
        self._flat: torch.Tensor | None = None
        self._noise: torch.Tensor | None = None
        self._views: list[torch.Tensor] = []
        if len(kinds) == 1 and not self.secure_mode:
            ((dtype, device),) = kinds
            self._flat = torch.empty(sum(self._numels), dtype=dtype, device=device)
            self._noise = torch.empty_like(self._flat)
            pieces = torch.split(self._flat, self._numels)
            self._views = [v.view_as(p) for p, v in zip(self._param_list, pieces, strict=True)]

    @property
    def params(self) -> list[nn.Parameter]:  # type: ignore[override]
        """The trainable parameters (fixed for a round), without rebuilding the list."""
        cached = self.__dict__.get("_param_list")
        return list(super().params) if cached is None else cached

    def pre_step(self, closure: Any = None) -> bool:
        """Noise and scale the clipped sums; the usual step gathers them with one copy.

        When every parameter holds a fresh clipped sum in ``.grad`` and nothing is
        accumulated from an earlier (skipped) step, which is every step of :func:`train_local`,
        the sums are gathered into the flat buffer with one ``torch.cat``, noised and scaled
        there, and each parameter's ``.grad`` becomes its view of the buffer: the same values
        as Opacus's ``pre_step`` through :meth:`accumulate`, :meth:`add_noise` and
        :meth:`scale_grad` below, with a handful of calls instead of several per parameter.
        Anything else (a pending accumulation, a step to skip, no flat buffer, a loss
        reduction other than the mean) takes that general path.
        """
        flat, noise, views = self._flat, self._noise, self._views
        params = self._param_list
        if (
            flat is None
            or noise is None
            or self.loss_reduction != "mean"
            or self._step_skip_queue
            or any(p.summed_grad is not None or p.grad is None for p in params)
        ):
            return bool(super().pre_step(closure))
        torch.cat([p.grad.reshape(-1) for p in params], out=flat)
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = std * self.max_grad_norm
        if std != 0:
            noise.normal_(mean=0.0, std=std, generator=self.generator)
            flat.add_(noise)
        flat.div_(self.expected_batch_size * self.accumulated_iterations)
        for p, view in zip(params, views, strict=True):
            p.summed_grad = view
            p.grad = view
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def accumulate(self) -> None:
        """Add each parameter's clipped gradient sum to ``summed_grad`` (a view of the buffer)."""
        if self._flat is None:
            for p in self._param_list:
                if p.summed_grad is not None:
                    p.summed_grad.add_(p.grad)
                else:
                    p.summed_grad = p.grad.detach().clone()
            return
        views = torch.split(self._flat, self._numels)
        for p, view in zip(self._param_list, views, strict=True):
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad)
            else:
                summed = view.view_as(p)
                summed.copy_(p.grad)
                p.summed_grad = summed

    def add_noise(self) -> None:
        """Add Gaussian noise of std ``noise_multiplier * max_grad_norm`` to each clipped sum."""
        if self._flat is None or self._noise is None:
            super().add_noise()
            return
        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = std * self.max_grad_norm
        for p in self._param_list:
            _check_processed_flag(p.summed_grad)
        if std != 0:
            self._noise.normal_(mean=0.0, std=std, generator=self.generator)
            self._flat.add_(self._noise)
        for p in self._param_list:
            p.grad = p.summed_grad  # already a view of the buffer in the parameter's shape
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide the noisy sums by the expected batch size (Opacus's ``loss_reduction="mean"``)."""
        if self._flat is None or self.loss_reduction != "mean":
            super().scale_grad()
            return
        self._flat.div_(self.expected_batch_size * self.accumulated_iterations)


def _proximal_step(
    params: list[nn.Parameter], anchors: list[torch.Tensor], lr: float, mu: float
) -> None:
    """Exact proximal step of ``mu/2 * ||w - w_global||^2`` with step size ``lr``.

    ``w <- (w + lr*mu*w_global) / (1 + lr*mu)``, i.e. ``w - c*(w - w_global)`` with
    ``c = lr*mu/(1 + lr*mu)``: to first order in ``lr*mu`` the gradient step
    ``w - lr*mu*(w - w_global)`` of FedProx's term, but stable for any ``lr*mu``. Applied after
    each optimizer step it is the proximal-gradient form of FedProx. It only reads the current
    weights and the public global model, not the data, so under DP it is post-processing and
    costs no privacy; it also leaves the per-sample gradients (and ghost clipping) untouched.
    """
    shrink = lr * mu / (1.0 + lr * mu)
    with torch.no_grad():
        for p, anchor in zip(params, anchors, strict=True):
            p.sub_(shrink * (p - anchor))


def train_local(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: nn.Module,
    cfg: LocalTrainConfig,
    *,
    noise_multiplier: float | None,
    global_state: dict[str, torch.Tensor] | None = None,
    supports_ghost: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.local_epochs`` epochs and return its new weights.

    With ``cfg.dp`` the model, an SGD optimizer and a data loader go through Opacus with
    Poisson sampling, clipping norm ``cfg.max_grad_norm`` and the given ``noise_multiplier``
    (``PrivacyEngine.make_private``, or for ``"bk"`` the same Opacus Poisson sampler (its
    batches fetched by :class:`_PoissonBatches`), optimizer and accountant hook around
    :class:`~fl_client.clipping.BookKeepingClipper`, which leaves the model unwrapped); the
    number of steps taken is checked against
    ``steps_per_epoch(len(dataset), cfg.batch_size) * cfg.local_epochs`` and the Opacus
    accountant's record, so the caller's accounting matches the training exactly. Empty
    Poisson batches still take a (noise-only) step, as the analysis assumes. The model must
    not have been wrapped by Opacus before; Opacus's hooks are removed afterwards.

    Without DP it is ordinary shuffled mini-batch SGD over the same loop.

    A :class:`~standard_models.base.UnitDataset` is trained with unit-level DP-SGD: Poisson
    sampling over units (``cfg.batch_size`` is then the expected number of units a batch
    draws), each unit's loss the mean over its examples, and the gradient of each unit's loss
    clipped as one by book-keeping clipping (so every other ``grad_sample_mode`` is refused).
    ``num_examples``, ``sample_rate`` and ``steps`` of the result count units. Without DP its
    examples are trained one by one as usual.

    ``global_state`` with ``cfg.proximal_mu > 0`` adds FedProx's proximal term as a decoupled
    step after each optimizer step (see :func:`_proximal_step`).
    """
    num_examples = len(dataset)  # type: ignore[arg-type]
    if num_examples < 1:
        raise ValueError("the training set is empty")
    units = dataset if isinstance(dataset, UnitDataset) and cfg.dp else None
    if isinstance(dataset, UnitDataset) and not cfg.dp:
        dataset = dataset.examples()
    if cfg.dp and (
        noise_multiplier is None or not (noise_multiplier >= 0 and math.isfinite(noise_multiplier))
    ):
        raise ValueError(
            f"DP training needs a finite noise_multiplier >= 0, got {noise_multiplier}"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    anchors: list[torch.Tensor] = []
    use_prox = cfg.proximal_mu > 0 and global_state is not None
    if use_prox:
        assert global_state is not None
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in global_state]
        if missing:
            raise KeyError(f"global_state lacks parameters {missing}")
        anchors = [
            global_state[n].detach().to(dtype=p.dtype, device=p.device).clone()
            for n, p in zip(names, params, strict=True)
        ]

    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    dp_seed = (cfg.seed if cfg.dp_seed is None else cfg.dp_seed) if cfg.reproducible_dp else None
    tensors = _in_memory_tensors(dataset)
    batch_options: dict[str, Any] = {}
    if units is not None:
        batch_options = {"collate_fn": _as_batch}
    elif tensors is not None:
        batch_options = {"collate_fn": _as_batch}
        dataset = _BatchIndexed(tensors)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=not cfg.dp,
        generator=_generator(dp_seed if cfg.dp else cfg.seed),
        **batch_options,
    )
    sample_rate = sample_rate_for(num_examples, cfg.batch_size)
    expected_steps = cfg.local_epochs * (
        steps_per_epoch(num_examples, cfg.batch_size) if cfg.dp else len(loader)
    )

    train_module: nn.Module = model
    criterion: Any = loss_fn
    engine: PrivacyEngine | None = None
    clipper: BookKeepingClipper | None = None
    per_sample_loss = PerSampleLoss(loss_fn)
    per_sample_loss.reduction = "none"
    mode = cfg.grad_sample_mode
    if mode == "bk" and not (bk_supported(model) and hasattr(loss_fn, "reduction")):
        mode = "ghost"
    if mode == "ghost" and not (supports_ghost and hasattr(loss_fn, "reduction")):
        mode = "hooks"
    if units is not None and mode != "bk":
        raise ValueError(
            f"unit-level DP-SGD (privacy unit {units.unit!r}) clips per unit with book-keeping "
            f"clipping, which needs grad_sample_mode 'bk' and a model whose trainable layers "
            f"are all nn.Linear; got grad_sample_mode {cfg.grad_sample_mode!r}"
        )
    setup_started = time.perf_counter()
    if cfg.dp and mode == "bk":
        assert noise_multiplier is not None
        # What make_private(grad_sample_mode="ghost") sets up, with the model left unwrapped:
        # Poisson sampling, Opacus's optimizer for pre-clipped gradients (noise, scaling by the
        # expected batch size) and the accountant's step hook; the clipper replaces the hooks.
        ModuleValidator.validate(model, strict=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
        loader = DPDataLoader.from_data_loader(loader)
        if isinstance(dataset, (_BatchIndexed, UnitDataset)):
            loader = _PoissonBatches(loader.batch_sampler, dataset.__getitems__)
        optimizer = _PreClippedOptimizer(
            optimizer,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=cfg.max_grad_norm,
            expected_batch_size=int(num_examples * loader.sample_rate),
            loss_reduction="mean",
            generator=_generator(dp_seed),
        )
        optimizer.attach_step_hook(
            engine.accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate)
        )
        clipper = BookKeepingClipper(model, cfg.max_grad_norm)
        if loader.sample_rate != sample_rate:
            raise RuntimeError(
                f"Opacus sample rate {loader.sample_rate} differs from planned {sample_rate}"
            )
    elif cfg.dp:
        assert noise_multiplier is not None
        common = {
            "module": model,
            "optimizer": optimizer,
            "data_loader": loader,
            "noise_multiplier": float(noise_multiplier),
            "max_grad_norm": cfg.max_grad_norm,
            "poisson_sampling": True,
            "grad_sample_mode": mode,
            "noise_generator": _generator(dp_seed),
        }
        with warnings.catch_warnings():
            # Known and documented on LocalTrainConfig: the noise comes from torch's PRNG
            # seeded with OS entropy, not from a CSPRNG (Opacus secure_mode needs torchcsprng).
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="rdp")
            if mode == "ghost":
                train_module, optimizer, criterion, loader = engine.make_private(
                    criterion=PerSampleLoss(loss_fn), **common
                )
            else:
                train_module, optimizer, loader = engine.make_private(**common)
        if loader.sample_rate != sample_rate:
            raise RuntimeError(
                f"Opacus sample rate {loader.sample_rate} differs from planned {sample_rate}"
            )

    setup_seconds = time.perf_counter() - setup_started

    steps = 0
    loss_sum = 0.0
    seen = 0
    epoch_seconds: list[float] = []
    started = time.perf_counter()
    train_module.train()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # Opacus's hooks fire on modules whose inputs need no gradient (first layers).
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            torch.manual_seed(cfg.seed)
            for _ in range(cfg.local_epochs):
                epoch_started = time.perf_counter()
                for x, y, *rest in loader:
                    optimizer.zero_grad(set_to_none=True)
                    batch = len(y)
                    if clipper is not None and rest:
                        # Unit-level: each unit's loss is the mean over its examples.
                        (group,) = rest
                        clipper.reset()
                        counts = torch.bincount(group)
                        losses = per_sample_loss(train_module(x), y) / counts[group]
                        clipper.backward(losses, groups=group)
                        batch = len(counts)
                        loss = losses.detach().sum() / max(batch, 1)
                    elif clipper is not None:
                        clipper.reset()
                        losses = per_sample_loss(train_module(x), y)
                        clipper.backward(losses)
                        loss = losses.detach().mean()
                    else:
                        loss = criterion(train_module(x), y)
                        loss.backward()
                    optimizer.step()
                    if use_prox:
                        _proximal_step(params, anchors, cfg.lr, cfg.proximal_mu)
                    steps += 1
                    if batch:
                        loss_sum += float(loss.item()) * batch
                        seen += batch
                epoch_seconds.append(time.perf_counter() - epoch_started)
    finally:
        if clipper is not None:
            clipper.remove()
        if engine is not None and hasattr(train_module, "to_standard_module"):
            train_module.to_standard_module()
    train_seconds = time.perf_counter() - started

    if steps != expected_steps:
        raise RuntimeError(f"trained {steps} steps but {expected_steps} were planned")
    if engine is not None:
        assert noise_multiplier is not None
        accounted = engine.accountant.history
        if accounted != [(float(noise_multiplier), sample_rate, expected_steps)]:
            raise RuntimeError(
                f"Opacus accounted {accounted}, expected "
                f"{[(float(noise_multiplier), sample_rate, expected_steps)]}"
            )

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(
        state_dict=state,
        num_examples=num_examples,
        train_loss=loss_sum / seen if seen else float("nan"),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=float(noise_multiplier) if cfg.dp and noise_multiplier else 0.0,
        train_seconds=train_seconds,
        setup_seconds=setup_seconds if cfg.dp else 0.0,
        epoch_seconds=tuple(epoch_seconds),
    )
