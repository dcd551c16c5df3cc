"""Client-level central differential privacy: the server clips and noises factories' updates.

The project's default privacy is sample-level DP-SGD inside each factory (``conf/privacy``),
which protects single records. This module is the operator's alternative, selected with the
``client_dp`` config group: the *server* clips each factory's model update and adds Gaussian
noise to the aggregate (DP-FedAvg, McMahan et al. 2018), which protects a factory's whole
participation, so the released global model says little about whether any one factory took part.

What is here:

* :func:`wrap_client_dp` puts Flower's server-side clipping wrapper (fixed or adaptive) around
  the inner Flower strategy. The wrappers are thin subclasses of Flower's classes that make
  the released model match what the accountant charges for (see :class:`ClientDPFixedClipping`);
* :class:`ClientLevelAccountant`: the RDP cost of ``T`` rounds of the sampled Gaussian
  mechanism, with the factory as the unit of privacy;
* :class:`ClientDPBudget`: the guard that refuses to configure a round whose model would be
  released past the epsilon budget, and the epsilon to log per round.

The accounting convention is Flower's: each round is one Gaussian mechanism whose noise
standard deviation is ``noise_multiplier * clipping_norm / k`` on the unweighted mean of ``k``
clipped updates, whose sensitivity to one factory (its update replaced by a zero update, with
the cohort size public) is ``clipping_norm / k``. So every round costs one Gaussian mechanism
with noise multiplier ``z``, subsampled at rate ``q = num_sampled_clients / num_factories``.

Only the model is protected. Per-factory reports, training metrics, validation outcomes,
contribution scores and payouts are computed from the raw updates and are not covered.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_adaptive_noise_params,
    compute_stdv,
)
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

MODES = ("none", "fixed", "adaptive")
#: Metric each reply gets (value 1) so the inner FedAvg takes the unweighted mean.
CLIENT_DP_WEIGHT_KEY = "client-dp-weight"
#: Upper end of :meth:`ClientLevelAccountant.max_rounds`' search (a budget that never runs out).
MAX_ROUNDS_SEARCHED = 10**9

_COMMON_KEYS = ("mode", "noise_multiplier", "epsilon", "delta", "num_sampled_clients")
_FIXED_KEYS = (*_COMMON_KEYS, "clipping_norm")
_ADAPTIVE_KEYS = (
    *_COMMON_KEYS,
    "initial_clipping_norm",
    "target_clipped_quantile",
    "clip_norm_lr",
    "clipped_count_stddev",
)


# -- options ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientDPOptions:
    """The validated ``client_dp`` config group (see ``conf/client_dp/*.yaml``).

    ``num_sampled_clients`` is resolved: ``null`` in the config becomes ``num_factories``.
    ``clipped_count_stddev`` is resolved as Flower does it (``num_sampled_clients / 20`` when
    ``null``), so the accountant and the wrapper use the same value.
    """

    mode: str
    num_factories: int
    noise_multiplier: float = 0.0
    epsilon: float = math.inf
    delta: float = 0.0
    num_sampled_clients: int = 0
    clipping_norm: float = 0.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = 0.0

    @property
    def sample_rate(self) -> float:
        """Fraction of the factories whose updates enter each round."""
        return self.num_sampled_clients / self.num_factories


def _field(name: str) -> str:
    return f"client_dp.{name}"


def _real(options: Mapping[str, Any], name: str, default: float | None = None) -> float:
    """A finite number from ``options[name]``; missing means ``default`` (required if None)."""
    value = options.get(name, default)
    if value is None:
        raise ValueError(f"{_field(name)} is required for mode '{options.get('mode')}'")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_field(name)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_field(name)} must be finite, got {value}")
    return value


def parse_client_dp(options: Mapping[str, Any], num_factories: int) -> ClientDPOptions:
    """Validate the ``client_dp`` config group; every error names the offending field.

    Why so strict: a typo such as ``noise_multipler`` would otherwise silently fall back to a
    default and the logged epsilon would describe a mechanism that never ran.
    """
    if isinstance(num_factories, bool) or not isinstance(num_factories, int) or num_factories < 1:
        raise ValueError(f"num_factories must be a positive integer, got {num_factories!r}")
    mode = options.get("mode")
    if mode not in MODES:
        raise ValueError(f"{_field('mode')} must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return ClientDPOptions(mode="none", num_factories=num_factories)
    allowed = _FIXED_KEYS if mode == "fixed" else _ADAPTIVE_KEYS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{_field(unknown[0])} is not an option of mode '{mode}' "
            f"(allowed: {', '.join(allowed)})"
        )

    noise = _real(options, "noise_multiplier")
    if noise < 0:
        raise ValueError(f"{_field('noise_multiplier')} must be >= 0, got {noise}")
    epsilon = _real(options, "epsilon")
    if epsilon <= 0:
        raise ValueError(f"{_field('epsilon')} (the budget) must be > 0, got {epsilon}")
    delta = _real(options, "delta")
    if not 0 < delta < 1 / num_factories:
        raise ValueError(
            f"{_field('delta')} must be in (0, 1/num_factories) = (0, {1 / num_factories:.3g}) "
            f"for client-level DP over {num_factories} factories; got {delta}"
        )
    sampled = options.get("num_sampled_clients")
    if sampled is None:
        sampled = num_factories
    if (
        isinstance(sampled, bool)
        or not isinstance(sampled, int)
        or not 1 <= sampled <= num_factories
    ):
        raise ValueError(
            f"{_field('num_sampled_clients')} must be null (all factories) or an integer in "
            f"[1, {num_factories}]; got {sampled!r}"
        )
    common = {
        "mode": mode,
        "num_factories": num_factories,
        "noise_multiplier": noise,
        "epsilon": epsilon,
        "delta": delta,
        "num_sampled_clients": sampled,
    }
    if mode == "fixed":
        norm = _real(options, "clipping_norm")
        if norm <= 0:
            raise ValueError(f"{_field('clipping_norm')} must be > 0, got {norm}")
        return ClientDPOptions(**common, clipping_norm=norm)

    initial = _real(options, "initial_clipping_norm", 0.1)
    if initial <= 0:
        raise ValueError(f"{_field('initial_clipping_norm')} must be > 0, got {initial}")
    quantile = _real(options, "target_clipped_quantile", 0.5)
    if not 0 <= quantile <= 1:
        raise ValueError(f"{_field('target_clipped_quantile')} must be in [0, 1], got {quantile}")
    lr = _real(options, "clip_norm_lr", 0.2)
    if lr <= 0:
        raise ValueError(f"{_field('clip_norm_lr')} must be > 0, got {lr}")
    count_std: float | None = None
    if options.get("clipped_count_stddev") is not None:
        count_std = _real(options, "clipped_count_stddev")
        if count_std < 0:
            raise ValueError(f"{_field('clipped_count_stddev')} must be >= 0, got {count_std}")
    resolved = sampled / 20 if count_std is None and noise > 0 else (count_std or 0.0)
    if noise > 0 and noise >= 2 * resolved:
        raise ValueError(
            f"{_field('clipped_count_stddev')} = {resolved:g}"
            f"{' (Flower default num_sampled_clients/20)' if count_std is None else ''} is too "
            f"small for noise_multiplier {noise:g}: it must exceed noise_multiplier / 2 = "
            f"{noise / 2:g}, since the clipped-count noise is paid out of the same budget"
        )
    return ClientDPOptions(
        **common,
        initial_clipping_norm=initial,
        target_clipped_quantile=quantile,
        clip_norm_lr=lr,
        clipped_count_stddev=resolved,
    )


# -- accounting ------------------------------------------------------------------------------
def adaptive_effective_noise_multiplier(
    noise_multiplier: float, clipped_count_stddev: float, num_sampled_clients: int
) -> float:
    """The noise multiplier one round of Flower's adaptive clipping really costs.

    Each round releases two Gaussian mechanisms: the noisy clipped-update mean (noise
    multiplier ``sigma_delta``) and the noisy count of clipped updates (standard deviation
    ``sigma_b``). Flower splits the configured ``z`` as Andrew et al. (2021, eq. for
    ``sigma_delta``) do: ``sigma_delta = (z**-2 - (2 * sigma_b)**-2) ** -0.5``, which assumes
    the count has sensitivity 1/2 (the paper and TF Privacy sum *centred* bits ``b - 1/2``).
    Flower sums uncentred bits (``np.random.normal(count, sigma_b)``), whose sensitivity to one
    factory is 1, so the count is a Gaussian mechanism with noise multiplier ``sigma_b``, not
    ``2 * sigma_b``. Composing the two exactly (Gaussian mechanisms add in ``1/z**2``)::

        z_eff = (sigma_delta**-2 + sigma_b**-2) ** -0.5 = (z**-2 + 3 / (4 * sigma_b**2)) ** -0.5

    which is below the configured ``z``; accounting with ``z_eff`` is what makes the logged
    epsilon an upper bound for what Flower's code actually releases.
    """
    if noise_multiplier <= 0:
        return 0.0
    count_std, sigma_delta = compute_adaptive_noise_params(
        noise_multiplier, num_sampled_clients, clipped_count_stddev
    )
    return float((sigma_delta**-2 + count_std**-2) ** -0.5)


def effective_noise_multiplier(options: ClientDPOptions) -> float:
    """The per-round noise multiplier the accountant charges for ``options``."""
    if options.mode == "adaptive":
        return adaptive_effective_noise_multiplier(
            options.noise_multiplier, options.clipped_count_stddev, options.num_sampled_clients
        )
    return options.noise_multiplier


class ClientLevelAccountant:
    """RDP accounting of ``T`` server rounds, each a sampled Gaussian mechanism on factories.

    Uses Opacus's RDP analysis of the sampled Gaussian mechanism (Mironov et al. 2019) with
    Opacus's default orders and its RDP-to-(epsilon, delta) conversion (Balle et al. 2020), i.e.
    exactly what ``opacus.accountants.RDPAccountant`` reports for a history of ``T`` steps of
    ``(noise_multiplier, sample_rate)``; the factories' DP-SGD uses the same analysis.

    Why not Flower's accountant: Flower 1.42 ships ``flwr.serverapp.RdpAccountant``, but it is
    a front end to Google's ``dp-accounting`` package (the optional ``flwr[dp]`` extra), which
    this project does not install; Flower wires it only into the *fixed*-clipping wrapper, and
    only without sampling amplification and with equal client weights. Opacus is already a
    dependency, and the RDP of a repeated Gaussian mechanism is the same closed form in both:
    without subsampling the two agreed to 1e-6 when compared with ``dp-accounting`` installed
    (the tests check the closed form instead); with Poisson subsampling they differ in the third
    digit.

    ``sample_rate`` is ``num_sampled_clients / num_factories``. At 1 (all factories every round,
    the default) there is no amplification and the bound is exact for Flower's sampling. Below
    1 the Poisson-subsampling analysis is applied to Flower's fixed-size uniform sample, the
    usual approximation in federated DP; use ``num_sampled_clients: null`` for a strict bound.
    """

    def __init__(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        orders: Sequence[float] | None = None,
    ) -> None:
        if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.delta = float(delta)
        self.orders = list(orders) if orders is not None else list(RDPAccountant.DEFAULT_ALPHAS)
        self._rdp_one_round = (
            np.asarray(
                rdp_analysis.compute_rdp(
                    q=self.sample_rate,
                    noise_multiplier=self.noise_multiplier,
                    steps=1,
                    orders=self.orders,
                ),
                dtype=float,
            )
            if self.noise_multiplier > 0
            else None
        )

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon (at ``delta``) of the model released after ``rounds`` rounds; inf if no noise."""
        if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
        if rounds == 0:
            return 0.0
        if self._rdp_one_round is None:
            return math.inf
        with warnings.catch_warnings():
            # Opacus warns when the best order is at the end of its range: the bound is valid,
            # only not the tightest one, which is fine for a budget guard.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps, _ = rdp_analysis.get_privacy_spent(
                orders=self.orders, rdp=self._rdp_one_round * int(rounds), delta=self.delta
            )
        return float(eps)

    def max_rounds(self, epsilon_budget: float) -> int:
        """The largest ``T`` with ``epsilon_after(T) <= epsilon_budget`` (0 if one round exceeds).

        Epsilon grows with ``T`` (a minimum over orders of functions increasing in ``T``), so an
        exponential then binary search finds the exact boundary; capped at
        :data:`MAX_ROUNDS_SEARCHED`.
        """
        if math.isnan(epsilon_budget) or epsilon_budget <= 0:
            raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
        if self.epsilon_after(1) > epsilon_budget:
            return 0
        low, high = 1, 2
        while self.epsilon_after(high) <= epsilon_budget:
            if high >= MAX_ROUNDS_SEARCHED:
                return MAX_ROUNDS_SEARCHED
            low, high = high, min(2 * high, MAX_ROUNDS_SEARCHED)
        while high - low > 1:  # invariant: eps(low) <= budget < eps(high)
            mid = (low + high) // 2
            if self.epsilon_after(mid) <= epsilon_budget:
                low = mid
            else:
                high = mid
        return low


class ClientDPBudgetExceeded(PrivacyBudgetExhausted):
    """Releasing the next round's model would exceed the client-level epsilon budget.

    A :class:`flwr.serverapp.exception.PrivacyBudgetExhausted`, so a ServerApp that lets it
    escape exits with Flower's "strategy precondition unmet" code instead of a crash.
    """

    def __init__(
        self, budget: float, epsilon: float, server_round: int, delta: float, max_rounds: int
    ) -> None:
        self.budget = budget
        self.epsilon = epsilon
        self.server_round = server_round
        self.delta = delta
        self.max_rounds = max_rounds
        super().__init__(
            f"client-level DP budget epsilon={budget:g} (delta={delta:g}) would be exceeded: "
            f"releasing round {server_round}'s model would reach epsilon={epsilon:.4g}; "
            f"the budget allows {max_rounds} round(s)"
        )


class ClientDPBudget:
    """The epsilon budget of a client-level DP run: which rounds may release a model.

    Every configured round is charged a full release, whether or not it ends up aggregating
    (the adaptive wrapper's noisy clipped count is released either way), which keeps the guard
    conservative and lets :attr:`max_rounds` be known before the run starts.
    """

    def __init__(self, accountant: ClientLevelAccountant, epsilon_budget: float) -> None:
        self.accountant = accountant
        self.epsilon_budget = float(epsilon_budget)
        self.max_rounds = accountant.max_rounds(self.epsilon_budget)

    @property
    def delta(self) -> float:
        """The delta every reported epsilon is at."""
        return self.accountant.delta

    def epsilon(self, server_round: int) -> float:
        """Epsilon of the model released after ``server_round`` rounds (for logging)."""
        return self.accountant.epsilon_after(server_round)

    def check(self, next_round: int) -> None:
        """Raise :class:`ClientDPBudgetExceeded` if round ``next_round`` must not run."""
        if next_round > self.max_rounds:
            raise ClientDPBudgetExceeded(
                self.epsilon_budget,
                self.accountant.epsilon_after(next_round),
                next_round,
                self.delta,
                self.max_rounds,
            )


def client_dp_accountant(options: Mapping[str, Any], num_factories: int) -> ClientLevelAccountant:
    """The accountant for a ``client_dp`` config (``mode`` fixed or adaptive)."""
    opts = parse_client_dp(options, num_factories)
    if opts.mode == "none":
        raise ValueError(f"{_field('mode')} is 'none': client-level DP has no accountant")
    return ClientLevelAccountant(effective_noise_multiplier(opts), opts.sample_rate, opts.delta)


def client_dp_budget(options: Mapping[str, Any], num_factories: int) -> ClientDPBudget | None:
    """The budget guard for a ``client_dp`` config; None for ``mode: none``."""
    opts = parse_client_dp(options, num_factories)
    if opts.mode == "none":
        return None
    return ClientDPBudget(client_dp_accountant(options, num_factories), opts.epsilon)


# -- the wrappers ----------------------------------------------------------------------------
class _ClientDPHooks:
    """What both server-side wrappers add to Flower's, so the release matches the accounting.

    * the budget guard runs in ``configure_train``, before any factory is asked to train;
    * the inner FedAvg takes the *unweighted* mean for the DP aggregate: the noise
      ``z * C / k`` is calibrated to a sensitivity of ``C / k``, which a mean weighted by
      ``num-examples`` does not have (one large factory can move it by up to ``C``);
    * noise is calibrated to the ``k`` updates actually aggregated (Flower uses the configured
      ``num_sampled_clients``, under-noising rounds where some factories were rejected or
      failed);
    * each reply's arrays are put in the global model's key order, since Flower clips by
      position against the arrays ``configure_train`` saw;
    * a factory that sends the global model back unchanged (update norm 0) does not crash the
      round: Flower computes ``clipping_norm / norm``, a ZeroDivisionError with a Python float,
      so the norm is kept as a numpy scalar, for which it is ``inf`` (scale 1: nothing to clip);
    * no replies means no release (Flower's adaptive wrapper would divide by zero).
    """

    client_dp_budget: ClientDPBudget | None
    _num_aggregated: int
    _clipping_norm: np.float64

    @property
    def clipping_norm(self) -> float:
        """The clipping norm of the current round (a numpy scalar, see the class docstring)."""
        return self._clipping_norm

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self._clipping_norm = np.float64(value)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse a round past the budget, then let Flower's wrapper remember the global model."""
        if self.client_dp_budget is not None:
            self.client_dp_budget.check(server_round)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Align and uniformly weight the replies, then clip, average and noise (Flower)."""
        replies_list = list(replies)
        if not replies_list:
            return None, None
        current: ArrayRecord = self.current_arrays  # type: ignore[attr-defined]
        if len(current) == 0:
            raise RuntimeError(
                "client-level DP needs the round's global model: call configure_train before "
                "aggregate_train"
            )
        order = list(current.keys())
        content = [msg for msg in replies_list if not msg.has_error()]
        for msg in content:
            for name, record in list(msg.content.array_records.items()):
                if list(record.keys()) != order:
                    if set(record.keys()) != set(order):
                        raise ValueError(
                            f"reply from node {msg.metadata.src_node_id} has arrays "
                            f"{sorted(record.keys())}, the global model {sorted(order)}"
                        )
                    msg.content[name] = ArrayRecord({k: record[k] for k in order})
            for metrics in msg.content.metric_records.values():
                metrics[CLIENT_DP_WEIGHT_KEY] = 1
        self._num_aggregated = len(content)
        inner: FedAvg = self.strategy  # type: ignore[attr-defined]
        weighted_by = inner.weighted_by_key
        inner.weighted_by_key = CLIENT_DP_WEIGHT_KEY
        try:
            with np.errstate(divide="ignore"):  # norm 0 -> scale inf -> 1, see the docstring
                return super().aggregate_train(server_round, replies_list)  # type: ignore[misc]
        finally:
            inner.weighted_by_key = weighted_by

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Gaussian noise of standard deviation ``z * C / k`` on the mean of ``k`` updates."""
        nds = aggregated.to_numpy_ndarrays()
        stdv = compute_stdv(
            self.noise_multiplier,  # type: ignore[attr-defined]
            self.clipping_norm,  # type: ignore[attr-defined]
            max(1, self._num_aggregated),
        )
        add_gaussian_noise_inplace(nds, stdv)
        log(
            INFO,
            "client-level DP: noise stdev %.4g on the mean of %d updates",
            stdv,
            self._num_aggregated,
        )
        return ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in zip(aggregated.keys(), nds, strict=True)}
        )


class ClientDPFixedClipping(_ClientDPHooks, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, with the budget guard and the fixes of the hooks.

    Flower's own ``accountant=`` argument is not used (it needs ``dp-accounting``); the budget
    is :class:`ClientDPBudget`.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        budget: ClientDPBudget | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.client_dp_budget = budget
        self._num_aggregated = num_sampled_clients


class ClientDPAdaptiveClipping(_ClientDPHooks, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping (Andrew et al. 2021), with two corrections.

    * Flower 1.42 updates the clipping norm *before* adding the noise, so the noise is
      calibrated to the next round's norm while the updates were clipped to this round's;
      when the norm shrinks the aggregate is under-noised by a data-dependent factor. Here the
      update is deferred until the noise has been added.
    * Flower's update ``C *= exp(-lr * (clipped_fraction - target))`` moves the norm the wrong
      way (too many updates clipped -> smaller norm -> more clipped), so the norm runs off to 0
      or infinity. Here ``C *= exp(lr * (clipped_fraction - target))``: Andrew et al.'s rule
      with ``target_clipped_quantile`` read as Flower documents it (the fraction of updates
      that should be clipped; the paper's unclipped quantile is ``1 - target``).

    The account is :func:`adaptive_effective_noise_multiplier`.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        *,
        budget: ClientDPBudget | None = None,
    ) -> None:
        super().__init__(
            strategy,
            noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm,
            target_clipped_quantile,
            clip_norm_lr,
            clipped_count_stddev,
        )
        self.client_dp_budget = budget
        self._num_aggregated = num_sampled_clients
        self._pending_clipped_fraction: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        """Keep the noisy clipped fraction; the norm changes after this round's noise."""
        self._pending_clipped_fraction = clipped_fraction

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip with this round's norm, noise with it, then adapt the norm for the next round."""
        self._pending_clipped_fraction = None
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            fraction = self._pending_clipped_fraction
            self._pending_clipped_fraction = None
            if fraction is not None:
                self.clipping_norm *= math.exp(
                    self.clip_norm_lr * (fraction - self.target_clipped_quantile)
                )


def _check_inner(inner: Strategy, opts: ClientDPOptions) -> None:
    """Refuse inner strategies for which the noise would not match the accounting."""
    if not isinstance(inner, FedAvg) or type(inner).aggregate_train is not FedAvg.aggregate_train:
        raise ValueError(
            f"strategy: client_dp.mode={opts.mode} needs a strategy that releases the mean of "
            f"the updates (fedavg, fedprox); {type(inner).__name__} aggregates differently "
            "(robust rule or server optimizer), so noise scaled to clipping_norm / k would not "
            "bound one factory's influence"
        )
    sampled = max(int(opts.num_factories * inner.fraction_train), inner.min_train_nodes)
    if sampled != opts.num_sampled_clients:
        raise ValueError(
            f"{_field('num_sampled_clients')} = {opts.num_sampled_clients} but the strategy "
            f"samples {sampled} of {opts.num_factories} factories per round (fraction_train="
            f"{inner.fraction_train}, min_train_nodes={inner.min_train_nodes}); the "
            "accountant's sample rate must be the real one"
        )


def wrap_client_dp(inner: Strategy, options: Mapping[str, Any], num_factories: int) -> Strategy:
    """Put server-side client-level DP around ``inner`` as ``options`` (``cfg.client_dp``) says.

    ``mode: none`` returns ``inner`` itself. ``fixed`` and ``adaptive`` return
    :class:`ClientDPFixedClipping` / :class:`ClientDPAdaptiveClipping` (subclasses of Flower's
    ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``) around ``inner``, with
    ``num_sampled_clients`` factories per round (all by default) and the budget guard attached
    as ``client_dp_budget``. ``inner`` must aggregate by FedAvg's mean and sample exactly
    ``num_sampled_clients`` of ``num_factories`` factories. Bad options raise ValueError naming
    the field.
    """
    opts = parse_client_dp(options, num_factories)
    if opts.mode == "none":
        return inner
    _check_inner(inner, opts)
    budget = client_dp_budget(options, num_factories)
    if opts.mode == "fixed":
        return ClientDPFixedClipping(
            inner,
            opts.noise_multiplier,
            opts.clipping_norm,
            opts.num_sampled_clients,
            budget=budget,
        )
    return ClientDPAdaptiveClipping(
        inner,
        opts.noise_multiplier,
        opts.num_sampled_clients,
        initial_clipping_norm=opts.initial_clipping_norm,
        target_clipped_quantile=opts.target_clipped_quantile,
        clip_norm_lr=opts.clip_norm_lr,
        clipped_count_stddev=opts.clipped_count_stddev,
        budget=budget,
    )
