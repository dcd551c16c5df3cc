"""Client-level privacy accounting: the epsilon of ``T`` rounds and the budget guard.

:class:`ClientLevelAccountant` charges each server round as one sampled Gaussian mechanism with
the factory as the unit of privacy (the RDP arithmetic is :mod:`fl_common.accounting`, shared
with the factories' DP-SGD); :class:`ClientDPBudget` refuses to configure a round whose model
would be released past the epsilon budget and gives the epsilon to log per round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fl_common.accounting import DEFAULT_ORDERS, MAX_STEPS_SEARCHED, max_steps, rdp_epsilon
from strategies.client_dp.options import ClientDPOptions, field_name, parse_client_dp

#: Upper end of :meth:`ClientLevelAccountant.max_rounds`' search (a budget that never runs out).
MAX_ROUNDS_SEARCHED = MAX_STEPS_SEARCHED


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
    ``(noise_multiplier, sample_rate)``; the factories' DP-SGD uses the same analysis, through
    the same helper (:mod:`fl_common.accounting`).

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
        self.orders = list(orders) if orders is not None else list(DEFAULT_ORDERS)

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon (at ``delta``) of the model released after ``rounds`` rounds; inf if no noise."""
        if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 0:
            raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
        return rdp_epsilon(
            [(self.noise_multiplier, self.sample_rate, int(rounds))], self.delta, self.orders
        )

    def max_rounds(self, epsilon_budget: float) -> int:
        """The largest ``T`` with ``epsilon_after(T) <= epsilon_budget`` (0 if one round exceeds).

        Exact (see :func:`fl_common.accounting.max_steps`); capped at
        :data:`MAX_ROUNDS_SEARCHED`.
        """
        return max_steps(
            self.noise_multiplier, self.sample_rate, self.delta, epsilon_budget, orders=self.orders
        )


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
        raise ValueError(f"{field_name('mode')} is 'none': client-level DP has no accountant")
    return ClientLevelAccountant(effective_noise_multiplier(opts), opts.sample_rate, opts.delta)


def client_dp_budget(options: Mapping[str, Any], num_factories: int) -> ClientDPBudget | None:
    """The budget guard for a ``client_dp`` config; None for ``mode: none``."""
    opts = parse_client_dp(options, num_factories)
    if opts.mode == "none":
        return None
    return ClientDPBudget(client_dp_accountant(options, num_factories), opts.epsilon)
