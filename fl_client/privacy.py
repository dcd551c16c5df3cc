"""Differential-privacy accounting for one factory: noise planning and the privacy ledger.

One job, the factory's own accounting, kept in one module so that planning and the ledger that
enforces the plan cannot drift apart. Each factory trains with DP-SGD (Opacus) on its own
records; the privacy unit is the one its task declares (``StandardTask.privacy_unit``: a
window of samples, a shot, an image, or a coarser unit the factory chose), histories count
those units, and the accounting happens on the factory's side, never on the server. The
numbers come from Opacus's accountants; what Opacus does not offer, and this module adds, is:

* planning a noise multiplier that respects a budget *after* earlier spend
  (:func:`plan_noise_multiplier`), and
* a durable ledger on the factory's disk (:class:`PrivacyLedger`) so that spend in earlier runs
  and in crashed rounds keeps counting, and the reported cumulative epsilon can never exceed the
  factory's budget.

A *history* is Opacus's accountant history: a list of ``(noise_multiplier, sample_rate, steps)``
entries. Consecutive entries with the same noise multiplier and sample rate are merged, exactly
as Opacus's own ``RDPAccountant.step`` does, so a run with a constant noise level is one entry
whose steps grow round by round and the epsilon reported after the last planned round is the
very number the plan was computed for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant
from opacus.accountants import utils as opacus_utils
from opacus.accountants.utils import MAX_SIGMA

from fl_common.accounting import noise_multiplier_for, rdp_epsilon, search_noise_multiplier
from fl_common.storage import atomic_write_json

try:  # advisory locking where the platform offers it (not on Windows)
    import fcntl
except ImportError:  # pragma: no cover - platform dependent
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LEDGER_FORMAT = "factoryfed-privacy-ledger"
LEDGER_VERSION = 1
ACCOUNTANTS = ("rdp", "prv", "gdp")
LEDGER_ACCOUNTANTS = ("rdp", "prv")
EPSILON_TOLERANCE = 0.01

HistoryEntry = tuple[float, float, int]


class BudgetExhausted(RuntimeError):
    """Training would take the factory's cumulative epsilon above its budget.

    Raised instead of training, so the factory declines a round rather than overspend.
    """

    def __init__(self, spent: float, budget: float, delta: float, detail: str = "") -> None:
        self.spent = float(spent)
        self.budget = float(budget)
        self.delta = float(delta)
        message = (
            f"privacy budget exhausted: epsilon spent {self.spent:.4f} of budget "
            f"{self.budget:.4f} (delta={self.delta:g})"
        )
        super().__init__(message + (f"; {detail}" if detail else ""))


class LedgerError(RuntimeError):
    """The privacy ledger file cannot be trusted (corrupt, or another factory's/accountant's).

    The ledger is never silently reset: losing recorded spend would void the privacy guarantee.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        super().__init__(f"privacy ledger {self.path}: {message}")


def normalize_history(history: Iterable[Sequence[Any]] | None) -> list[HistoryEntry]:
    """Validate a history and merge consecutive entries with equal noise and sample rate.

    Merging matches Opacus's accountants (``RDPAccountant.step``), so per-round records and the
    single planned entry of a run give the same epsilon. Raises ``ValueError`` on bad entries.
    """
    merged: list[HistoryEntry] = []
    for entry in history or ():
        if len(entry) != 3:
            raise ValueError(
                f"history entry {entry!r} is not (noise_multiplier, sample_rate, steps)"
            )
        nm, q, steps = entry
        if isinstance(nm, bool) or isinstance(q, bool) or isinstance(steps, bool):
            raise ValueError(f"history entry {entry!r} holds a boolean")
        nm, q = float(nm), float(q)
        if int(steps) != steps:
            raise ValueError(f"history entry {entry!r}: steps must be an integer")
        steps = int(steps)
        if not (math.isfinite(nm) and nm >= 0.0):
            raise ValueError(f"history entry {entry!r}: noise multiplier must be finite and >= 0")
        if not (0.0 < q <= 1.0):
            raise ValueError(f"history entry {entry!r}: sample rate must be in (0, 1]")
        if steps < 0:
            raise ValueError(f"history entry {entry!r}: steps must be >= 0")
        if steps == 0:
            continue
        if merged and merged[-1][0] == nm and merged[-1][1] == q:
            merged[-1] = (nm, q, merged[-1][2] + steps)
        else:
            merged.append((nm, q, steps))
    return merged


def _check_accountant(accountant: str, allowed: Sequence[str] = ACCOUNTANTS) -> None:
    if accountant not in allowed:
        raise ValueError(f"unsupported accountant {accountant!r}; choose one of {list(allowed)}")


def _check_delta(delta: float) -> None:
    if not (0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon_of(
    history: Iterable[Sequence[Any]] | None, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at ``delta`` of a DP-SGD history, computed by an Opacus accountant.

    ``rdp`` and ``prv`` compose any history. ``gdp`` (Opacus's ``GaussianAccountant``, marked
    experimental there) only handles a constant noise multiplier and sample rate, so a history
    with several noise levels raises ``ValueError``. An empty history spends nothing: 0.0. A
    history holding a zero noise multiplier has no guarantee: ``inf``.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    merged = normalize_history(history)
    if not merged:
        return 0.0
    if any(nm == 0.0 for nm, _, _ in merged):
        return math.inf
    if accountant == "gdp" and len(merged) > 1:
        raise ValueError(
            "the gdp accountant cannot compose different noise multipliers or sample rates; "
            "use rdp or prv"
        )
    if accountant == "rdp":
        return rdp_epsilon(merged, delta)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")
        acc = create_accountant(mechanism=accountant)
    acc.history = list(merged)
    return float(acc.get_epsilon(delta=delta))


def get_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Opacus's ``get_noise_multiplier``: same arguments, same search, same float returned.

    For the RDP accountant the search runs over :mod:`fl_common.accounting`'s curves
    (:func:`~fl_common.accounting.noise_multiplier_for`), which reproduce Opacus's comparisons
    exactly in a small fraction of its time; other accountants call Opacus's function.

    Raises:
        ValueError: no noise multiplier up to Opacus's ``MAX_SIGMA`` is enough.
    """
    if accountant == "rdp":
        return noise_multiplier_for(
            target_epsilon, target_delta, sample_rate, steps, epsilon_tolerance
        )
    return opacus_utils.get_noise_multiplier(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        epsilon_tolerance=epsilon_tolerance,
    )


def plan_noise_multiplier(
    prior_history: Iterable[Sequence[Any]] | None,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    planned_steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Smallest noise multiplier keeping ``prior_history`` plus the planned steps within budget.

    Finds sigma such that ``prior_history + [(sigma, sample_rate, planned_steps)]`` has epsilon
    at most ``target_epsilon``, within ``epsilon_tolerance`` below it (the search errs on the
    noisy side, never above the budget). With no prior history this is exactly Opacus's
    ``get_noise_multiplier`` (:func:`get_noise_multiplier`, the same value computed faster);
    with prior spend the same doubling-then-bisection search runs over the composed history,
    which is tighter than subtracting epsilons.

    Raises:
        BudgetExhausted: the prior history already meets or exceeds the budget, or no noise
            multiplier up to Opacus's ``MAX_SIGMA`` is enough.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not (target_epsilon > 0.0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(planned_steps) != planned_steps or planned_steps < 1:
        raise ValueError(f"planned_steps must be a positive integer, got {planned_steps}")
    planned_steps = int(planned_steps)
    prior = normalize_history(prior_history)
    spent = epsilon_of(prior, delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExhausted(spent, target_epsilon, delta, "no budget left for another run")

    if not prior:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="GDP accounting is experimental")
                warnings.filterwarnings("ignore", message="Optimal order is the")
                return float(
                    get_noise_multiplier(
                        target_epsilon=target_epsilon,
                        target_delta=delta,
                        sample_rate=sample_rate,
                        steps=planned_steps,
                        accountant=accountant,
                        epsilon_tolerance=epsilon_tolerance,
                    )
                )
        except ValueError as exc:
            raise BudgetExhausted(spent, target_epsilon, delta, str(exc)) from exc

    if accountant == "gdp":
        raise ValueError("the gdp accountant cannot plan on top of earlier spend; use rdp or prv")

    def eps(sigma: float) -> float:
        return epsilon_of([*prior, (sigma, sample_rate, planned_steps)], delta, accountant)

    # Same search as opacus.accountants.utils.get_noise_multiplier, over the composed history.
    try:
        return float(search_noise_multiplier(eps, target_epsilon, epsilon_tolerance))
    except ValueError as exc:
        raise BudgetExhausted(
            spent,
            target_epsilon,
            delta,
            f"even noise multiplier {MAX_SIGMA:g} would exceed the budget "
            f"over {planned_steps} steps",
        ) from exc


def _history_covers(longer: list[HistoryEntry], shorter: list[HistoryEntry]) -> bool:
    """Whether ``shorter``'s step sequence is a prefix of ``longer``'s (both normalized)."""
    if len(shorter) > len(longer):
        return False
    for i, (nm, q, steps) in enumerate(shorter):
        lnm, lq, lsteps = longer[i]
        if (nm, q) != (lnm, lq):
            return False
        if steps != lsteps and (i != len(shorter) - 1 or steps > lsteps):
            return False
    return True


def _history_suffix(full: list[HistoryEntry], upto: int) -> list[HistoryEntry]:
    """The entries of ``full`` after its first ``upto`` steps."""
    out: list[HistoryEntry] = []
    skipped = 0
    for nm, q, steps in full:
        if skipped >= upto:
            out.append((nm, q, steps))
        elif skipped + steps > upto:
            out.append((nm, q, skipped + steps - upto))
        skipped += steps
    return out


def _common_prefix_steps(a: list[HistoryEntry], b: list[HistoryEntry]) -> int:
    """Number of leading steps on which two normalized histories agree."""
    total = 0
    for (anm, aq, asteps), (bnm, bq, bsteps) in zip(a, b, strict=False):
        if (anm, aq) != (bnm, bq):
            break
        total += min(asteps, bsteps)
        if asteps != bsteps:
            break
    return total


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class PrivacyLedger:
    """The factory's durable record of DP spend, stored as JSON on the factory's own disk.

    The file holds plain data (like an Opacus accountant ``state_dict``): format version,
    ``factory_id``, ``accountant``, ``epsilon_budget``, ``delta``, the full accountant
    ``history`` across all runs, the noise multiplier planned for each run
    (``runs[run_id] = {noise_multiplier, sample_rate, planned_steps}``) and one entry per
    reserved round (``rounds``).

    Spend is recorded *before* training (:meth:`reserve_round`), so a crash mid-round still
    counts, and every reservation is checked exactly against the budget, so the cumulative
    epsilon the ledger reports never exceeds ``epsilon_budget``.
    """

    def __init__(
        self,
        path: str | Path,
        factory_id: str,
        epsilon_budget: float,
        delta: float,
        accountant: str = "rdp",
        history: Iterable[Sequence[Any]] | None = None,
        runs: dict[str, dict[str, float | int]] | None = None,
        rounds: list[dict[str, Any]] | None = None,
    ) -> None:
        _check_accountant(accountant, LEDGER_ACCOUNTANTS)
        _check_delta(delta)
        if not (epsilon_budget > 0.0 and math.isfinite(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be positive and finite, got {epsilon_budget}")
        self.path = Path(path)
        self.factory_id = str(factory_id)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.accountant = accountant
        self.history: list[HistoryEntry] = normalize_history(history)
        self.runs: dict[str, dict[str, float | int]] = dict(runs or {})
        self.rounds: list[dict[str, Any]] = list(rounds or [])
        self._session_budget: float | None = None

    # ----------------------------------------------------------------- persistence
    @classmethod
    def open(
        cls,
        path: str | Path,
        factory_id: str,
        epsilon_budget: float,
        delta: float,
        accountant: str = "rdp",
    ) -> PrivacyLedger:
        """Load the ledger at ``path``, or start a new one (written on the first save).

        The factory's budget is its own policy, fixed when the ledger is created: a caller
        asking for a *smaller* budget gets it for this session (stricter is always safe), one
        asking for a larger budget or another delta gets :class:`LedgerError` (change the file
        deliberately instead). A corrupt file, or one of another factory or accountant, also
        raises :class:`LedgerError`; the ledger is never reset silently.
        """
        path = Path(path)
        if not path.exists():
            return cls(path, factory_id, epsilon_budget, delta, accountant)
        ledger = cls._read(path)
        if ledger.factory_id != str(factory_id):
            raise LedgerError(
                path, f"belongs to factory {ledger.factory_id!r}, not {str(factory_id)!r}"
            )
        if ledger.accountant != accountant:
            raise LedgerError(
                path,
                f"was kept with the {ledger.accountant!r} accountant, not {accountant!r}",
            )
        if not math.isclose(ledger.delta, float(delta), rel_tol=1e-12, abs_tol=0.0):
            raise LedgerError(
                path, f"was kept at delta={ledger.delta:g}; this run asks for delta={delta:g}"
            )
        if float(epsilon_budget) > ledger.epsilon_budget:
            raise LedgerError(
                path,
                f"holds epsilon budget {ledger.epsilon_budget:g}; this run asks for "
                f"{epsilon_budget:g}. Raise the budget in the file deliberately if intended",
            )
        ledger._session_budget = float(epsilon_budget)
        return ledger

    @property
    def budget(self) -> float:
        """The budget enforced in this session (the stored one, or a stricter request)."""
        if self._session_budget is None:
            return self.epsilon_budget
        return min(self.epsilon_budget, self._session_budget)

    @classmethod
    def _read(cls, path: Path) -> PrivacyLedger:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(path, f"unreadable or not JSON ({exc})") from exc
        try:
            if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
                raise ValueError(f"not a {LEDGER_FORMAT} file")
            if raw.get("version") != LEDGER_VERSION:
                raise ValueError(f"unsupported version {raw.get('version')!r}")
            runs = raw["runs"]
            rounds = raw["rounds"]
            if not isinstance(runs, dict) or not isinstance(rounds, list):
                raise ValueError("'runs' must be an object and 'rounds' a list")
            for run_id, plan in runs.items():
                if not isinstance(plan, dict) or not {
                    "noise_multiplier",
                    "sample_rate",
                    "planned_steps",
                } <= set(plan):
                    raise ValueError(f"run {run_id!r} has a malformed plan")
            history = raw["history"]
            if not isinstance(history, list):
                raise ValueError("'history' must be a list")
            factory_id = raw["factory_id"]
            if not isinstance(factory_id, str):
                raise ValueError("'factory_id' must be a string")
            return cls(
                path,
                factory_id=factory_id,
                epsilon_budget=float(raw["epsilon_budget"]),
                delta=float(raw["delta"]),
                accountant=str(raw["accountant"]),
                history=history,
                runs=runs,
                rounds=rounds,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(path, f"corrupt ledger ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        """The ledger as plain JSON-ready data."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "factory_id": self.factory_id,
            "accountant": self.accountant,
            "epsilon_budget": self.epsilon_budget,
            "delta": self.delta,
            "history": [list(entry) for entry in self.history],
            "runs": self.runs,
            "rounds": self.rounds,
        }

    def save(self) -> None:
        """Write the ledger atomically: temporary file, fsync, ``os.replace``, fsync the folder."""
        atomic_write_json(self.path, self.to_dict(), indent=1, allow_nan=False, permissions=0o600)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an advisory lock next to the ledger and merge spend another process recorded."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - platform dependent
            self._merge_disk()
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                self._merge_disk()
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _merge_disk(self) -> None:
        if not self.path.exists():
            return
        disk = self._read(self.path)
        if disk.factory_id != self.factory_id or disk.accountant != self.accountant:
            raise LedgerError(self.path, "was replaced by another factory's or accountant's ledger")
        self._adopt(disk.history)
        for run_id, plan in disk.runs.items():
            self.runs.setdefault(run_id, plan)
        known = {json.dumps(r, sort_keys=True) for r in self.rounds}
        self.rounds.extend(r for r in disk.rounds if json.dumps(r, sort_keys=True) not in known)

    # ----------------------------------------------------------------- accounting
    def spent_epsilon(self) -> float:
        """Cumulative epsilon of every round recorded so far (all runs)."""
        return epsilon_of(self.history, self.delta, self.accountant)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Cumulative epsilon if ``steps`` more DP-SGD steps were recorded."""
        return epsilon_of(
            [*self.history, (noise_multiplier, sample_rate, steps)], self.delta, self.accountant
        )

    def noise_multiplier_for_run(
        self, run_id: str, sample_rate: float, planned_steps: int
    ) -> float:
        """The run's noise multiplier, planned once from the budget left and then reused.

        The first call for ``run_id`` plans with :func:`plan_noise_multiplier` over the whole
        ledger history (earlier runs included), stores the result and saves; later rounds get
        the stored value, so the noise level stays constant through the run. If the sample
        rate later changes (the factory's data changed), the stored value is still returned;
        :meth:`reserve_round` enforces the budget either way.

        Raises:
            BudgetExhausted: the budget is already spent, or cannot cover ``planned_steps``.
        """
        run_id = str(run_id)
        plan = self.runs.get(run_id)
        if plan is not None:
            if plan["sample_rate"] != sample_rate or plan["planned_steps"] != planned_steps:
                logger.warning(
                    "run %s was planned for sample rate %s over %s steps; now %s over %s. "
                    "Keeping the planned noise multiplier %s",
                    run_id,
                    plan["sample_rate"],
                    plan["planned_steps"],
                    sample_rate,
                    planned_steps,
                    plan["noise_multiplier"],
                )
            return float(plan["noise_multiplier"])
        sigma = plan_noise_multiplier(
            self.history,
            target_epsilon=self.budget,
            delta=self.delta,
            sample_rate=sample_rate,
            planned_steps=planned_steps,
            accountant=self.accountant,
        )
        with self._locked():
            if run_id in self.runs:  # another process planned it meanwhile
                return float(self.runs[run_id]["noise_multiplier"])
            self.runs[run_id] = {
                "noise_multiplier": sigma,
                "sample_rate": float(sample_rate),
                "planned_steps": int(planned_steps),
            }
            self.save()
        return sigma

    def reserve_round(
        self,
        run_id: str,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Record one round's spend on disk before it trains; return the new cumulative epsilon.

        Every call is new spend: a retried round is charged again, since its noise is fresh.

        Raises:
            BudgetExhausted: the round would take the cumulative epsilon above the budget;
                nothing is recorded then.
        """
        if not (noise_multiplier > 0.0 and math.isfinite(noise_multiplier)):
            raise ValueError(
                f"noise_multiplier must be positive and finite, got {noise_multiplier}"
            )
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        with self._locked():
            projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
            if projected > self.budget:
                raise BudgetExhausted(
                    self.spent_epsilon(),
                    self.budget,
                    self.delta,
                    f"round {server_round} of run {run_id} ({steps} steps at noise multiplier "
                    f"{noise_multiplier:.4f}, sample rate {sample_rate:.5f}) would reach "
                    f"epsilon {projected:.4f}",
                )
            self.history = normalize_history(
                [*self.history, (noise_multiplier, sample_rate, int(steps))]
            )
            self.rounds.append(
                {
                    "run_id": str(run_id),
                    "round": int(server_round),
                    "noise_multiplier": float(noise_multiplier),
                    "sample_rate": float(sample_rate),
                    "steps": int(steps),
                    "epsilon_after": projected,
                    "timestamp": _now(),
                }
            )
            self.save()
        return projected

    def _adopt(self, other: Iterable[Sequence[Any]] | None) -> bool:
        """Merge another record of this factory's history without ever dropping spend."""
        carried = normalize_history(other)
        if not carried or _history_covers(self.history, carried):
            return False
        if _history_covers(carried, self.history):
            self.history = carried
            return True
        # The two records diverged: keep both spends (over-counting is safe, losing is not).
        common = _common_prefix_steps(self.history, carried)
        logger.warning(
            "ledger %s and the carried history diverge after %d steps; counting both",
            self.path,
            common,
        )
        self.history = normalize_history([*self.history, *_history_suffix(carried, common)])
        return True

    def absorb(self, history: Iterable[Sequence[Any]] | None) -> bool:
        """Adopt a carried history (e.g. from Flower's ``context.state``) holding more spend.

        If the carried history extends the ledger's (the disk file is older than the state the
        caller kept), the ledger takes it over and saves; if the ledger already contains it,
        nothing changes. Two records that diverged are both counted. Returns whether the
        ledger changed.
        """
        if not normalize_history(history):
            return False
        with self._locked():
            changed = self._adopt(history)
            if changed:
                self.save()
        return changed

    def history_as_lists(self) -> list[list[float | int]]:
        """The history as JSON/record-friendly lists ``[noise_multiplier, sample_rate, steps]``."""
        return [[nm, q, steps] for nm, q, steps in self.history]
