"""A small recorded reward ledger and a way to change it behind the API's back, for tests."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

from fl_server.rewards.allocation import RewardBook, RewardPolicy
from fl_server.rewards.ledger import RewardLedger, round_rows

RUN = "run-1"
POLICY = RewardPolicy(1000, "per_run", 4)
# Three rounds: f3 joins in round 2, f1 skips round 3, f2 starts negative.
CONTRIBUTIONS = [
    {"f1": 1.0, "f2": -0.5},
    {"f1": 0.5, "f2": 1.0, "f3": 2.0},
    {"f2": 0.25, "f3": -1.0},
]
EPSILONS = [{"f1": 0.5, "f2": 0.4}, {"f1": 1.0, "f2": 0.8, "f3": 0.6}, {"f2": 1.2, "f3": 0.9}]
# A row as a caller could pass it to record_round (a plain dict).
FORGED_ROW = {
    "factory_id": "f1",
    "score": 1.0,
    "cumulative_score": 1.0,
    "payout": 1,
    "cumulative_payout": 1,
    "carry": 0,
}


def play(
    ledger: RewardLedger,
    run_id: str,
    rounds: Iterable[tuple[Mapping[str, float], Mapping[str, float]]],
    book: RewardBook | None = None,
) -> RewardBook:
    """Settle and record ``rounds`` (contributions, epsilons) after ``book``'s last round."""
    book = book or RewardBook(POLICY)
    for contributions, epsilons in rounds:
        server_round = book.last_round + 1
        payouts = book.settle(server_round, contributions)
        ledger.record_round(
            run_id, server_round, round_rows(book, contributions, payouts, epsilons)
        )
    return book


def record_run(tmp_path: Path) -> tuple[Path, RewardLedger, RewardBook]:
    """A ledger of 3 rounds: seq 1-2 (round 1), 3-5 (round 2), 6-8 (round 3)."""
    path = tmp_path / "ledgers" / "rewards.db"  # the folder does not exist yet
    ledger = RewardLedger(path)
    book = play(ledger, RUN, zip(CONTRIBUTIONS, EPSILONS, strict=True))
    return path, ledger, book


def tamper(path: Path, *statements: str, rows: list[dict[str, object]] | None = None) -> None:
    """Change the file behind the API's back: drop the guard triggers, run ``statements``,
    and if ``rows`` is given replace the whole table with them."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TRIGGER reward_ledger_no_update")
        conn.execute("DROP TRIGGER reward_ledger_no_delete")
        for sql in statements:
            conn.execute(sql)
        if rows is not None:
            conn.execute("DELETE FROM reward_ledger")
            columns = list(rows[0])
            conn.executemany(
                f"INSERT INTO reward_ledger ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' * len(columns))})",
                [[row[c] for c in columns] for row in rows],
            )
        conn.commit()
    finally:
        conn.close()
