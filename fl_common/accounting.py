"""RDP accounting of the sampled Gaussian mechanism, for both privacy units.

A factory's DP-SGD (one step per batch, the record as the unit) and the server's client-level
DP (one step per round, the factory as the unit) are the same mechanism: ``steps`` releases of
a Gaussian with noise multiplier ``sigma``, each on a Poisson sample at rate ``q``. Both sides
account it with Opacus's RDP analysis (Mironov et al. 2019) at Opacus's default orders and its
RDP-to-(epsilon, delta) conversion (Balle et al. 2020), so the numbers equal what
``opacus.accountants.RDPAccountant`` reports for the same history, bit for bit.

A *history* is Opacus's accountant history: ``(noise_multiplier, sample_rate, steps)``
entries. :func:`rdp_epsilon` is its epsilon; :func:`max_steps` the most further steps a budget
allows. The RDP curve of one step is memoized per ``(noise_multiplier, sample_rate, orders)``
(``compute_rdp`` of ``steps`` steps is exactly the one-step curve times ``steps``), so budget
checks and searches over long histories do not recompute it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

#: Opacus's default RDP orders (``RDPAccountant.DEFAULT_ALPHAS``), as a hashable tuple.
DEFAULT_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: Upper end of :func:`max_steps`' search: a budget that never runs out.
MAX_STEPS_SEARCHED = 10**9

HistoryEntry = tuple[float, float, int]


@lru_cache(maxsize=4096)
def rdp_curve(
    noise_multiplier: float, sample_rate: float, orders: tuple[float, ...] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each of ``orders`` (read-only).

    ``noise_multiplier`` must be > 0 (zero noise has no finite RDP; :func:`rdp_epsilon`
    answers ``inf`` for it without calling this).
    """
    curve = np.asarray(
        rdp_analysis.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
        ),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


def epsilon_of_rdp(
    rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """Epsilon at ``delta`` of an accumulated RDP curve (Opacus's conversion).

    Opacus warns when the best order is at the end of its range; the bound is still valid,
    only not the tightest, which is fine for budgets, so the warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def rdp_epsilon(
    history: Iterable[Sequence[float | int]],
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """Epsilon at ``delta`` of a history of ``(noise_multiplier, sample_rate, steps)`` entries.

    Equal to ``RDPAccountant(history=...).get_epsilon(delta)`` for Opacus's default orders.
    An empty history (or one of zero steps) spends nothing: 0.0. A step with noise multiplier
    0 has no guarantee: ``inf``. Entries are taken as given (validate them before).
    """
    orders = tuple(orders)
    entries = [(float(nm), float(q), int(steps)) for nm, q, steps in history if steps]
    if not entries:
        return 0.0
    if any(nm == 0.0 for nm, _, _ in entries):
        return math.inf
    rdp = sum(rdp_curve(nm, q, orders) * steps for nm, q, steps in entries)
    return epsilon_of_rdp(rdp, delta, orders)


def max_steps(
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    epsilon_budget: float,
    prior: Iterable[Sequence[float | int]] = (),
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> int:
    """The most steps ``T`` at ``(noise_multiplier, sample_rate)`` after ``prior`` within budget.

    The largest ``T`` with ``rdp_epsilon([*prior, (noise_multiplier, sample_rate, T)], delta)
    <= epsilon_budget``; 0 if not even one step fits (or the noise is 0). Epsilon grows with
    ``T`` (a minimum over orders of functions increasing in ``T``), so an exponential then a
    binary search finds the exact boundary; capped at :data:`MAX_STEPS_SEARCHED`.

    Raises:
        ValueError: ``epsilon_budget`` is not > 0.
    """
    if math.isnan(epsilon_budget) or epsilon_budget <= 0:
        raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
    orders = tuple(orders)
    prior = [(float(nm), float(q), int(steps)) for nm, q, steps in prior if steps]
    if noise_multiplier == 0.0 or any(nm == 0.0 for nm, _, _ in prior):
        return 0
    base = sum(rdp_curve(nm, q, orders) * steps for nm, q, steps in prior)
    step = rdp_curve(float(noise_multiplier), float(sample_rate), orders)

    def fits(steps: int) -> bool:
        return epsilon_of_rdp(base + step * steps, delta, orders) <= epsilon_budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        if high >= MAX_STEPS_SEARCHED:
            return MAX_STEPS_SEARCHED
        low, high = high, min(2 * high, MAX_STEPS_SEARCHED)
    while high - low > 1:  # invariant: fits(low) and not fits(high)
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
