"""Client-level central differential privacy: the server clips and noises factories' updates.

The project's default privacy is sample-level DP-SGD inside each factory (``conf/privacy``),
which protects single records. This module is the operator's alternative, selected with the
``client_dp`` config group: the *server* clips each factory's model update and adds Gaussian
noise to the aggregate (DP-FedAvg, McMahan et al. 2018), which protects a factory's whole
participation, so the released global model says little about whether any one factory took part.

What is here, one module a job:

* :mod:`.options`: the ``client_dp`` config group, validated into :class:`ClientDPOptions`;
* :mod:`.accounting`: :class:`ClientLevelAccountant`, the RDP cost of ``T`` rounds of the
  sampled Gaussian mechanism with the factory as the unit of privacy, and
  :class:`ClientDPBudget`, the guard that refuses to configure a round whose model would be
  released past the epsilon budget, and the epsilon to log per round;
* :mod:`.wrappers`: :func:`wrap_client_dp` puts Flower's server-side clipping wrapper (fixed
  or adaptive) around the inner Flower strategy. The wrappers are thin subclasses of Flower's
  classes that make the released model match what the accountant charges for.

The accounting convention is Flower's: each round is one Gaussian mechanism whose noise
standard deviation is ``noise_multiplier * clipping_norm / k`` on the unweighted mean of ``k``
clipped updates, whose sensitivity to one factory (its update replaced by a zero update, with
the cohort size public) is ``clipping_norm / k``. So every round costs one Gaussian mechanism
with noise multiplier ``z``, subsampled at rate ``q = num_sampled_clients / num_factories``.

Only the model is protected. Per-factory reports, training metrics, validation outcomes,
contribution scores and payouts are computed from the raw updates and are not covered.
"""

from strategies.client_dp.accounting import (
    MAX_ROUNDS_SEARCHED,
    ClientDPBudget,
    ClientDPBudgetExceeded,
    ClientLevelAccountant,
    adaptive_effective_noise_multiplier,
    client_dp_accountant,
    client_dp_budget,
    effective_noise_multiplier,
)
from strategies.client_dp.options import MODES, ClientDPOptions, parse_client_dp
from strategies.client_dp.wrappers import (
    CLIENT_DP_WEIGHT_KEY,
    ClientDPAdaptiveClipping,
    ClientDPFixedClipping,
    wrap_client_dp,
)

__all__ = [
    "CLIENT_DP_WEIGHT_KEY",
    "MAX_ROUNDS_SEARCHED",
    "MODES",
    "ClientDPAdaptiveClipping",
    "ClientDPBudget",
    "ClientDPBudgetExceeded",
    "ClientDPFixedClipping",
    "ClientDPOptions",
    "ClientLevelAccountant",
    "adaptive_effective_noise_multiplier",
    "client_dp_accountant",
    "client_dp_budget",
    "effective_noise_multiplier",
    "parse_client_dp",
    "wrap_client_dp",
]
