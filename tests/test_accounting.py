"""The shared RDP helper: Opacus's numbers for a history, the exact steps a budget allows, and
the fast curves and noise search, checked against Opacus."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from fl_common.accounting import (
    DEFAULT_ORDERS,
    SEARCH_GUARD,
    SEARCH_GUARD_PER_STEP,
    epsilon_of_rdp,
    max_steps,
    noise_multiplier_for,
    rdp_curve,
    rdp_epsilon,
    sgm_rdp,
    summed_rdp,
)

DELTA = 1e-5


def _opacus(history: list[tuple[float, float, int]], delta: float = DELTA) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.01, 100)],
        [(1.1, 0.02, 50), (0.8, 0.01, 300)],
        [(2.0, 1.0, 7)],  # no subsampling: the server's client-level case
    ],
)
def test_epsilon_is_opacus_bit_for_bit(history) -> None:
    assert rdp_epsilon(history, DELTA) == _opacus(history)


def test_edge_histories() -> None:
    assert rdp_epsilon([], DELTA) == 0.0
    assert rdp_epsilon([(1.0, 0.01, 0)], DELTA) == 0.0
    assert rdp_epsilon([(1.0, 0.01, 10), (0.0, 0.01, 1)], DELTA) == math.inf
    assert rdp_curve(1.0, 0.01) is rdp_curve(1.0, 0.01)  # memoized
    assert not rdp_curve(1.0, 0.01).flags.writeable


def test_other_orders_change_the_bound() -> None:
    coarse = (2.0, 8.0, 32.0)
    history = [(1.0, 0.05, 200)]
    assert rdp_epsilon(history, DELTA, coarse) >= rdp_epsilon(history, DELTA, DEFAULT_ORDERS)


@pytest.mark.parametrize(
    ("noise", "rate", "budget", "prior"),
    [
        (2.0, 1.0, 8.0, []),
        (1.5, 0.25, 3.0, []),
        (1.0, 0.01, 2.0, [(1.2, 0.02, 400)]),
    ],
)
def test_max_steps_is_the_exact_boundary(noise, rate, budget, prior) -> None:
    steps = max_steps(noise, rate, DELTA, budget, prior)
    assert steps >= 1
    assert _opacus([*prior, (noise, rate, steps)]) <= budget
    assert _opacus([*prior, (noise, rate, steps + 1)]) > budget


def test_max_steps_edges() -> None:
    assert max_steps(0.0, 1.0, DELTA, 8.0) == 0  # no noise: not one step
    assert max_steps(0.3, 1.0, DELTA, 0.1) == 0  # one step already exceeds
    assert max_steps(1.0, 0.01, DELTA, 1.0, [(1.0, 0.01, 10**6)]) == 0  # spent before
    assert max_steps(50.0, 1e-6, DELTA, 1e6) == 10**9  # a budget that never runs out
    with pytest.raises(ValueError, match="epsilon_budget"):
        max_steps(1.0, 1.0, DELTA, 0.0)


# --- the fast curves and search against Opacus, the reference ----------------------------

#: Rates and noise levels of the fast checks: the server's q = 1, a factory's small and large
#: rates, noise from far below 1 (long fractional series) to large.
GRID_RATES = (0.0, 1e-4, 1 / 7, 0.9, 1.0)
GRID_NOISE = (0.0, 0.4, 1.9, 20)
#: Orders besides Opacus's defaults: fractional and integer, one far out, and infinity.
OTHER_ORDERS = (1.01, 1.5, 2.0, 2.75, 7.0, 33.3, 128.0, 256.5, math.inf)


def _opacus_curve(q: float, sigma: float, orders) -> np.ndarray:
    return np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)),
        dtype=float,
    )


@pytest.mark.parametrize("q", GRID_RATES)
@pytest.mark.parametrize("sigma", GRID_NOISE)
def test_sgm_rdp_is_opacus_compute_rdp_bit_for_bit(q: float, sigma: float) -> None:
    for orders in (DEFAULT_ORDERS, OTHER_ORDERS):
        ours = sgm_rdp(q, sigma, orders)
        assert ours.dtype == np.float64
        assert np.array_equal(ours, _opacus_curve(q, sigma, orders))


@pytest.mark.slow
@pytest.mark.parametrize("q", (3e-3, 0.05, 0.1, 0.25, 1 / 3, 0.75, 0.99))
@pytest.mark.parametrize("sigma", (0.3, 0.7, 1.25, 3.0, 5.0, 40.0))
def test_sgm_rdp_is_opacus_compute_rdp_bit_for_bit_on_a_broad_grid(q, sigma) -> None:
    assert np.array_equal(sgm_rdp(q, sigma), _opacus_curve(q, sigma, DEFAULT_ORDERS))


@pytest.mark.parametrize("q", GRID_RATES[1:-1] + (0.02, 0.5))
@pytest.mark.parametrize("sigma", GRID_NOISE[1:] + (80,))
def test_summed_rdp_stays_within_its_stated_error_of_opacus(q: float, sigma: float) -> None:
    exact = sgm_rdp(q, sigma)
    summed = summed_rdp(q, sigma)
    log_a_gap = np.abs(summed - exact) * (np.asarray(DEFAULT_ORDERS) - 1)
    assert log_a_gap.max() <= 2e-13
    for steps in (1, 100, 10_000):
        ours, theirs = epsilon_of_rdp(summed * steps, DELTA), epsilon_of_rdp(exact * steps, DELTA)
        assert abs(ours - theirs) <= 2e-12 * steps + 1e-12 * (1 + theirs)  # the stated bound
        assert abs(ours - theirs) < SEARCH_GUARD + SEARCH_GUARD_PER_STEP * steps


def _opacus_sigma(eps: float, q: float, steps: int, tolerance: float = 0.01) -> float:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return get_noise_multiplier(
            target_epsilon=eps,
            target_delta=DELTA,
            sample_rate=q,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=tolerance,
        )


@pytest.mark.parametrize(
    ("eps", "q", "steps", "tolerance"),
    [
        (8.0, 1 / 7, 350, 0.01),  # the default tep_fault factory
        (8.0, 1.0, 25, 0.01),  # a factory smaller than one batch
        (3.0, 0.02, 1000, 0.01),
        (1.0, 0.3, 50, 0.001),
        (0.5, 1e-3, 20, 0.01),
    ],
)
def test_noise_multiplier_for_is_opacus_get_noise_multiplier(eps, q, steps, tolerance) -> None:
    assert noise_multiplier_for(eps, DELTA, q, steps, tolerance) == _opacus_sigma(
        eps, q, steps, tolerance
    )


@pytest.mark.slow
@pytest.mark.parametrize("eps", (0.3, 2.0, 8.0, 30.0))
@pytest.mark.parametrize(("q", "steps"), [(0.01, 5000), (0.1, 200), (1 / 3, 40), (0.6, 10)])
def test_noise_multiplier_for_is_opacus_get_noise_multiplier_on_a_grid(eps, q, steps) -> None:
    assert noise_multiplier_for(eps, DELTA, q, steps) == _opacus_sigma(eps, q, steps)


def test_a_close_call_is_decided_with_opacus_floats() -> None:
    # A target equal to the epsilon of the first candidate (sigma 20): Opacus stops there,
    # since that epsilon is not above the target; a summed epsilon a hair above it would
    # double on. The guard recomputes such a close call exactly.
    q, steps = 0.05, 400
    target = epsilon_of_rdp(rdp_curve(20, q) * steps, DELTA)
    assert noise_multiplier_for(target, DELTA, q, steps) == _opacus_sigma(target, q, steps) == 20


def test_a_budget_no_noise_can_keep_is_opacus_error() -> None:
    with pytest.raises(ValueError, match="privacy budget is too low"):
        noise_multiplier_for(1e-9, DELTA, 1.0, 10**6)
