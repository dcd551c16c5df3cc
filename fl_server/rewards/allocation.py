"""Paying factories for their contributions: exact integer splits of a reward pool.

Money is counted in integer minor units (e.g. cents) so that every payout is exact and the
payouts of a round always add up to the pool: nothing is lost or created by rounding. The split
uses the largest-remainder (Hamilton) method over exact rational quotas, with a fixed tie-break,
so the same inputs give the same payouts on every machine.

:class:`RewardBook` keeps a run's running state (cumulative contributions, cumulative payouts
and the pool carried over when nobody could be paid) and can be rebuilt from the reward ledger's
rows, so a restarted server continues exactly where it stopped. Pure logic, no I/O: the ledger
in :mod:`fl_server.rewards.ledger` stores what this module computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

PER_ROUND = "per_round"  # ``amount`` is paid out every round
PER_RUN = "per_run"  # ``amount`` is the run's total, released in equal installments
END_OF_RUN = "end_of_run"  # ``amount`` is the run's total, paid once after the last round
SCHEDULES = (PER_ROUND, PER_RUN, END_OF_RUN)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``.

    Raises:
        ValueError: naming ``name``, the value and the bound, otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def allocate(pool: int, scores: Mapping[str, float]) -> dict[str, int]:
    """Split ``pool`` minor units among factories in proportion to their positive scores.

    Factories whose score is <= 0 or NaN get 0: a harmful or unmeasurable contribution earns
    nothing, and it must not reduce what others get. When at least one score is positive the
    payouts add up to exactly ``pool``; otherwise nothing is allocated and every payout is 0
    (the caller decides what happens to the unallocated pool).

    Each factory first gets the floor of its exact quota ``pool * score / total``; the units
    left over go one each to the largest remainders, ties broken by the larger score, then by
    factory id ascending. Quotas are computed with exact fractions of the float scores, so the
    result does not depend on float summation order.

    Args:
        pool: integer amount to split, >= 0.
        scores: factory id -> score.

    Returns:
        factory id -> payout, for every key of ``scores``.

    Raises:
        ValueError: ``pool`` is negative or not an integer, or a score is +infinity.
    """
    check_int("pool", pool, 0)
    payouts = {factory: 0 for factory in scores}
    positive: dict[str, Fraction] = {}
    for factory, score in scores.items():
        value = float(score)
        if math.isnan(value) or value <= 0.0:
            continue
        if math.isinf(value):
            raise ValueError(f"score of factory {factory!r} is infinite; it cannot be split")
        positive[factory] = Fraction(value)
    if not positive or pool == 0:
        return payouts
    total = sum(positive.values(), Fraction(0))
    remainders: list[tuple[Fraction, Fraction, str]] = []
    for factory, score in positive.items():
        share = pool * score  # quota * total: exact, and the same denominator for everyone
        whole = int(share // total)
        payouts[factory] = whole
        remainders.append((share - whole * total, score, factory))
    left = pool - sum(payouts.values())
    remainders.sort(key=lambda item: (-item[0], -item[1], item[2]))
    for _, _, factory in remainders[:left]:
        payouts[factory] += 1
    return payouts


@dataclass(frozen=True)
class RewardPolicy:
    """How much money a run releases, and when.

    Attributes:
        amount: minor units; paid every round (``per_round``) or the run's total (``per_run``,
            ``end_of_run``).
        schedule: ``per_round``, ``per_run`` or ``end_of_run``.
        num_rounds: rounds of the run; ``per_run`` spreads ``amount`` over them (round ``r``
            gets ``amount // num_rounds``, plus one unit for the first ``amount % num_rounds``
            rounds) and releases nothing after them; ``end_of_run`` releases all of it in round
            ``num_rounds``. Ignored by ``per_round``.

    Payouts are final, so the schedules differ in what they reward. ``per_round`` and
    ``per_run`` pay as the run goes, by the cumulative contributions *so far*: a factory whose
    early rounds scored well keeps that money even if it turns harmful later. ``end_of_run``
    holds the whole pool until the run's last round and splits it by the *final* cumulative
    contributions, so a factory that ends the run with zero or negative contribution gets
    nothing at all (the default; a run stopped before its last round pays nothing from it).
    """

    amount: int
    schedule: str = PER_ROUND
    num_rounds: int = 1

    def __post_init__(self) -> None:
        check_int("rewards.amount", self.amount, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"rewards.schedule must be {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}, "
                f"got {self.schedule!r}"
            )
        check_int("rewards.num_rounds", self.num_rounds, 1)

    def installment(self, server_round: int) -> int:
        """Minor units released in round ``server_round`` (1-based)."""
        check_int("server_round", server_round, 1)
        if self.schedule == PER_ROUND:
            return self.amount
        if self.schedule == END_OF_RUN:
            return self.amount if server_round == self.num_rounds else 0
        if server_round > self.num_rounds:
            return 0
        base, extra = divmod(self.amount, self.num_rounds)
        return base + (1 if server_round <= extra else 0)

    def released(self, through_round: int) -> int:
        """Total released by rounds ``1..through_round`` (0 for ``through_round == 0``)."""
        check_int("through_round", through_round, 0)
        if self.schedule == PER_ROUND:
            return self.amount * through_round
        if self.schedule == END_OF_RUN:
            return self.amount if through_round >= self.num_rounds else 0
        rounds = min(through_round, self.num_rounds)
        base, extra = divmod(self.amount, self.num_rounds)
        return base * rounds + min(rounds, extra)


def _field(row: Any, name: str) -> Any:
    """``row[name]`` for mappings, ``row.name`` otherwise (ledger entries or plain dicts)."""
    if isinstance(row, Mapping):
        return row[name]
    return getattr(row, name)


class RewardBook:
    """A run's reward state, settled round by round.

    Every factory ever seen keeps a cumulative contribution (the sum of its per-round scores)
    and a cumulative payout. Each settled round releases its installment; together with the
    carry-over it forms the round's pool, which is split by :func:`allocate` over the positive
    *cumulative* contributions of all factories seen so far, so a factory that contributed early
    keeps earning while its contribution stands, and one that did harm must first make up for
    it. When nobody has a positive cumulative contribution the pool is carried to the next
    round instead. Invariant: ``sum(cumulative_payout) + carry == released``.
    """

    def __init__(self, policy: RewardPolicy) -> None:
        self._policy = policy
        self._contribution: dict[str, float] = {}
        self._payout: dict[str, int] = {}
        self._carry = 0
        self._last_round = 0

    @property
    def policy(self) -> RewardPolicy:
        """The policy this book releases money under."""
        return self._policy

    @property
    def cumulative_contribution(self) -> dict[str, float]:
        """Factory id -> sum of its contributions so far (a copy)."""
        return dict(self._contribution)

    @property
    def cumulative_payout(self) -> dict[str, int]:
        """Factory id -> minor units paid to it so far (a copy)."""
        return dict(self._payout)

    @property
    def carry(self) -> int:
        """Released but unallocated minor units, added to the next round's pool."""
        return self._carry

    @property
    def last_round(self) -> int:
        """The last settled round, 0 before the first."""
        return self._last_round

    @property
    def released(self) -> int:
        """Total minor units released through :attr:`last_round`."""
        return self._policy.released(self._last_round)

    def settle(
        self,
        server_round: int,
        contributions: Mapping[str, float],
        withheld: Iterable[str] = (),
    ) -> dict[str, int]:
        """Add round ``server_round``'s contributions and pay out its pool.

        The pool is the installments of every round since the last settled one (normally just
        ``installment(server_round)``; a round that was never settled behaves like a round in
        which nobody could be paid) plus the carry. Factories absent from ``contributions``
        keep their cumulative contribution and still share the pool. Factories in ``withheld``
        (their contribution is not yet distinguishable from noise) keep their cumulative
        contribution but take no part in this round's split: they are paid 0 and the pool goes
        to the others (or is carried when nobody else can be paid).

        Args:
            server_round: the round to settle; must be after :attr:`last_round`, so a round can
                never be paid twice by the same book.
            contributions: factory id -> this round's contribution (finite; may be negative).

        Returns:
            Factory id -> this round's payout for every factory seen so far (zeros included),
            sorted by factory id.

        Raises:
            ValueError: the round was already settled, or a contribution is not finite.
        """
        check_int("server_round", server_round, 1)
        if server_round <= self._last_round:
            raise ValueError(
                f"round {server_round} is already settled (the book is at round {self._last_round})"
            )
        cumulative = dict(self._contribution)
        for factory, value in contributions.items():
            score = float(value)
            if not math.isfinite(score):
                raise ValueError(f"contribution of factory {factory!r} is not finite: {value!r}")
            cumulative[factory] = cumulative.get(factory, 0.0) + score
        cumulative = dict(sorted(cumulative.items()))
        pool = (
            self._policy.released(server_round)
            - self._policy.released(self._last_round)
            + self._carry
        )
        excluded = set(withheld)
        payouts = allocate(pool, {f: v for f, v in cumulative.items() if f not in excluded})
        payouts = {f: payouts.get(f, 0) for f in cumulative}
        self._contribution = cumulative
        self._payout = {f: self._payout.get(f, 0) + payouts[f] for f in cumulative}
        self._carry = pool - sum(payouts.values())
        self._last_round = server_round
        return payouts

    @classmethod
    def restore(cls, policy: RewardPolicy, rows: Iterable[Any]) -> RewardBook:
        """Rebuild a run's book from its reward-ledger rows.

        ``rows`` are ledger entries of ONE run (objects or mappings with ``round``,
        ``factory_id``, ``cumulative_score``, ``cumulative_payout``, ``carry`` and optionally
        ``run_id``). Each factory's state is taken from its latest row and the carry from the
        latest round, so the restored book settles the next round exactly like the live one.
        Rounds settled before any factory was known leave no rows; the restored book then
        simply starts earlier, and its next :meth:`settle` releases those rounds' installments
        together, which is exactly the carry the live book held.

        Raises:
            ValueError: rows of several runs, a factory twice in a round, rounds whose rows
                disagree on the carry, or rows inconsistent with ``policy`` (payouts plus carry
                differ from what the policy released).
        """
        book = cls(policy)
        latest: dict[str, tuple[int, float, int]] = {}
        carries: dict[int, int] = {}
        runs: set[str] = set()
        for row in rows:
            run_id = row.get("run_id") if isinstance(row, Mapping) else getattr(row, "run_id", None)
            if run_id is not None:
                runs.add(str(run_id))
                if len(runs) > 1:
                    raise ValueError(
                        f"rows of several runs cannot restore one book: {sorted(runs)}"
                    )
            server_round = int(_field(row, "round"))
            factory = str(_field(row, "factory_id"))
            carry = int(_field(row, "carry"))
            if carries.setdefault(server_round, carry) != carry:
                raise ValueError(f"ledger rows of round {server_round} disagree on the carry")
            previous = latest.get(factory)
            if previous is not None and previous[0] == server_round:
                raise ValueError(f"factory {factory!r} appears twice in round {server_round}")
            if previous is None or server_round > previous[0]:
                latest[factory] = (
                    server_round,
                    float(_field(row, "cumulative_score")),
                    int(_field(row, "cumulative_payout")),
                )
        if not carries:
            return book
        book._last_round = max(carries)
        book._carry = carries[book._last_round]
        for factory in sorted(latest):
            _, contribution, payout = latest[factory]
            book._contribution[factory] = contribution
            book._payout[factory] = payout
        paid = sum(book._payout.values())
        if paid + book._carry != book.released:
            raise ValueError(
                f"ledger rows do not match the reward policy: {paid} paid + {book._carry} "
                f"carried through round {book._last_round}, but the policy released "
                f"{book.released}"
            )
        return book
