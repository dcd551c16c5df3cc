"""The reward ledger: an append-only, hash-chained record of what each factory was paid.

One SQLite table holds one entry per factory per settled round. Every entry carries a
``seq`` number (1, 2, 3, ...) and the SHA-256 ``hash`` of a canonical JSON encoding of all its
other fields, including ``prev_hash``, the hash of the entry before it (64 zeros for the first).
Changing, removing, inserting or reordering entries therefore breaks the chain, and
:func:`verify_ledger` names the first break. An entry also says why a factory was paid less
than its score alone would give: ``withheld`` (its contribution was not yet distinguishable
from noise, so it took no part in the round's split) and ``duplicate_group`` (the factories,
itself included, scored as one player because their updates were copies). Both are hashed when
set; an entry without them hashes exactly as in format version 1, so older ledgers still
verify (and are upgraded in place, by adding the two columns, when written to again).
Factories can be handed a statement of their own entries (:mod:`fl_server.rewards.statements`)
that quotes the chain's head, so both sides can later check that the ledger still ends where it
did.

What the chain cannot show on its own: removing the *last* entries leaves a valid, shorter
chain; forged entries appended at the end look like new rounds; and someone with write access
can rebuild the whole chain from the point of a change onwards (SHA-256 is not a signature, no
secret is involved). These are caught only against a head hash kept outside the file
(``expected_head``), e.g. quoted in a factory's statement or logged after each round.

Writes go through :class:`RewardLedger` only, which appends and never updates or deletes (the
table also has triggers refusing UPDATE and DELETE, a guard against mistakes rather than a
security boundary). Recording a round is idempotent, so a restarted server can never pay a
round twice. Standard library only (``sqlite3``).

One job, the hash chain, from the canonical encoding an entry is hashed over through appending
to naming the first break; its size is mostly :func:`check_chain`'s classification of breaks.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_server.rewards.allocation import check_int

if TYPE_CHECKING:
    from fl_server.rewards.allocation import RewardBook

GENESIS = "0" * 64
FORMAT = "factoryfed-reward-ledger"
FORMAT_VERSION = "2"
#: Versions this code reads; a version-1 file is upgraded to 2 (two columns added) on write.
READABLE_VERSIONS = ("1", "2")
TABLE = "reward_ledger"
META_TABLE = "ledger_meta"

# Fields covered by an entry's hash, i.e. every stored field except the hash itself.
HASHED_FIELDS = (
    "seq",
    "run_id",
    "round",
    "factory_id",
    "score",
    "cumulative_score",
    "payout",
    "cumulative_payout",
    "epsilon",
    "carry",
    "prev_hash",
)
#: Hashed only when set (not False / not ""), so entries without them hash as in version 1.
OPTIONAL_HASHED_FIELDS = ("withheld", "duplicate_group")
_FLOAT_FIELDS = frozenset({"score", "cumulative_score", "epsilon"})
_INT_FIELDS = frozenset({"seq", "round", "payout", "cumulative_payout", "carry"})
_STR_FIELDS = frozenset({"run_id", "factory_id", "prev_hash"})

#: What turns a version-1 table into a version-2 one.
_UPGRADE = (
    f"ALTER TABLE {TABLE} ADD COLUMN withheld INTEGER NOT NULL DEFAULT 0 "
    "CHECK (withheld IN (0, 1))",
    f"ALTER TABLE {TABLE} ADD COLUMN duplicate_group TEXT NOT NULL DEFAULT ''",
)

_SCHEMA = (
    f"CREATE TABLE {META_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"""CREATE TABLE {TABLE} (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        run_id TEXT NOT NULL,
        round INTEGER NOT NULL CHECK (round >= 1),
        factory_id TEXT NOT NULL,
        score REAL NOT NULL,
        cumulative_score REAL NOT NULL,
        payout INTEGER NOT NULL CHECK (payout >= 0),
        cumulative_payout INTEGER NOT NULL CHECK (cumulative_payout >= 0),
        epsilon REAL,
        carry INTEGER NOT NULL CHECK (carry >= 0),
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        withheld INTEGER NOT NULL DEFAULT 0 CHECK (withheld IN (0, 1)),
        duplicate_group TEXT NOT NULL DEFAULT '',
        UNIQUE (run_id, round, factory_id)
    )""",
    f"""CREATE TRIGGER {TABLE}_no_update BEFORE UPDATE ON {TABLE}
    BEGIN SELECT RAISE(ABORT, 'the reward ledger is append-only'); END""",
    f"""CREATE TRIGGER {TABLE}_no_delete BEFORE DELETE ON {TABLE}
    BEGIN SELECT RAISE(ABORT, 'the reward ledger is append-only'); END""",
)


class LedgerFileError(RuntimeError):
    """The ledger file is missing, unreadable, or not a factoryfed reward ledger.

    Raised instead of a verification result: a file that cannot be read says nothing about
    tampering, and callers (the CLI) report it differently (exit code 2 rather than 1).
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


# ----------------------------------------------------------------------------- entries


def _plain_float(value: Any) -> float:
    """``value`` as a float that SQLite stores and returns unchanged (no NaN, no -0.0).

    SQLite turns NaN into NULL and may store integral REALs as integers, which loses the sign
    of -0.0; normalizing first keeps the hash of a stored entry reproducible.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError("NaN cannot be stored in the ledger")
    return number + 0.0


def canonical_json(values: Mapping[str, Any]) -> str:
    """The canonical text an entry's hash is computed over.

    Keys sorted, no whitespace, ASCII only; floats written as ``repr`` strings (the shortest
    text that round-trips), so the hash does not depend on a JSON library's float formatting.
    :data:`OPTIONAL_HASHED_FIELDS` are written only when set (missing means unset).

    Raises:
        TypeError, ValueError: a field is missing or has the wrong type (e.g. after tampering).
    """
    doc: dict[str, Any] = {}
    for name in HASHED_FIELDS:
        value = values[name]
        if name in _FLOAT_FIELDS:
            doc[name] = None if value is None and name == "epsilon" else repr(_plain_float(value))
        elif name in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            doc[name] = int(value)
        else:
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {value!r}")
            doc[name] = value
    withheld = values.get("withheld", False)
    if withheld not in (0, 1) or isinstance(withheld, float):
        raise TypeError(f"withheld must be true or false, got {withheld!r}")
    if withheld:
        doc["withheld"] = True
    group = values.get("duplicate_group", "")
    if not isinstance(group, str):
        raise TypeError(f"duplicate_group must be a string, got {group!r}")
    if group:
        doc["duplicate_group"] = group
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_hash(values: Mapping[str, Any]) -> str:
    """Hex SHA-256 of :func:`canonical_json` of ``values`` (all of :data:`HASHED_FIELDS`)."""
    return hashlib.sha256(canonical_json(values).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class LedgerRow:
    """What the caller records for one factory in one round (the ledger adds the rest).

    Attributes:
        factory_id: the factory.
        score: its contribution this round (0.0 if it did not take part).
        cumulative_score: its contribution summed over the run so far.
        payout: minor units paid to it this round.
        cumulative_payout: minor units paid to it in the run so far.
        carry: the round's unallocated pool after this round (the same for every row).
        epsilon: its differential-privacy spend so far as it reported it, if known.
        withheld: its pay was withheld this round (contribution not distinguishable from noise).
        duplicate_group: the ids (comma-separated, sorted, itself included) of the duplicate
            group it was scored in this round as one player; empty when none.
    """

    factory_id: str
    score: float
    cumulative_score: float
    payout: int
    cumulative_payout: int
    carry: int
    epsilon: float | None = None
    withheld: bool = False
    duplicate_group: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.factory_id, str) or not self.factory_id:
            raise ValueError(f"factory_id must be a non-empty string, got {self.factory_id!r}")
        for name in ("score", "cumulative_score"):
            value = _plain_float(getattr(self, name))
            if math.isinf(value):
                raise ValueError(f"{name} of factory {self.factory_id!r} must be finite")
            object.__setattr__(self, name, value)
        for name in ("payout", "cumulative_payout", "carry"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 0))
        if self.epsilon is not None:
            epsilon = _plain_float(self.epsilon)
            if epsilon < 0:
                raise ValueError(f"epsilon of factory {self.factory_id!r} must be >= 0")
            object.__setattr__(self, "epsilon", epsilon)
        if not isinstance(self.withheld, bool):
            raise ValueError(f"withheld of factory {self.factory_id!r} must be true or false")
        if not isinstance(self.duplicate_group, str):
            raise ValueError(f"duplicate_group of factory {self.factory_id!r} must be a string")
        if self.withheld and self.payout:
            raise ValueError(f"factory {self.factory_id!r} is withheld but paid {self.payout}")

    @classmethod
    def coerce(cls, row: LedgerRow | Mapping[str, Any]) -> LedgerRow:
        """``row`` itself, or a :class:`LedgerRow` built from a mapping of its fields."""
        if isinstance(row, LedgerRow):
            return row
        return cls(**dict(row))


@dataclass(frozen=True)
class LedgerEntry:
    """One stored ledger entry, exactly as read from the file."""

    seq: int
    run_id: str
    round: int
    factory_id: str
    score: float
    cumulative_score: float
    payout: int
    cumulative_payout: int
    epsilon: float | None
    carry: int
    prev_hash: str
    hash: str
    withheld: bool = False
    duplicate_group: str = ""

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return asdict(self)

    def recomputed_hash(self) -> str:
        """The hash this entry's fields should have."""
        return entry_hash(self.to_dict())


_ENTRY_COLUMNS = tuple(f.name for f in fields(LedgerEntry))
_ROW_FIELDS = tuple(f.name for f in fields(LedgerRow))


def round_rows(
    book: RewardBook,
    contributions: Mapping[str, float],
    payouts: Mapping[str, int],
    epsilons: Mapping[str, float] | None = None,
    withheld: Iterable[str] = (),
    groups: Iterable[Iterable[str]] = (),
) -> list[LedgerRow]:
    """The ledger rows of the round ``book`` has just settled.

    ``contributions``, ``payouts`` and ``withheld`` are that round's input to and result of
    :meth:`~fl_server.rewards.allocation.RewardBook.settle`; ``epsilons`` the privacy spend
    factories reported (absent factories get ``None``); ``groups`` the duplicate groups scored
    as one player in the round.
    """
    epsilons = epsilons or {}
    held = set(withheld)
    group_of = {m: ",".join(sorted(g)) for g in map(list, groups) for m in g}
    cumulative = book.cumulative_contribution
    paid = book.cumulative_payout
    return [
        LedgerRow(
            factory_id=factory,
            score=float(contributions.get(factory, 0.0)),
            cumulative_score=cumulative[factory],
            payout=int(payouts[factory]),
            cumulative_payout=paid[factory],
            carry=book.carry,
            epsilon=None if epsilons.get(factory) is None else float(epsilons[factory]),
            withheld=factory in held,
            duplicate_group=group_of.get(factory, ""),
        )
        for factory in sorted(payouts)
    ]


# ----------------------------------------------------------------------------- the file


def _open(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), rows as ``sqlite3.Row``."""
    try:
        if readonly:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30.0, isolation_level=None
            )
        else:
            conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerFileError(path, f"cannot open the ledger: {exc}") from exc
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def _connection(path: Path, *, readonly: bool) -> Iterator[sqlite3.Connection]:
    conn = _open(path, readonly=readonly)
    try:
        yield conn
    finally:
        conn.close()


def _tables(conn: sqlite3.Connection, path: Path) -> set[str]:
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError as exc:
        raise LedgerFileError(path, f"not an SQLite database ({exc})") from exc
    return {row[0] for row in rows}


def _check_ledger(conn: sqlite3.Connection, path: Path) -> str:
    """The ledger's format version; raises :class:`LedgerFileError` unless ``conn`` is a
    reward ledger of a readable version."""
    tables = _tables(conn, path)
    if not {TABLE, META_TABLE} <= tables:
        raise LedgerFileError(path, "not a factoryfed reward ledger (its tables are missing)")
    meta = dict(conn.execute(f"SELECT key, value FROM {META_TABLE}").fetchall())
    if meta.get("format") != FORMAT:
        raise LedgerFileError(path, "not a factoryfed reward ledger (unknown format)")
    if meta.get("version") not in READABLE_VERSIONS:
        raise LedgerFileError(
            path, f"reward ledger version {meta.get('version')!r} is not supported"
        )
    return str(meta["version"])


_DEFAULTS = {"withheld": 0, "duplicate_group": ""}


def _entry(row: sqlite3.Row | Mapping[str, Any]) -> LedgerEntry:
    keys = row.keys()
    values = {name: row[name] if name in keys else _DEFAULTS[name] for name in _ENTRY_COLUMNS}
    values["withheld"] = bool(values["withheld"])
    return LedgerEntry(**values)


def _columns(conn: sqlite3.Connection) -> tuple[str, ...]:
    """The entry columns this file's table has (a version-1 table lacks the newer ones)."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({TABLE})")}
    return tuple(c for c in _ENTRY_COLUMNS if c in have)


def _select(
    conn: sqlite3.Connection, run_id: str | None = None, factory_id: str | None = None
) -> list[LedgerEntry]:
    where, params = [], []
    if run_id is not None:
        where.append("run_id = ?")
        params.append(run_id)
    if factory_id is not None:
        where.append("factory_id = ?")
        params.append(factory_id)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT {', '.join(_columns(conn))} FROM {TABLE}{clause} ORDER BY seq"
    return [_entry(row) for row in conn.execute(sql, params)]


def read_entries(
    path: str | Path, run_id: str | None = None, factory_id: str | None = None
) -> list[LedgerEntry]:
    """The entries of an existing ledger file, in ``seq`` order, opened read-only.

    Raises:
        LedgerFileError: the file is missing or not a reward ledger.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerFileError(path, "no such ledger file")
    with _connection(path, readonly=True) as conn:
        _check_ledger(conn, path)
        return _select(conn, run_id, factory_id)


class RewardLedger:
    """Append-only access to a reward ledger file; creates it (and its folders) if missing.

    There are deliberately no methods that change or remove entries.

    Raises:
        LedgerFileError: ``path`` exists but is not a reward ledger (e.g. another database).
    """

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerFileError(self._path, f"cannot create its folder: {exc}") from exc
        with self._transaction() as conn:
            if not _tables(conn, self._path):
                for statement in _SCHEMA:  # not executescript: it would commit early
                    conn.execute(statement)
                conn.executemany(
                    f"INSERT INTO {META_TABLE} (key, value) VALUES (?, ?)",
                    [("format", FORMAT), ("version", FORMAT_VERSION)],
                )
            if _check_ledger(conn, self._path) != FORMAT_VERSION:
                for statement in _UPGRADE:
                    conn.execute(statement)
                conn.execute(
                    f"UPDATE {META_TABLE} SET value = ? WHERE key = 'version'", (FORMAT_VERSION,)
                )

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front, so two
        writers never read the same head and append interleaved entries."""
        with _connection(self._path, readonly=False) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise LedgerFileError(self._path, f"cannot write the ledger: {exc}") from exc
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def record_round(
        self,
        run_id: str,
        server_round: int,
        rows: Sequence[LedgerRow | Mapping[str, Any]],
    ) -> list[LedgerEntry]:
        """Append one entry per factory for round ``server_round`` of ``run_id``.

        All entries of the round are written in one transaction, sorted by factory id. If the
        round is already recorded nothing is written and the stored entries are returned, so a
        restarted server that settles a round again cannot pay it twice (the stored entries are
        the truth; a UNIQUE (run_id, round, factory_id) constraint backs this up). An empty
        ``rows`` (no factory known yet) writes nothing and returns ``[]``.

        Raises:
            ValueError: invalid arguments, a factory twice in ``rows``, rows that disagree on
                the carry, or a round older than the run's latest recorded round.
        """
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        check_int("server_round", server_round, 1)
        ordered = sorted((LedgerRow.coerce(row) for row in rows), key=lambda r: r.factory_id)
        ids = [row.factory_id for row in ordered]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a factory appears twice in round {server_round}: {ids}")
        if len({row.carry for row in ordered}) > 1:
            raise ValueError(f"the rows of round {server_round} disagree on the carry")
        with self._transaction() as conn:
            existing = conn.execute(
                f"SELECT {', '.join(_ENTRY_COLUMNS)} FROM {TABLE} "
                "WHERE run_id = ? AND round = ? ORDER BY seq",
                (run_id, server_round),
            ).fetchall()
            if existing:
                return [_entry(row) for row in existing]
            if not ordered:
                return []
            (latest,) = conn.execute(
                f"SELECT MAX(round) FROM {TABLE} WHERE run_id = ?", (run_id,)
            ).fetchone()
            if latest is not None and latest > server_round:
                raise ValueError(
                    f"run {run_id!r} is already recorded up to round {latest}; "
                    f"round {server_round} comes too late"
                )
            last = conn.execute(f"SELECT seq, hash FROM {TABLE} ORDER BY seq DESC LIMIT 1")
            head = last.fetchone()
            seq, prev_hash = (head["seq"] + 1, head["hash"]) if head else (1, GENESIS)
            written = []
            for row in ordered:
                values = {
                    "seq": seq,
                    "run_id": run_id,
                    "round": server_round,
                    **{name: getattr(row, name) for name in _ROW_FIELDS},
                    "prev_hash": prev_hash,
                }
                entry = LedgerEntry(**values, hash=entry_hash(values))
                conn.execute(
                    f"INSERT INTO {TABLE} ({', '.join(_ENTRY_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_ENTRY_COLUMNS))})",
                    [getattr(entry, name) for name in _ENTRY_COLUMNS],
                )
                written.append(entry)
                seq, prev_hash = seq + 1, entry.hash
            return written

    def entries(
        self, run_id: str | None = None, factory_id: str | None = None
    ) -> list[LedgerEntry]:
        """Stored entries in ``seq`` order, optionally of one run and/or one factory."""
        with _connection(self._path, readonly=True) as conn:
            return _select(conn, run_id, factory_id)

    def head(self) -> str:
        """Hash of the last entry, or :data:`GENESIS` for an empty ledger."""
        with _connection(self._path, readonly=True) as conn:
            row = conn.execute(f"SELECT hash FROM {TABLE} ORDER BY seq DESC LIMIT 1").fetchone()
        return row[0] if row else GENESIS

    def rounds(self, run_id: str) -> set[int]:
        """The rounds of ``run_id`` that are recorded."""
        with _connection(self._path, readonly=True) as conn:
            rows = conn.execute(f"SELECT DISTINCT round FROM {TABLE} WHERE run_id = ?", (run_id,))
            return {row[0] for row in rows}


# ----------------------------------------------------------------------------- verification

EDITED = "edited"
DELETED = "deleted"
INSERTED = "inserted"
REORDERED = "reordered"
HEAD_MISMATCH = "head-mismatch"


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking a ledger's chain.

    Attributes:
        ok: the chain is intact (and ends at the expected head, if one was given).
        entries: number of entries in the file.
        head: hash of the file's last entry (:data:`GENESIS` when empty), intact or not.
        problem: what is wrong with the first broken entry, ``None`` when ``ok``.
        seq: the ``seq`` the problem is located at (for deletions: the first missing one).
        kind: ``edited``, ``deleted``, ``inserted``, ``reordered`` or ``head-mismatch``.
    """

    ok: bool
    entries: int
    head: str
    problem: str | None = None
    seq: int | None = None
    kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (for JSON)."""
        return asdict(self)

    def describe(self) -> str:
        """One line: ``OK: N entries, head H`` or ``entry seq=K <kind>: <problem>``."""
        if self.ok:
            return f"OK: {self.entries} entries, head {self.head}"
        return f"entry seq={self.seq} {self.kind}: {self.problem}"


def _recompute(row: Mapping[str, Any]) -> str | None:
    try:
        return entry_hash(row)
    except (KeyError, TypeError, ValueError):
        return None  # a field of the wrong type can only come from tampering


#: The shortest head prefix accepted: 16 hex digits (64 bits) cannot match by accident.
MIN_HEAD_PREFIX = 16


def head_prefix(expected_head: str) -> str:
    """``expected_head`` normalised: a hex prefix of a head hash, at least 16 digits.

    A statement or a log line may quote a head shortened (``3f2a...``); any prefix of at least
    :data:`MIN_HEAD_PREFIX` hex digits names one entry with overwhelming probability.

    Raises:
        ValueError: not hex, or shorter than :data:`MIN_HEAD_PREFIX` digits (the message
            names the value and what is allowed).
    """
    wanted = expected_head.strip().lower().rstrip(".")
    if not wanted or any(c not in "0123456789abcdef" for c in wanted) or len(wanted) > 64:
        raise ValueError(f"expected head {expected_head!r} is not a hex hash (up to 64 hex digits)")
    if len(wanted) < MIN_HEAD_PREFIX:
        raise ValueError(
            f"expected head {expected_head!r} is too short: give at least {MIN_HEAD_PREFIX} "
            "hex digits of the head hash (all 64 are best)"
        )
    return wanted


def check_chain(
    rows: Sequence[Mapping[str, Any]], expected_head: str | None = None
) -> VerifyResult:
    """Verify stored entries (mappings of all columns, in ``seq`` order); pure logic.

    Walks the entries in ``seq`` order and stops at the first break. Links are examined before
    hashes because an insertion or reordering also invalidates the hashes of the entries that
    were renumbered; the link pattern says more about what happened:

    * ``inserted``: an entry links correctly to the one before it, but the next entry skips it
      and links to that earlier entry too (reported at the inserted entry);
    * ``reordered``: an entry links to an existing entry other than the one before it;
    * ``deleted``: ``seq`` jumps (reported at the first missing ``seq``);
    * ``edited``: an entry's stored hash does not match its fields, or an entry links to a hash
      that exists nowhere while ``seq`` is contiguous: the entry before it was edited and its
      hash recomputed (reported at that entry).

    The classification reads the first break the way a single change would cause it; several
    combined changes are always detected but may be named differently. A valid chain that is
    shorter or was rebuilt from some point on is only detected through ``expected_head``,
    which may be any prefix of at least 16 hex digits of the head (see :func:`head_prefix`).

    Raises:
        ValueError: ``expected_head`` is no hex prefix of at least 16 digits.
    """
    wanted = head_prefix(expected_head) if expected_head is not None else None
    positions: dict[str, int] = {}
    for index, row in enumerate(rows):
        positions.setdefault(row["hash"], index)
    head = rows[-1]["hash"] if rows else GENESIS

    def broken(kind: str, seq: int, problem: str) -> VerifyResult:
        return VerifyResult(False, len(rows), head, problem, seq, kind)

    previous: Mapping[str, Any] | None = None
    expected_prev, expected_seq = GENESIS, 1
    for row in rows:
        seq, link, stored = row["seq"], row["prev_hash"], row["hash"]
        valid = _recompute(row) == stored
        if link != expected_prev:
            if previous is not None and link == previous["prev_hash"]:
                return broken(
                    INSERTED,
                    previous["seq"],
                    f"entry seq={previous['seq']} links to the entry before it, but entry "
                    f"seq={seq} skips it and links to that earlier entry: it was inserted",
                )
            if link in positions:
                target = rows[positions[link]]["seq"]
                before = f"seq={previous['seq']}" if previous is not None else "the genesis"
                return broken(
                    REORDERED,
                    seq,
                    f"it links to entry seq={target} instead of the entry before it ({before})",
                )
            if seq != expected_seq:
                return broken(
                    DELETED,
                    expected_seq,
                    f"{_missing(expected_seq, seq)} missing: entry seq={seq} links to a hash "
                    "that is not in the ledger",
                )
            if not valid or previous is None:
                return broken(
                    EDITED,
                    seq,
                    f"its prev_hash {link[:16]}... links to no entry and its stored hash "
                    "does not match its fields",
                )
            return broken(
                EDITED,
                previous["seq"],
                f"its fields were changed and its hash recomputed: entry seq={seq} still "
                f"links to its original hash {link[:16]}...",
            )
        if seq != expected_seq:
            return broken(
                DELETED,
                expected_seq,
                f"{_missing(expected_seq, seq)} missing: the sequence jumps from "
                f"{expected_seq - 1} to {seq}",
            )
        if not valid:
            return broken(EDITED, seq, "its stored hash does not match its fields")
        previous, expected_prev, expected_seq = row, stored, seq + 1

    if wanted is not None and not head.startswith(wanted):
        last = rows[-1]["seq"] if rows else None
        matches = [h for h in positions if h.startswith(wanted)]
        if len(matches) == 1:
            at = rows[positions[matches[0]]]["seq"]
            return broken(
                HEAD_MISMATCH,
                at + 1,
                f"the expected head {wanted} is entry seq={at}, but the ledger continues "
                f"to seq={last} (head {head})",
            )
        return VerifyResult(
            False,
            len(rows),
            head,
            f"the ledger ends at head {head}, not at the expected head {wanted}: entries "
            "at its end were deleted, or the chain was rewritten",
            last,
            HEAD_MISMATCH,
        )
    return VerifyResult(True, len(rows), head)


def _missing(first: int, after_last: int) -> str:
    if after_last - first == 1:
        return f"entry seq={first} is"
    return f"entries seq={first}..{after_last - 1} are"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Every stored row as a dict of its columns, in ``seq`` order, read in one transaction."""
    if not path.is_file():
        raise LedgerFileError(path, "no such ledger file")
    with _connection(path, readonly=True) as conn:
        _check_ledger(conn, path)
        try:
            return [dict(row) for row in conn.execute(f"SELECT * FROM {TABLE} ORDER BY seq")]
        except sqlite3.DatabaseError as exc:
            raise LedgerFileError(path, f"cannot read the ledger: {exc}") from exc


def verify_ledger(path: str | Path, expected_head: str | None = None) -> VerifyResult:
    """Verify the hash chain of the ledger file at ``path`` (read-only; see :func:`check_chain`).

    Args:
        path: the ledger file.
        expected_head: a head hash kept outside the file; if given, the chain must end there,
            which is the only way to notice that entries were removed from its end.

    Raises:
        LedgerFileError: the file is missing, unreadable or not a reward ledger. Tampering is
            never raised; it is reported in the result.
    """
    return check_chain(_read_rows(Path(path)), expected_head)


def audit_ledger(
    path: str | Path, expected_head: str | None = None
) -> tuple[list[LedgerEntry], VerifyResult]:
    """All entries of the ledger at ``path`` and the verification of exactly those entries.

    One read, so a writer appending meanwhile cannot make the entries and the verified head
    disagree (as two separate calls to :func:`read_entries` and :func:`verify_ledger` could).

    Raises:
        LedgerFileError: as :func:`verify_ledger`.
    """
    rows = _read_rows(Path(path))
    entries = [_entry(row) for row in rows]
    return entries, check_chain(rows, expected_head)
