"""The round recorder: turns each round's record and central evaluation into the run's records.

One job (everything written about a round); its length is the list below, each item small.

Per round the strategy hands the server one :class:`~strategies.reports.RoundRecord` (every
factory's outcome, the contribution scores, the factories aggregated, their reported epsilons)
and the server evaluates the new global model on its validation set. :class:`RoundRecorder`
receives both and owns everything written about the round:

* the MLflow metrics, in one batch per round; every ``server/*`` and ``factory/<id>/*`` name
  is built by the functions of this module;
* each factory's privacy facts as params, the first time it reports them:
  ``factory/<id>/privacy_unit`` (the unit its epsilon counts), ``factory/<id>/privacy_unit_choice``
  (``declared``: the task's unit, ``coarser``: one the factory chose in its node config) and
  ``factory/<id>/epsilon_budget`` (its own lifetime budget);
* the payout: the round is settled once through the :class:`~fl_server.rewards.desk.PayoutDesk`
  and the ledger is logged as an artifact with its head as the ``ledger_head`` tag;
* ``failures.json`` (every failed or refused reply of the run so far), re-logged whenever a
  round adds one and always at the end of the run (an empty list: none);
* the per-factory history of the run (status, epsilon, contribution per round) that the run's
  description and plots are drawn from (:mod:`fl_server.report`);
* the checkpoint of the global model and the run state a restarted server resumes from;
* the progress line in the server log.

MLflow is reached through the tracker's methods only (``log_metrics``, ``log_params``,
``log_dict``, ``log_artifact``, ``set_tags``), so tests pass a recording tracker and no MLflow
server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.common import log

from fl_common.protocol import (
    ACCEPTED,
    DATA_ERROR,
    DECLINED,
    DELTA,
    DP,
    EPSILON,
    EPSILON_BUDGET,
    ERROR,
    MALICIOUS,
    NUM_EXAMPLES,
    PRIVACY_UNIT_RANK,
    REJECTED,
)
from fl_server.checkpoint import save_checkpoint, save_run_state
from fl_server.report import epsilon_left
from fl_server.rewards.desk import PayoutDesk
from fl_server.rewards.ledger import LedgerEntry
from strategies.contribution.scorer import RoundContribution
from strategies.reports import RoundRecord, RoundReport

#: Reply metric names that MLflow shows under another name (Flower's dashed convention).
_RENAMES = {NUM_EXAMPLES: "num_examples"}
#: Reply metrics that are constant over a run (the run's params say them): not charted.
_CONSTANT = {DELTA, DP, EPSILON_BUDGET, PRIVACY_UNIT_RANK}
#: The operator's pinned health metrics. MLflow's UI draws one section per name prefix, in
#: name order: ``dashboard/`` sorts before ``factory/``, ``server/`` and ``test/``.
HEALTH_PREFIX = "dashboard/"
#: Minor units (cents) per major unit of the reward currency.
MINOR_PER_MAJOR = 100
FAILURES_ARTIFACT = "failures.json"
CHECKPOINTS_DIR = "checkpoints"


class Tracker(Protocol):
    """What the recorder needs from :class:`fl_server.tracking.MlflowTracker`."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_params(self, params: dict[str, str]) -> None: ...
    def log_dict(self, data: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...


class EpsilonSchedule(Protocol):
    """The client-level DP budget (:class:`strategies.client_dp.ClientDPBudget`)."""

    def epsilon(self, server_round: int) -> float: ...


# -- MLflow names ------------------------------------------------------------------------------
def server_metrics(scores: Mapping[str, float]) -> dict[str, float]:
    """The central evaluation as ``server/<metric>``."""
    return {f"server/{k}": float(v) for k, v in scores.items()}


def final_test_metrics(scores: Mapping[str, float]) -> dict[str, float]:
    """The final model's scores on the server's test set as ``test/<metric>``."""
    return {f"test/{k}": float(v) for k, v in scores.items()}


def factory_metrics(
    report: RoundReport, known_factories: Iterable[str], epsilon_budget: float | None = None
) -> dict[str, float]:
    """Per-factory metrics named ``factory/<id>/<metric>`` for every known factory.

    A factory that did not answer this round still gets ``participated = 0`` so gaps are
    visible on the operator's charts rather than silently missing. Reply metrics that are
    constant over a run (``delta``, ``dp``) are params, not charts; ``malicious`` is charted
    only for a factory that attacked. A factory that reported its spend also gets
    ``epsilon_remaining`` (the budget left, never below 0), counted against the budget the
    factory reported as its own (``epsilon_budget`` of its reply record) or, when it said
    none, against ``epsilon_budget`` (the federation's).
    """
    out: dict[str, float] = {}
    for factory_id in sorted(set(known_factories) | set(report.outcomes)):
        prefix = f"factory/{factory_id}/"
        outcome = report.outcomes.get(factory_id)
        status = outcome.status if outcome else "absent"
        out[prefix + "participated"] = 1.0 if status == ACCEPTED else 0.0
        out[prefix + "rejected"] = 1.0 if status == REJECTED else 0.0
        out[prefix + "declined"] = 1.0 if status == DECLINED else 0.0
        out[prefix + "failed"] = 1.0 if status in (DATA_ERROR, ERROR) else 0.0
        if outcome:
            for name, value in outcome.metrics.items():
                if name in _CONSTANT or (name == MALICIOUS and not value):
                    continue
                out[prefix + _RENAMES.get(name, name)] = float(value)
            left = epsilon_left(
                outcome.metrics.get(EPSILON), outcome.metrics.get(EPSILON_BUDGET, epsilon_budget)
            )
            if left is not None:
                out[prefix + "epsilon_remaining"] = left
    return out


def factory_privacy(
    report: RoundReport, privacy_units: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each replying factory's privacy facts, where its reply carried them.

    ``{factory: {"unit", "choice", "epsilon_budget"}}``: ``unit`` the name of the unit its
    epsilon counts (``privacy_units[rank]``, the task's units with the declared one first),
    ``choice`` ``declared`` or ``coarser`` (a unit the factory chose in its node config),
    ``epsilon_budget`` its own lifetime budget. A fact the reply did not carry (an older
    factory) is left out; a rank outside ``privacy_units`` is reported as ``unit #<rank>``.
    """
    out: dict[str, dict[str, Any]] = {}
    for factory_id, outcome in sorted(report.outcomes.items()):
        facts: dict[str, Any] = {}
        if PRIVACY_UNIT_RANK in outcome.metrics:
            rank = int(outcome.metrics[PRIVACY_UNIT_RANK])
            facts["unit"] = privacy_units[rank] if rank < len(privacy_units) else f"unit #{rank}"
            facts["choice"] = "declared" if rank == 0 else "coarser"
        if EPSILON_BUDGET in outcome.metrics:
            facts["epsilon_budget"] = float(outcome.metrics[EPSILON_BUDGET])
        if facts:
            out[factory_id] = facts
    return out


def privacy_params(factory_id: str, facts: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow params of one factory's privacy facts (:func:`factory_privacy`)."""
    names = {"unit": "privacy_unit", "choice": "privacy_unit_choice"}
    return {
        f"factory/{factory_id}/{names.get(k, k)}": (f"{v:g}" if isinstance(v, float) else str(v))
        for k, v in facts.items()
    }


def outcome_counts(report: RoundReport) -> dict[str, float]:
    """``server/{accepted,rejected,declined,failed}``: how many replies ended each way."""
    statuses = [o.status for o in report.outcomes.values()]
    return {
        "server/accepted": float(statuses.count(ACCEPTED)),
        "server/rejected": float(statuses.count(REJECTED)),
        "server/declined": float(statuses.count(DECLINED)),
        "server/failed": float(sum(s in (DATA_ERROR, ERROR) for s in statuses)),
    }


def health_metrics(metrics: Mapping[str, float], main_metric: str) -> dict[str, float]:
    """The few numbers an operator pins, copied under :data:`HEALTH_PREFIX` (sorted first):
    accepted updates, the main metric, the largest epsilon reported, the round's seconds."""
    wanted = {
        "accepted": "server/accepted",
        main_metric: f"server/{main_metric}",
        "epsilon_max": "server/epsilon_max",
        "round_seconds": "server/round_seconds",
    }
    return {HEALTH_PREFIX + k: metrics[v] for k, v in wanted.items() if v in metrics}


def round_metrics(
    record: RoundRecord,
    known_factories: Iterable[str],
    round_seconds: float,
    epsilon_budget: float | None = None,
) -> dict[str, float]:
    """The training round's own metrics: per factory, outcome counts, duration, epsilon max."""
    out = factory_metrics(record.report, known_factories, epsilon_budget)
    out.update(outcome_counts(record.report))
    out["server/round_seconds"] = float(round_seconds)
    if record.epsilons:
        out["server/epsilon_max"] = max(record.epsilons.values())
    return out


def contribution_metrics(contribution: RoundContribution) -> dict[str, float]:
    """``factory/<id>/contribution`` and the round's cost as ``server/contribution_*``."""
    out = {f"factory/{fid}/contribution": float(v) for fid, v in contribution.scores.items()}
    out["server/contribution_evaluations"] = float(contribution.evaluations)
    out["server/contribution_seconds"] = float(contribution.seconds)
    out["server/contribution_grand_utility"] = float(contribution.grand_utility)
    if contribution.method == "gtg":
        out["server/contribution_permutations"] = float(contribution.permutations)
        out["server/contribution_truncated"] = 1.0 if contribution.truncated else 0.0
    out.update(guard_metrics(contribution))
    return out


def guard_metrics(contribution: RoundContribution) -> dict[str, float]:
    """The guards' findings (none when they are off): per factory seen, ``withheld`` (1: its
    pay is withheld, its updates cannot yet be told from noise) and ``noise_z`` (the test's
    statistic over its rounds); per scored factory ``duplicate`` (1: scored in a duplicate
    group) and ``record_sketch`` (1: the server held its record sketch); and
    ``server/withheld``, ``server/duplicate_groups`` (counts)."""
    if not contribution.noise_z:
        return {}
    held = set(contribution.withheld)
    grouped = {m for g in contribution.groups for m in g}
    sketched = set(contribution.sketched)
    out: dict[str, float] = {}
    for fid, z in contribution.noise_z.items():
        out[f"factory/{fid}/withheld"] = 1.0 if fid in held else 0.0
        out[f"factory/{fid}/noise_z"] = float(z)
    for fid in contribution.scores:
        out[f"factory/{fid}/duplicate"] = 1.0 if fid in grouped else 0.0
        out[f"factory/{fid}/record_sketch"] = 1.0 if fid in sketched else 0.0
    out["server/withheld"] = float(len(held))
    out["server/duplicate_groups"] = float(len(contribution.groups))
    return out


def guard_tags(contribution: RoundContribution) -> dict[str, str]:
    """``factory/<id>/duplicate_group``: the members of the group it was scored in this round
    (comma-separated, itself included); ``factory/<id>/duplicate_by``: what found it,
    ``records`` (overlapping record sketches), ``updates`` (similar updates) or both."""
    by_records = {m for g in contribution.record_groups for m in g}
    cleared = set(contribution.cleared)
    by_updates = {m for p in contribution.pairs if p not in cleared for m in p}
    tags: dict[str, str] = {}
    for g in contribution.groups:
        for m in g:
            tags[f"factory/{m}/duplicate_group"] = ",".join(g)
            found = [w for w, s in (("records", by_records), ("updates", by_updates)) if m in s]
            tags[f"factory/{m}/duplicate_by"] = "+".join(found) or "updates"
    return tags


def payout_metrics(
    entries: Iterable[LedgerEntry], total_paid: float, carry: float
) -> dict[str, float]:
    """``factory/<id>/{contribution_cumulative,payout,payout_cumulative}`` and the totals.

    Amounts are in major currency units (the ledger's cents / 100); the currency is the run's
    ``reward_currency`` tag.
    """
    entries = list(entries)
    out: dict[str, float] = {}
    for e in entries:
        prefix = f"factory/{e.factory_id}/"
        out[prefix + "contribution_cumulative"] = e.cumulative_score
        out[prefix + "payout"] = e.payout / MINOR_PER_MAJOR
        out[prefix + "payout_cumulative"] = e.cumulative_payout / MINOR_PER_MAJOR
    out["server/payout_round"] = sum(e.payout for e in entries) / MINOR_PER_MAJOR
    out["server/payout_total"] = float(total_paid) / MINOR_PER_MAJOR
    out["server/reward_carry"] = float(carry) / MINOR_PER_MAJOR
    return out


# -- the recorder ------------------------------------------------------------------------------
class RoundRecorder:
    """Records every round of one federation run (see the module docstring).

    Parameters
    ----------
    tracker : the run's MLflow tracker.
    out_dir : the run's output folder (checkpoints, run state).
    run_id : the MLflow run id, kept in the run state.
    num_rounds : the rounds the run will have (for the progress line).
    main_metric : the task's main metric (for the progress line).
    desk : pays each scored round; None when contribution scoring is off.
    client_dp_budget : the client-level DP budget, whose epsilon is logged each round.
    history, failures : what a resumed run had recorded before (empty for a new run).
    resumed_round : the round of the checkpoint a resumed run starts from; its evaluation was
        recorded before the restart and is not recorded again.
    epsilon_budget : the federation's sample-level epsilon budget (None without DP), for each
        factory's ``epsilon_remaining``.
    factory_rounds : the per-factory history a resumed run had recorded (see
        :meth:`factory_round`).
    on_round : called with the round number after each round is written (the run's
        description is refreshed there).
    privacy_units : the task's privacy units, the declared one first
        (``StandardTask.unit_names()``), to name the unit each factory reports by rank.
    """

    def __init__(
        self,
        tracker: Tracker,
        out_dir: Path,
        run_id: str,
        num_rounds: int,
        main_metric: str,
        desk: PayoutDesk | None = None,
        client_dp_budget: EpsilonSchedule | None = None,
        history: list[dict] | None = None,
        failures: list[dict] | None = None,
        resumed_round: int | None = None,
        epsilon_budget: float | None = None,
        factory_rounds: list[dict] | None = None,
        on_round: Callable[[int], None] | None = None,
        privacy_units: Sequence[str] = (),
    ) -> None:
        self.tracker = tracker
        self.out_dir = Path(out_dir)
        self.run_id = run_id
        self.num_rounds = int(num_rounds)
        self.main_metric = main_metric
        self.desk = desk
        self.budget = client_dp_budget
        self.history: list[dict] = list(history or [])
        self.failures: list[dict] = list(failures or [])
        self.resumed_round = resumed_round
        self.epsilon_budget = epsilon_budget
        #: Per training round: every factory's status, reported epsilon and contribution.
        self.factory_rounds: list[dict] = list(factory_rounds or [])
        self.on_round = on_round
        #: Every factory seen in this process, so each round names all of them in MLflow.
        self.known_factories: set[str] = set()
        #: Each factory's last reported cumulative epsilon (the summary's ``factory_epsilon``).
        self.factory_epsilon: dict[str, float] = {}
        self.privacy_units = tuple(privacy_units)
        #: Each factory's privacy facts as last reported (:func:`factory_privacy`).
        self.factory_privacy: dict[str, dict[str, Any]] = {}
        self._logged_params: set[str] = set()
        self._pending: RoundRecord | None = None
        self._round_start = time.monotonic()

    def receive(self, record: RoundRecord) -> None:
        """Take a training round's record from the strategy (its ``on_round`` callback).

        It is written together with the round's central evaluation in :meth:`record`.
        """
        self._pending = record
        self.known_factories |= set(record.report.outcomes)
        self.factory_epsilon.update(record.epsilons)
        self._record_privacy(record.report)

    def record(
        self,
        server_round: int,
        scores: Mapping[str, float],
        state_dict: Mapping[str, torch.Tensor],
    ) -> None:
        """Write round ``server_round``: its central ``scores`` on the validation set, the
        pending record of its training (none for the initial model), the payout, the global
        model ``state_dict`` as checkpoint and the run state."""
        if server_round == self.resumed_round:
            return
        record, self._pending = self._pending, None
        if record is not None and record.server_round != server_round:
            raise RuntimeError(
                f"round {server_round} evaluated with the record of round {record.server_round}"
            )
        metrics = server_metrics(scores)
        if self.budget is not None:
            metrics["server/epsilon_client_level"] = self.budget.epsilon(server_round)
        if record is not None:
            seconds = time.monotonic() - self._round_start
            metrics.update(
                round_metrics(record, self.known_factories, seconds, self.epsilon_budget)
            )
            self._record_failures(record.report)
            self.factory_rounds.append(self.factory_round(record))
            if record.contribution is not None:
                metrics.update(contribution_metrics(record.contribution))
                if record.contribution.groups:
                    self.tracker.set_tags(guard_tags(record.contribution))
            if self.desk is not None:
                metrics.update(self._settle(record))
        metrics.update(health_metrics(metrics, self.main_metric))
        self.tracker.log_metrics(server_round, metrics)
        save_checkpoint(
            self.out_dir / CHECKPOINTS_DIR,
            server_round,
            {k: v.detach().clone() for k, v in state_dict.items()},
            dict(scores),
        )
        self.history.append({"round": server_round, **scores})
        self.save_state()
        log(
            INFO,
            "[factoryfed] round %d/%d  %s=%.4f  loss=%.4f  (%s)",
            server_round,
            self.num_rounds,
            self.main_metric,
            scores[self.main_metric],
            scores["loss"],
            record.report.summary_line() if record else "initial model",
        )
        if self.on_round is not None:
            self.on_round(server_round)
        self._round_start = time.monotonic()

    @staticmethod
    def factory_round(record: RoundRecord) -> dict:
        """One round of the per-factory history: ``{"round", "status", "epsilon",
        "contribution"}``, each a ``{factory: value}`` map (plain JSON), and with the guards on
        ``"withheld"`` (ids), ``"duplicate_groups"`` (lists of ids), ``"alignment"`` and
        ``"duplicate_pairs"`` (what a resumed run's guards are restored from),
        ``"record_groups"`` (the groups whose record sketches overlap), ``"cleared_pairs"``
        (flagged pairs not grouped: their record sketches share no hash) and ``"sketched"``
        (the factories whose record sketch the server held)."""
        guards = {}
        c = record.contribution
        if c is not None and c.noise_z:
            guards = {
                "withheld": list(c.withheld),
                "duplicate_groups": [list(g) for g in c.groups],
                "alignment": {f: float(v) for f, v in sorted(c.alignment.items())},
                "duplicate_pairs": [list(p) for p in c.pairs],
                "record_groups": [list(g) for g in c.record_groups],
                "cleared_pairs": [list(p) for p in c.cleared],
                "sketched": list(c.sketched),
            }
        return {
            "round": record.server_round,
            "status": {f: o.status for f, o in sorted(record.report.outcomes.items())},
            "epsilon": {f: float(v) for f, v in sorted(record.epsilons.items())},
            "contribution": (
                {f: float(v) for f, v in sorted(record.contribution.scores.items())}
                if record.contribution is not None
                else {}
            ),
            **guards,
        }

    def log_failures(self) -> None:
        """Log ``failures.json`` now, even empty: an empty list says that nothing failed."""
        self.tracker.log_dict(self.failures, FAILURES_ARTIFACT)

    def accepted_updates(self) -> int:
        """Accepted updates over the run's recorded rounds (0: the run trained nothing)."""
        return sum(
            sum(1 for s in r["status"].values() if s == ACCEPTED) for r in self.factory_rounds
        )

    def save_state(self) -> None:
        """Write the run state a restarted server resumes from."""
        save_run_state(
            self.out_dir,
            {
                "mlflow_run_id": self.run_id,
                "history": self.history,
                "failures": self.failures,
                "factory_rounds": self.factory_rounds,
            },
        )

    def _record_privacy(self, report: RoundReport) -> None:
        """Keep each factory's privacy facts; log as params those not logged yet.

        An MLflow param cannot change, so each one is logged once, the first time the
        factory reports it; the summary keeps the latest value.
        """
        new: dict[str, str] = {}
        for factory_id, facts in factory_privacy(report, self.privacy_units).items():
            self.factory_privacy.setdefault(factory_id, {}).update(facts)
            for key, value in privacy_params(factory_id, facts).items():
                if key not in self._logged_params:
                    new[key] = value
        if new:
            try:
                self.tracker.log_params(new)
            except Exception as exc:  # a resumed run whose factory changed its node config
                log(WARNING, "Privacy params not logged (%s): %s", ", ".join(sorted(new)), exc)
            self._logged_params |= set(new)

    def _record_failures(self, report: RoundReport) -> None:
        """Add the round's failed or refused replies; re-log ``failures.json`` if there were."""
        for o in report.failures:
            self.failures.append(
                {
                    "round": report.server_round,
                    "factory": o.factory_id,
                    "status": o.status,
                    "reason": o.reason,
                }
            )
        if report.failures:
            self.log_failures()

    def _settle(self, record: RoundRecord) -> dict[str, float]:
        """Pay the round once (a round already in the ledger is reported, not paid again)."""
        assert self.desk is not None
        entries = self.desk.settle(record.server_round, record.contribution, record.epsilons)
        self.tracker.log_artifact(self.desk.path, "rewards")
        self.tracker.set_tags({"ledger_head": self.desk.ledger.head()})
        book = self.desk.book
        return payout_metrics(entries, sum(book.cumulative_payout.values()), book.carry)
