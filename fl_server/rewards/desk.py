"""The payout desk: settles each round's rewards into the run's ledger.

:func:`reward_policy` turns the ``rewards`` config group into a policy. :class:`PayoutDesk`
pays each scored round from the ``rewards`` pool and writes it to the hash-chained ledger in
the run's output directory. The ledger is the source of truth: the desk rebuilds its book from
it on start, and a round already in it is reported again, never paid again, so a restarted
server cannot pay twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from fl_server.rewards.allocation import RewardBook, RewardPolicy
from fl_server.rewards.ledger import LedgerEntry, RewardLedger, round_rows
from strategies.contribution.scorer import RoundContribution

LEDGER_FILE = "reward-ledger.sqlite"


def reward_policy(cfg: DictConfig, num_rounds: int | None = None) -> RewardPolicy:
    """The ``rewards`` config group as a policy; errors name the field at fault.

    ``num_rounds`` is the number of rounds the run will really have, when a privacy budget
    cuts it below ``federation.num_rounds`` (a per-run pool must be released by then).
    """
    return RewardPolicy(
        amount=cfg.rewards.amount,
        schedule=str(cfg.rewards.schedule),
        num_rounds=int(num_rounds if num_rounds is not None else cfg.federation.num_rounds),
    )


class PayoutDesk:
    """Settles rounds into the ledger; the book holds the run's cumulative totals.

    Parameters
    ----------
    policy : how much each round releases.
    ledger_path : the run's SQLite ledger (created if missing, reused after a restart).
    run_id : the federation run the entries belong to (the MLflow run id).
    """

    def __init__(self, policy: RewardPolicy, ledger_path: str | Path, run_id: str) -> None:
        self.policy = policy
        self.ledger = RewardLedger(ledger_path)
        self.run_id = run_id
        entries = self.ledger.entries(run_id=run_id)
        self.book = RewardBook.restore(policy, entries)
        #: Factories whose pay is withheld, as the last scored round decided (an unscored
        #: round has no new evidence, so it keeps them withheld).
        self.withheld: tuple[str, ...] = ()
        if entries:
            last = max(e.round for e in entries)
            self.withheld = tuple(e.factory_id for e in entries if e.round == last and e.withheld)

    @property
    def path(self) -> Path:
        return self.ledger.path

    def settle(
        self,
        server_round: int,
        contribution: RoundContribution | None,
        epsilons: Mapping[str, float],
    ) -> list[LedgerEntry]:
        """Pay round ``server_round`` (once) and return its ledger entries.

        An unscored round (no contribution: too few updates, or scoring failed) still settles:
        its instalment is carried to the next round, and the ledger shows that it was. The
        guards' findings go into the entries: a withheld factory takes no part in the split
        (see :meth:`~fl_server.rewards.allocation.RewardBook.settle`), and each factory's
        duplicate group is named.
        """
        if server_round in self.ledger.rounds(self.run_id):
            return [e for e in self.ledger.entries(run_id=self.run_id) if e.round == server_round]
        scores = dict(contribution.scores) if contribution else {}
        if contribution is not None:
            self.withheld = tuple(contribution.withheld)
        withheld = self.withheld
        groups = contribution.groups if contribution else ()
        payouts = self.book.settle(server_round, scores, withheld)
        rows = round_rows(self.book, scores, payouts, epsilons, withheld, groups)
        if not rows:
            return []
        return self.ledger.record_round(self.run_id, server_round, rows)
