"""Reward allocation: exact integer splits, release schedules and the run's reward book."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fl_server.rewards.allocation import RewardBook, RewardPolicy, allocate

# ----------------------------------------------------------------------------- allocate


def test_equal_scores_split_100_gives_the_extra_unit_to_the_first_id() -> None:
    assert allocate(100, {"c": 1.0, "a": 1.0, "b": 1.0}) == {"a": 34, "b": 33, "c": 33}


def test_hand_computed_examples() -> None:
    # 7 * 2/3 = 4.67, 7 * 1/3 = 2.33: floors 4 + 2, the left unit to the larger remainder.
    assert allocate(7, {"x": 2.0, "y": 1.0}) == {"x": 5, "y": 2}
    # Float scores whose decimal quotas are whole: exact fractions must not lose a unit.
    assert allocate(10, {"a": 0.5, "b": 0.3, "c": 0.2}) == {"a": 5, "b": 3, "c": 2}
    # 1000 split 1:2:3:4 is exact.
    assert allocate(1000, {"a": 1, "b": 2, "c": 3, "d": 4}) == {
        "a": 100,
        "b": 200,
        "c": 300,
        "d": 400,
    }


def test_ties_on_remainder_go_to_the_larger_score_then_the_smaller_id() -> None:
    # Quotas 0.5 and 1.5: equal remainders, the larger score wins the left unit.
    assert allocate(2, {"a": 1.0, "b": 3.0}) == {"a": 0, "b": 2}
    # Equal remainders and scores: factory id ascending, whatever the input order.
    assert allocate(1, {"b": 1.0, "a": 1.0}) == {"a": 1, "b": 0}
    assert allocate(2, {"f3": 1.0, "f1": 1.0, "f2": 1.0}) == {"f1": 1, "f2": 1, "f3": 0}


def test_non_positive_and_nan_scores_get_nothing_and_keep_their_key() -> None:
    payouts = allocate(10, {"good": 2.0, "zero": 0.0, "bad": -5.0, "nan": math.nan})
    assert payouts == {"good": 10, "zero": 0, "bad": 0, "nan": 0}


def test_nothing_is_allocated_without_a_positive_score() -> None:
    assert allocate(50, {"a": 0.0, "b": -1.0}) == {"a": 0, "b": 0}
    assert allocate(50, {}) == {}
    assert allocate(0, {"a": 1.0}) == {"a": 0}


def test_invalid_pool_or_score_is_refused() -> None:
    with pytest.raises(ValueError, match="pool"):
        allocate(-1, {"a": 1.0})
    with pytest.raises(ValueError, match="pool"):
        allocate(1.5, {"a": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="infinite"):
        allocate(10, {"a": math.inf})


@pytest.mark.parametrize("seed", range(20))
def test_allocation_sums_exactly_and_follows_the_quotas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    scores = {f"f{i:02d}": float(s) for i, s in enumerate(rng.normal(0.5, 1.0, n) ** 3)}
    pool = int(rng.integers(0, 10**7))
    payouts = allocate(pool, scores)
    assert set(payouts) == set(scores)
    positive = {f: s for f, s in scores.items() if s > 0}
    assert sum(payouts.values()) == (pool if positive else 0)
    total = sum(positive.values())
    for factory, score in scores.items():
        if score <= 0:
            assert payouts[factory] == 0
        else:  # Hamilton: every payout is its quota rounded down or up
            quota = pool * score / total
            assert math.floor(quota) - 1e-6 <= payouts[factory] <= math.ceil(quota) + 1e-6
    assert allocate(pool, dict(reversed(list(scores.items())))) == payouts


# ----------------------------------------------------------------------------- policy


@pytest.mark.parametrize(("amount", "num_rounds"), [(10, 4), (100, 3), (5, 7), (0, 2), (9, 1)])
def test_per_run_installments_sum_to_the_amount(amount: int, num_rounds: int) -> None:
    policy = RewardPolicy(amount, "per_run", num_rounds)
    parts = [policy.installment(r) for r in range(1, num_rounds + 1)]
    assert sum(parts) == amount
    assert max(parts) - min(parts) <= 1
    assert parts == sorted(parts, reverse=True)  # the extra units come first
    assert policy.installment(num_rounds + 1) == 0
    for r in range(num_rounds + 3):
        assert policy.released(r) == sum(policy.installment(k) for k in range(1, r + 1))


def test_installments_by_hand() -> None:
    policy = RewardPolicy(10, "per_run", 4)
    assert [policy.installment(r) for r in range(1, 6)] == [3, 3, 2, 2, 0]
    per_round = RewardPolicy(25)
    assert [per_round.installment(r) for r in (1, 2, 50)] == [25, 25, 25]
    assert per_round.released(4) == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"amount": 10, "schedule": "x"},
            "rewards.schedule must be per_round, per_run or end_of_run, got 'x'",
        ),
        ({"amount": -1}, "rewards.amount must be >= 0"),
        ({"amount": 2.5}, "rewards.amount must be an integer"),
        ({"amount": True}, "rewards.amount must be an integer"),
        ({"amount": 10, "num_rounds": 0}, "rewards.num_rounds must be >= 1"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RewardPolicy(**kwargs)


# ----------------------------------------------------------------------------- book


def test_pool_carries_over_while_nobody_is_positive() -> None:
    book = RewardBook(RewardPolicy(100))
    assert book.settle(1, {"a": -1.0, "b": 0.0}) == {"a": 0, "b": 0}
    assert book.carry == 100
    assert book.settle(2, {"a": 0.5}) == {"a": 0, "b": 0}  # a's cumulative is still -0.5
    assert book.carry == 200
    assert book.settle(3, {"b": 1.0}) == {"a": 0, "b": 300}
    assert book.carry == 0
    assert book.cumulative_payout == {"a": 0, "b": 300}
    assert book.cumulative_contribution == {"a": -0.5, "b": 1.0}


def test_split_by_cumulative_contribution_with_a_late_joiner() -> None:
    book = RewardBook(RewardPolicy(90, "per_run", 3))
    assert book.settle(1, {"a": 1.0, "b": 2.0}) == {"a": 10, "b": 20}
    # c joins; b is absent but keeps its cumulative 2.0 and still shares the pool:
    # quotas 7.5, 7.5, 15 -> the left unit goes to a (tie with b on remainder and score).
    assert book.settle(2, {"a": 1.0, "c": 4.0}) == {"a": 8, "b": 7, "c": 15}
    assert book.settle(3, {}) == {"a": 8, "b": 7, "c": 15}
    assert book.cumulative_payout == {"a": 26, "b": 34, "c": 30}
    assert sum(book.cumulative_payout.values()) == 90
    assert book.released == 90 and book.carry == 0
    assert book.settle(4, {"a": 5.0}) == {"a": 0, "b": 0, "c": 0}  # per_run: nothing left


def test_a_round_is_settled_once_and_skipped_rounds_release_their_installments() -> None:
    book = RewardBook(RewardPolicy(10, "per_run", 4))
    book.settle(1, {"a": 1.0})
    with pytest.raises(ValueError, match="already settled"):
        book.settle(1, {"a": 1.0})
    assert book.settle(3, {"a": 1.0}) == {"a": 5}  # rounds 2 and 3: 3 + 2
    assert book.last_round == 3 and book.released == 8


def test_failed_settle_leaves_the_book_unchanged() -> None:
    book = RewardBook(RewardPolicy(10))
    book.settle(1, {"a": 1.0})
    with pytest.raises(ValueError, match="not finite"):
        book.settle(2, {"a": 1.0, "b": math.nan})
    assert book.last_round == 1
    assert book.cumulative_contribution == {"a": 1.0}


def _rows(book: RewardBook, run_id: str = "run") -> list[dict]:
    """What the ledger stores for the round ``book`` just settled."""
    return [
        {
            "run_id": run_id,
            "round": book.last_round,
            "factory_id": factory,
            "cumulative_score": book.cumulative_contribution[factory],
            "cumulative_payout": book.cumulative_payout[factory],
            "carry": book.carry,
        }
        for factory in book.cumulative_contribution
    ]


def _same_state(a: RewardBook, b: RewardBook) -> None:
    assert a.cumulative_contribution == b.cumulative_contribution
    assert a.cumulative_payout == b.cumulative_payout
    assert (a.carry, a.last_round, a.released) == (b.carry, b.last_round, b.released)


def test_restore_equals_the_live_book() -> None:
    policy = RewardPolicy(100, "per_run", 5)
    book = RewardBook(policy)
    rows: list[dict] = []
    for server_round, contributions in enumerate(
        [{"a": -1.0}, {"a": 0.2, "b": 0.7}, {"c": 1.5}], start=1
    ):
        book.settle(server_round, contributions)
        rows += _rows(book)
    restored = RewardBook.restore(policy, rows)
    _same_state(restored, book)
    assert restored.settle(4, {"a": 3.0}) == book.settle(4, {"a": 3.0})
    _same_state(restored, book)


def test_restore_from_nothing_and_from_bad_rows() -> None:
    policy = RewardPolicy(10)
    _same_state(RewardBook.restore(policy, []), RewardBook(policy))
    book = RewardBook(policy)
    book.settle(1, {"a": 1.0})
    rows = _rows(book)
    with pytest.raises(ValueError, match="several runs"):
        RewardBook.restore(policy, rows + _rows(book, run_id="other"))
    with pytest.raises(ValueError, match="twice"):
        RewardBook.restore(policy, rows + rows)
    with pytest.raises(ValueError, match="do not match the reward policy"):
        RewardBook.restore(RewardPolicy(11), rows)


@pytest.mark.parametrize("seed", range(30))
def test_random_runs_conserve_money_and_restore_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    schedule = "per_run" if rng.random() < 0.5 else "per_round"
    num_rounds = int(rng.integers(1, 10))
    policy = RewardPolicy(int(rng.integers(0, 10_000)), schedule, num_rounds)
    book = RewardBook(policy)
    factories = [f"f{i}" for i in range(int(rng.integers(1, 8)))]
    restart_after = int(rng.integers(1, num_rounds + 3))
    rows: list[dict] = []
    restored: RewardBook | None = None
    server_round = 0
    for _ in range(num_rounds + 2):
        server_round += int(rng.integers(1, 3))  # sometimes a round is never settled
        # Factories join late (only a prefix is active yet), some skip a round, and a fifth of
        # the rounds everyone does harm.
        active = factories[: int(rng.integers(0, len(factories) + 1))]
        harm = rng.random() < 0.2
        contributions = {
            f: float(-abs(rng.normal()) if harm else rng.normal(0.2, 1.0))
            for f in active
            if rng.random() < 0.8
        }
        before = (book.carry, book.released, dict(book.cumulative_payout))
        payouts = book.settle(server_round, contributions)
        if restored is not None:
            assert restored.settle(server_round, contributions) == payouts
            _same_state(restored, book)
        released_now = book.released - before[1]
        assert sum(payouts.values()) + book.carry == before[0] + released_now
        assert set(payouts) == set(book.cumulative_contribution)
        assert list(payouts) == sorted(payouts)
        for factory, paid in payouts.items():
            assert paid >= 0
            if book.cumulative_contribution[factory] <= 0:
                assert paid == 0
            assert book.cumulative_payout[factory] == before[2].get(factory, 0) + paid
        if book.carry:  # a carry only remains when nobody could be paid
            assert all(c <= 0 for c in book.cumulative_contribution.values())
        rows += _rows(book)
        if server_round >= restart_after and restored is None:
            restored = RewardBook.restore(policy, rows)
            if rows:
                _same_state(restored, book)
            else:  # no factory yet: nothing was recorded, and the next round makes up for it
                _same_state(restored, RewardBook(policy))
    assert sum(book.cumulative_payout.values()) + book.carry == policy.released(server_round)


def test_end_of_run_pays_only_final_positive_contributions() -> None:
    """Early promise is not paid: only the final cumulative scores share the pool."""
    policy = RewardPolicy(1000, "end_of_run", 3)
    assert [policy.installment(r) for r in (1, 2, 3, 4)] == [0, 0, 1000, 0]
    assert [policy.released(r) for r in (0, 2, 3, 9)] == [0, 0, 1000, 1000]
    book = RewardBook(policy)
    assert book.settle(1, {"early": 1.0, "steady": 0.2}) == {"early": 0, "steady": 0}
    book.settle(2, {"early": -1.5, "steady": 0.2})
    assert book.settle(3, {"steady": 0.1}) == {"early": 0, "steady": 1000}
    assert book.carry == 0
    nobody = RewardBook(policy)
    for r in (1, 2, 3):
        nobody.settle(r, {"a": -0.1})
    assert nobody.cumulative_payout == {"a": 0} and nobody.carry == 1000


def test_withheld_factories_keep_their_contribution_but_take_no_part_in_the_split() -> None:
    book = RewardBook(RewardPolicy(1000, "per_round"))
    paid = book.settle(1, {"a": 1.0, "b": 1.0, "noise": 2.0}, withheld=["noise"])
    assert paid == {"a": 500, "b": 500, "noise": 0}
    assert book.cumulative_contribution["noise"] == 2.0
    # Once it is proven it shares by its whole cumulative contribution.
    paid = book.settle(2, {"a": 0.0, "b": 0.0, "noise": 0.0})
    assert paid == {"a": 250, "b": 250, "noise": 500}
    # Everyone withheld: the pool is carried, money is conserved.
    paid = book.settle(3, {}, withheld=["a", "b", "noise"])
    assert set(paid.values()) == {0} and book.carry == 1000
    assert sum(book.cumulative_payout.values()) + book.carry == book.released
