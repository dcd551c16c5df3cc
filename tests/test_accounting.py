"""The shared RDP helper: Opacus's numbers for a history, and the exact steps a budget allows."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from fl_common.accounting import DEFAULT_ORDERS, max_steps, rdp_curve, rdp_epsilon

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
