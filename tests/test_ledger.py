"""The hash-chained reward ledger: recording, idempotency, tamper detection and `ledger verify`."""

from __future__ import annotations

import math
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from ledger_helpers import (
    CONTRIBUTIONS,
    EPSILONS,
    FORGED_ROW,
    POLICY,
    RUN,
    play,
    record_run,
    tamper,
)

from fl_server.cli import main
from fl_server.rewards.allocation import RewardBook
from fl_server.rewards.ledger import (
    GENESIS,
    TABLE,
    LedgerFileError,
    LedgerRow,
    RewardLedger,
    canonical_json,
    entry_hash,
    read_entries,
    round_rows,
    verify_ledger,
)


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, RewardLedger, RewardBook]:
    """A ledger of 3 rounds: seq 1-2 (round 1), 3-5 (round 2), 6-8 (round 3)."""
    return record_run(tmp_path)


def _raw_rows(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM reward_ledger ORDER BY seq")]
    finally:
        conn.close()


def _rehash(path: Path, seq: int, **changes: Any) -> None:
    """Edit entry ``seq`` and store the hash its new fields give (a careful forger)."""
    row = next(r for r in _raw_rows(path) if r["seq"] == seq)
    row.update(changes)
    sets = ", ".join(f"{name} = ?" for name in [*changes, "hash"])
    conn = sqlite3.connect(path)
    try:
        conn.execute("DROP TRIGGER reward_ledger_no_update")
        conn.execute(
            f"UPDATE reward_ledger SET {sets} WHERE seq = ?",
            [*changes.values(), entry_hash(row), seq],
        )
        conn.commit()
    finally:
        conn.close()


# ----------------------------------------------------------------------------- recording


def test_recorded_chain_verifies(recorded) -> None:
    path, ledger, book = recorded
    entries = ledger.entries()
    assert [e.seq for e in entries] == list(range(1, 9))
    assert [(e.round, e.factory_id) for e in entries[:5]] == [
        (1, "f1"),
        (1, "f2"),
        (2, "f1"),
        (2, "f2"),
        (2, "f3"),
    ]
    assert entries[0].prev_hash == GENESIS
    assert all(e.prev_hash == p.hash for p, e in zip(entries, entries[1:], strict=False))
    assert all(e.recomputed_hash() == e.hash for e in entries)
    assert ledger.head() == entries[-1].hash
    assert ledger.rounds(RUN) == {1, 2, 3} and ledger.rounds("other") == set()
    last = {e.factory_id: e for e in entries if e.round == 3}
    assert {f: e.cumulative_payout for f, e in last.items()} == book.cumulative_payout
    assert {e.carry for e in entries} == {book.carry} == {0}
    assert last["f1"].score == 0.0 and last["f1"].epsilon is None  # absent in round 3
    assert last["f2"].epsilon == 1.2
    assert [e.round for e in ledger.entries(factory_id="f3")] == [2, 3]
    assert read_entries(path, run_id=RUN, factory_id="f2") == ledger.entries(RUN, "f2")

    result = verify_ledger(path)
    assert (result.ok, result.entries, result.head) == (True, 8, ledger.head())
    assert result.problem is None and result.seq is None
    assert verify_ledger(path, expected_head=ledger.head()).ok


#: A version-1 entry's hashed fields, and the hash every version of the ledger gives them.
PINNED_VALUES = {
    "seq": 1,
    "run_id": "run-1",
    "round": 1,
    "factory_id": "f1",
    "score": 0.1,
    "cumulative_score": -0.0,  # stored by SQLite as 0: normalized before hashing
    "payout": 5,
    "cumulative_payout": 5,
    "epsilon": None,
    "carry": 0,
    "prev_hash": GENESIS,
}
PINNED_HASH = "f3324df0f25654b250815223303d6e7dfbad5c8fc304979f8b3d9687f945665e"


def test_hash_encoding_is_pinned() -> None:
    """Changing the canonical encoding would orphan every existing ledger."""
    values = dict(PINNED_VALUES)
    assert canonical_json(values).startswith('{"carry":0,"cumulative_payout":5,')
    assert '"score":"0.1"' in canonical_json(values)
    assert entry_hash(values) == PINNED_HASH


def test_awkward_floats_survive_storage(tmp_path: Path) -> None:
    ledger = RewardLedger(tmp_path / "l.db")
    values = [0.1, 1 / 3, 1e-300, 5e-324, 1e300, 2.0**60, -0.0, -7.25]
    rows = [LedgerRow(f"f{i}", v, v, 0, 0, 0, epsilon=abs(v)) for i, v in enumerate(values)]
    written = ledger.record_round(RUN, 1, rows)
    assert ledger.entries() == written
    assert [e.score for e in written] == [v + 0.0 for v in values]
    assert verify_ledger(ledger.path).ok


def test_recording_a_round_again_writes_nothing(recorded) -> None:
    path, ledger, book = recorded
    before, head = ledger.entries(), ledger.head()
    # A restarted server settles round 2 again, possibly differently: the stored truth wins.
    forged = [dict(FORGED_ROW, payout=999, cumulative_payout=999)]
    again = RewardLedger(path).record_round(RUN, 2, forged)
    assert again == before[2:5]
    assert ledger.entries() == before and ledger.head() == head
    assert ledger.record_round(RUN, 4, []) == []  # nothing to record, nothing written
    assert len(ledger.entries()) == 8


def test_a_restarted_server_continues_exactly(recorded) -> None:
    path, ledger, book = recorded
    restored = RewardBook.restore(POLICY, RewardLedger(path).entries(run_id=RUN))
    assert restored.cumulative_contribution == book.cumulative_contribution
    assert restored.cumulative_payout == book.cumulative_payout
    assert (restored.carry, restored.last_round) == (book.carry, book.last_round)
    nxt = [({"f1": 2.0}, {"f1": 1.5})]
    play(ledger, RUN, nxt, book=restored)
    live = play(
        RewardLedger(path.with_name("copy.db")), RUN, [*zip(CONTRIBUTIONS, EPSILONS, strict=True)]
    )
    live.settle(4, nxt[0][0])
    assert restored.cumulative_payout == live.cumulative_payout
    assert sum(restored.cumulative_payout.values()) + restored.carry == POLICY.amount
    assert verify_ledger(path).ok


def test_unique_constraint_and_guards(recorded) -> None:
    path, ledger, _ = recorded
    conn = sqlite3.connect(path)
    try:
        row = _raw_rows(path)[0]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            forged = {**row, "seq": 99, "hash": "f" * 64}
            conn.execute(
                f"INSERT INTO reward_ledger ({', '.join(forged)}) "
                f"VALUES ({', '.join('?' * len(forged))})",
                list(forged.values()),
            )
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE reward_ledger SET payout = 1 WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM reward_ledger WHERE seq = 8")
    finally:
        conn.close()
    public = [name for name in dir(RewardLedger) if not name.startswith("_")]
    assert sorted(public) == ["entries", "head", "path", "record_round", "rounds"]


def test_invalid_rounds_are_refused(recorded, tmp_path: Path) -> None:
    _, ledger, _ = recorded
    row = dict(FORGED_ROW)
    with pytest.raises(ValueError, match="twice"):
        ledger.record_round("run-2", 1, [row, row])
    with pytest.raises(ValueError, match="carry"):
        ledger.record_round("run-2", 1, [row, {**row, "factory_id": "f2", "carry": 3}])
    ledger.record_round("run-2", 5, [row])
    with pytest.raises(ValueError, match="too late"):
        ledger.record_round("run-2", 4, [row])
    with pytest.raises(ValueError, match="NaN"):
        LedgerRow("f1", math.nan, 0.0, 0, 0, 0)
    with pytest.raises(ValueError, match="payout"):
        LedgerRow("f1", 0.0, 0.0, -1, 0, 0)
    with pytest.raises(ValueError, match="run_id"):
        ledger.record_round("", 1, [row])


def test_record_round_1_again_is_idempotent_not_too_late(recorded) -> None:
    _, ledger, _ = recorded
    stored = ledger.entries(run_id=RUN)[:2]
    assert ledger.record_round(RUN, 1, [dict(FORGED_ROW, factory_id="new")]) == stored


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    RewardLedger(path)
    errors: list[BaseException] = []

    def writer(run_id: str) -> None:
        try:
            ledger = RewardLedger(path)
            rounds = [({"a": 1.0, "b": 0.5, "c": 0.1}, {})] * 4
            play(ledger, run_id, rounds)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"run-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    result = verify_ledger(path)
    assert result.ok and result.entries == 4 * 4 * 3


def test_files_that_are_not_ledgers(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(LedgerFileError, match="no such ledger file") as info:
        verify_ledger(missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()  # verifying never creates a file
    text = tmp_path / "notes.txt"
    text.write_text("not a database " * 100)
    with pytest.raises(LedgerFileError, match="not an SQLite database"):
        verify_ledger(text)
    with pytest.raises(LedgerFileError):
        RewardLedger(text)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE experiments (id INTEGER)")
    with pytest.raises(LedgerFileError, match="not a factoryfed reward ledger"):
        verify_ledger(other)
    with pytest.raises(LedgerFileError, match="not a factoryfed reward ledger"):
        RewardLedger(other)


# ----------------------------------------------------------------------------- tampering


def _problem(path: Path, expected_head: str | None = None) -> tuple[str | None, int | None]:
    result = verify_ledger(path, expected_head)
    assert result.ok is (result.kind is None)
    return result.kind, result.seq


def test_edited_payout_is_found_at_its_seq(recorded) -> None:
    path, _, _ = recorded
    tamper(path, "UPDATE reward_ledger SET payout = payout + 100 WHERE seq = 4")
    assert _problem(path) == ("edited", 4)


def test_edited_field_of_the_wrong_type_is_found(recorded) -> None:
    path, _, _ = recorded
    tamper(path, "UPDATE reward_ledger SET payout = 'lots' WHERE seq = 2")
    assert _problem(path) == ("edited", 2)


def test_edit_with_recomputed_hash_is_found_through_the_next_link(recorded) -> None:
    path, _, _ = recorded
    _rehash(path, 4, payout=5000, cumulative_payout=5000)
    result = verify_ledger(path)
    assert (result.kind, result.seq) == ("edited", 4)
    assert "hash recomputed" in result.problem and "seq=5" in result.problem


def test_rehashed_edit_of_the_last_entry_needs_the_external_head(recorded) -> None:
    path, ledger, _ = recorded
    head = ledger.head()
    _rehash(path, 8, payout=5000)
    assert verify_ledger(path).ok  # a valid chain on its own...
    assert _problem(path, expected_head=head) == ("head-mismatch", 8)  # ...but not the one quoted


@pytest.mark.parametrize(("seqs", "first_missing"), [((4,), 4), ((1,), 1), ((4, 5), 4)])
def test_deleted_entries_are_found(recorded, seqs: tuple[int, ...], first_missing: int) -> None:
    path, _, _ = recorded
    tamper(path, f"DELETE FROM reward_ledger WHERE seq IN ({', '.join(map(str, seqs))})")
    result = verify_ledger(path)
    assert (result.kind, result.seq) == ("deleted", first_missing)
    assert f"seq={first_missing}" in result.problem


@pytest.mark.parametrize("position", [4, 1])
def test_forged_inserted_entry_is_found(recorded, position: int) -> None:
    path, _, _ = recorded
    rows = _raw_rows(path)
    before = rows[position - 2]["hash"] if position > 1 else GENESIS
    forged = {**rows[position - 1], "seq": position, "factory_id": "f9", "payout": 999}
    forged["prev_hash"] = before
    forged["hash"] = entry_hash(forged)
    # Everything from ``position`` on moves one seq up to make room (their stored hashes stay).
    shifted = [{**r, "seq": r["seq"] + 1} for r in rows[position - 1 :]]
    tamper(path, rows=[*rows[: position - 1], forged, *shifted])
    result = verify_ledger(path)
    assert (result.kind, result.seq) == ("inserted", position)
    assert result.entries == 9


@pytest.mark.parametrize(("a", "b"), [(3, 5), (4, 5), (1, 2)])
def test_swapped_entries_are_reordered(recorded, a: int, b: int) -> None:
    path, _, _ = recorded
    tamper(
        path,
        f"UPDATE reward_ledger SET seq = 1000 WHERE seq = {a}",
        f"UPDATE reward_ledger SET seq = {a} WHERE seq = {b}",
        f"UPDATE reward_ledger SET seq = {b} WHERE seq = 1000",
    )
    result = verify_ledger(path)
    assert (result.kind, result.seq) == ("reordered", a)
    # The moved entry still links to the entry that preceded it originally (now at seq b if
    # that entry was swapped too).
    target = b if b - 1 == a else b - 1
    assert f"links to entry seq={target} instead of" in result.problem


def test_deleted_last_entry_is_only_found_against_the_kept_head(recorded) -> None:
    path, ledger, _ = recorded
    head = ledger.head()
    tamper(path, "DELETE FROM reward_ledger WHERE seq = 8")
    result = verify_ledger(path)
    assert result.ok and result.entries == 7 and result.head != head
    missing = verify_ledger(path, expected_head=head)
    assert (missing.ok, missing.kind, missing.seq) == (False, "head-mismatch", 7)
    assert head in missing.problem


def test_an_older_head_means_entries_were_appended(recorded) -> None:
    path, ledger, _ = recorded
    round_2_head = ledger.entries()[4].hash
    result = verify_ledger(path, expected_head=round_2_head)
    assert (result.ok, result.kind, result.seq) == (False, "head-mismatch", 6)
    assert "continues" in result.problem


# ----------------------------------------------------------------------------- CLI


def test_cli_verify_exit_codes(recorded, tmp_path: Path, capsys) -> None:
    path, ledger, _ = recorded
    head = ledger.head()
    assert main(["ledger", "verify", str(path)]) == 0
    assert capsys.readouterr().out == f"OK: 8 entries, head {head}\n"
    assert main(["ledger", "verify", str(path), "--head", head]) == 0
    capsys.readouterr()
    assert main(["ledger", "verify", str(path), "--head", "ab" * 32]) == 1
    assert capsys.readouterr().err.startswith("TAMPERED: entry seq=8 head-mismatch: ")

    tamper(path, "UPDATE reward_ledger SET score = 42.0 WHERE seq = 4")
    assert main(["ledger", "verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("TAMPERED: entry seq=4 edited: ")

    missing = tmp_path / "missing.db"
    assert main(["ledger", "verify", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00garbage" * 200)
    assert main(["ledger", "verify", str(junk)]) == 2
    assert str(junk) in capsys.readouterr().err


# -- the guards' flags -------------------------------------------------------------------------
def _flagged_run(path: Path) -> RewardLedger:
    """Two rounds: f3 withheld in both, f1 and f2 scored as one duplicate group in round 2."""
    ledger = RewardLedger(path)
    book = RewardBook(POLICY)
    rounds = [
        ({"f1": 1.0, "f2": 0.5, "f3": 0.25}, (), ()),
        ({"f1": 0.5, "f2": 0.5, "f3": 0.25}, ("f3",), (("f1", "f2"),)),
    ]
    for server_round, (scores, withheld, groups) in enumerate(rounds, start=1):
        payouts = book.settle(server_round, scores, withheld)
        rows = round_rows(book, scores, payouts, None, withheld, groups)
        ledger.record_round(RUN, server_round, rows)
        assert ledger.record_round(RUN, server_round, rows) == ledger.entries(run_id=RUN)[
            -3:
        ]  # idempotent, flags included
    return ledger


def test_guard_flags_are_stored_hashed_and_verified(tmp_path: Path) -> None:
    ledger = _flagged_run(tmp_path / "l.db")
    entries = ledger.entries(run_id=RUN)
    last = {e.factory_id: e for e in entries if e.round == 2}
    assert last["f3"].withheld and last["f3"].payout == 0
    assert (last["f1"].duplicate_group, last["f2"].duplicate_group) == ("f1,f2", "f1,f2")
    assert not last["f1"].withheld and last["f3"].duplicate_group == ""
    assert sum(e.payout for e in entries) + last["f1"].carry == POLICY.released(2)
    assert verify_ledger(ledger.path, expected_head=ledger.head()).ok
    # Flags are part of the hash: clearing one is found at its entry.
    tamper(ledger.path, f"UPDATE {TABLE} SET withheld = 0 WHERE seq = {last['f3'].seq}")
    result = verify_ledger(ledger.path)
    assert (result.ok, result.kind, result.seq) == (False, "edited", last["f3"].seq)


def test_unflagged_entries_hash_as_in_version_1() -> None:
    values, pinned = dict(PINNED_VALUES), PINNED_HASH
    assert entry_hash({**values, "withheld": False, "duplicate_group": ""}) == pinned
    assert entry_hash({**values, "withheld": True}) != pinned
    assert entry_hash({**values, "duplicate_group": "f1,f2"}) != pinned
    with pytest.raises(TypeError, match="withheld"):
        entry_hash({**values, "withheld": 2})


def test_a_withheld_row_cannot_be_paid() -> None:
    with pytest.raises(ValueError, match="withheld but paid"):
        LedgerRow("f1", 1.0, 1.0, 3, 3, 0, withheld=True)


def test_a_version_1_ledger_is_read_verified_and_upgraded(recorded) -> None:
    path, ledger, book = recorded
    head = ledger.head()
    # Turn the file into what version 1 wrote: no flag columns.
    conn = sqlite3.connect(path)
    conn.executescript(
        f"""DROP TRIGGER {TABLE}_no_update; DROP TRIGGER {TABLE}_no_delete;
        ALTER TABLE {TABLE} DROP COLUMN withheld; ALTER TABLE {TABLE} DROP COLUMN duplicate_group;
        UPDATE ledger_meta SET value = '1' WHERE key = 'version';"""
    )
    conn.close()
    old = read_entries(path)
    assert len(old) == 8 and not any(e.withheld or e.duplicate_group for e in old)
    assert verify_ledger(path, expected_head=head).ok
    upgraded = RewardLedger(path)  # opened for writing: the columns are added
    play(upgraded, RUN, [({"f1": 0.5}, {})], book)
    assert len(upgraded.entries()) == 11 and verify_ledger(path).ok
