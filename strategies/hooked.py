"""One wrapper that adds factoryfed's hooks to any Flower strategy.

:class:`FactoryFedStrategy` delegates sampling, configuration and aggregation to a Flower
strategy (FedAvg, FedProx, ...) and adds, in one place for all of them:

* per-factory bookkeeping: every reply becomes a :class:`~strategies.reports.FactoryOutcome`
  (accepted, rejected, declined for budget, data error, error) kept per round;
* update validation before aggregation: keys, shapes, dtypes, finiteness, optional norm bound and
  a plausible ``num-examples`` (see :mod:`strategies.validation`); a rejected update is recorded
  and never aggregated;
* the minimum number of accepted updates a round needs before it may change the global model;
* identity: in a deployment each factory's SuperNode is registered under its factory id
  (``factoryfed deploy register``, ``flwr supernode register --name``), and the SuperLink
  authenticates the node by its key; a reply whose claimed ``factory-id`` is not the name its
  node was registered under (or is the name of another node) is rejected, so one factory can
  neither be paid nor be blamed for another's update;
* contribution scoring (optional): before the real aggregation, each accepted factory's
  contribution is estimated from coalition models built with the inner strategy's own rule
  (:mod:`strategies.contribution`).

The wrapper follows the shape of Flower's own DP wrappers (a strategy holding a strategy), so
the inner strategy keeps its aggregation rule untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.contribution.coalitions import coalition_aggregator
from strategies.contribution.scorer import ContributionScorer, RoundContribution
from strategies.reports import (
    ACCEPTED,
    DATA_ERROR,
    DECLINED,
    ERROR,
    REJECTED,
    FactoryOutcome,
    RoundReport,
)
from strategies.validation import ValidationRules, validate_update

#: Key of the ConfigRecord a factory adds to its reply (identity, status, reason).
FACTORY_RECORD = "factory"
_STATUSES = {ACCEPTED, DECLINED, DATA_ERROR, ERROR}


def _metrics_of(msg: Message) -> dict[str, float]:
    out: dict[str, float] = {}
    for record in msg.content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, int | float):
                out[key] = float(value)
    return out


class FactoryFedStrategy(Strategy):
    """Wrap a Flower strategy with validation and per-factory reports.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples factories and aggregates accepted updates.
    rules : ValidationRules
        Bounds applied to each update before aggregation.
    min_accepted : int
        Fewer accepted updates than this leave the global model unchanged for the round.
    scorer : ContributionScorer, optional
        Scores the accepted factories each round; results land in :attr:`contributions`.
    """

    def __init__(
        self,
        inner: Strategy,
        rules: ValidationRules | None = None,
        min_accepted: int = 1,
        scorer: ContributionScorer | None = None,
    ) -> None:
        self.inner = inner
        self.rules = rules or ValidationRules()
        self.min_accepted = max(1, int(min_accepted))
        self.scorer = scorer
        self.reports: dict[int, RoundReport] = {}
        self.contributions: dict[int, RoundContribution] = {}
        #: Rounds already completed before this process started (a resumed run): Flower counts
        #: from 1 again, the inner strategy, the factories and all reports see the true round.
        self.round_offset = 0
        self.known_factories: set[str] = set()
        #: Which factory each SuperNode answered as, so that a later error reply from Flower
        #: (which carries no factory record) is recorded against the factory, not the node.
        self.node_factories: dict[int, str] = {}
        #: The name each SuperNode was registered under at the SuperLink (deployment with
        #: SuperNode authentication); empty in simulation, where nodes have no names.
        self.registered: dict[int, str] = {}
        self._reference: dict[str, np.ndarray] = {}
        self._arrays_key = getattr(inner, "arrayrecord_key", "arrays")

    # -- delegation ------------------------------------------------------------------------
    def summary(self) -> None:
        log(
            20,
            "\t├──> factoryfed hooks: validation %s, min accepted %d",
            self.rules,
            self.min_accepted,
        )
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model sent this round and the SuperNodes' registered names,
        then let the inner strategy sample."""
        self.remember_global(arrays)
        try:
            self.learn_registrations(grid.get_nodes())
        except Exception as exc:  # never lose a round over the names; the last ones stand
            log(30, "Could not read the SuperNodes' registered names: %s", exc)
        return self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)

    def remember_global(self, arrays: ArrayRecord) -> None:
        """Set the global model that this round's updates are validated against."""
        self._reference = {k: v.numpy() for k, v in arrays.items()}

    def learn_registrations(self, nodes: Iterable[object]) -> None:
        """Record each node's registered name (Flower ``NodeInfo.name``); nameless nodes are
        not bound. Logs the binding whenever it changes."""
        names = {int(n.node_id): str(n.name) for n in nodes if getattr(n, "name", "")}
        if names and any(self.registered.get(k) != v for k, v in names.items()):
            log(
                20,
                "[factoryfed] SuperNodes registered as: %s",
                ", ".join(sorted(names.values())),
            )
        self.registered.update(names)

    def _impostor(self, node_id: int, claimed: str) -> str | None:
        """Why ``claimed`` is not ``node_id``'s factory id, or None when it may be."""
        registered = self.registered.get(node_id)
        if registered is not None and claimed != registered:
            return f"node {node_id} is registered as '{registered}' but answered as '{claimed}'"
        if registered is None:
            owner = next((n for n, name in self.registered.items() if name == claimed), None)
            if owner is not None:
                return f"'{claimed}' is registered to node {owner}, not to node {node_id}"
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)

    # -- hooks -----------------------------------------------------------------------------
    def classify(self, msg: Message) -> FactoryOutcome:
        """Turn one reply into an outcome; validates the update when the factory trained."""
        node_id = int(msg.metadata.src_node_id)
        known = self.registered.get(node_id) or self.node_factories.get(node_id)
        if msg.has_error():
            return FactoryOutcome(
                known or f"node-{node_id}", ERROR, msg.error.reason, node_id=node_id
            )
        content = msg.content
        info = content.config_records.get(FACTORY_RECORD, ConfigRecord())
        metrics = _metrics_of(msg)
        if "factory-id" in info:
            factory_id = str(info["factory-id"])
            impostor = self._impostor(node_id, factory_id)
            if impostor is not None:
                # Recorded against the node's own name (or its node id), never the claimed one.
                name = self.registered.get(node_id, f"node-{node_id}")
                return FactoryOutcome(name, REJECTED, impostor, metrics, node_id)
            self.node_factories[node_id] = factory_id
        else:
            factory_id = known or f"node-{node_id}"
        status = str(info.get("status", ACCEPTED))
        reason = str(info.get("reason", ""))
        if status not in _STATUSES:
            return FactoryOutcome(
                factory_id, REJECTED, f"unknown status '{status}'", metrics, node_id
            )
        if status != ACCEPTED:
            return FactoryOutcome(factory_id, status, reason, metrics, node_id)
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return FactoryOutcome(
                factory_id,
                REJECTED,
                "reply must hold one ArrayRecord and one MetricRecord",
                metrics,
                node_id,
            )
        arrays = next(iter(content.array_records.values()))
        try:
            update = {k: v.numpy() for k, v in arrays.items()}
        except Exception as exc:  # a malformed array payload must not crash the round
            return FactoryOutcome(
                factory_id, REJECTED, f"unreadable arrays ({exc})", metrics, node_id
            )
        why = validate_update(update, self._reference, metrics.get("num-examples"), self.rules)
        if why is not None:
            return FactoryOutcome(factory_id, REJECTED, why, metrics, node_id)
        return FactoryOutcome(factory_id, ACCEPTED, "", metrics, node_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Classify every reply, aggregate only the accepted updates with the inner strategy."""
        server_round += self.round_offset
        report = RoundReport(server_round)
        accepted: list[Message] = []
        accepted_ids: list[str] = []
        for msg in replies:
            outcome = self.classify(msg)
            report.add(outcome)
            if outcome.status == ACCEPTED and report.outcomes[outcome.factory_id] is outcome:
                if FACTORY_RECORD in msg.content:
                    del msg.content[FACTORY_RECORD]
                accepted.append(msg)
                accepted_ids.append(outcome.factory_id)
            elif outcome.status != ACCEPTED:
                log(
                    30,
                    "Round %d: %s %s: %s",
                    server_round,
                    outcome.factory_id,
                    outcome.status,
                    outcome.reason,
                )
        self.reports[server_round] = report
        self.known_factories |= set(report.outcomes)
        if len(accepted) < self.min_accepted:
            log(
                30,
                "Round %d: %d accepted update(s), fewer than the minimum %d; the global "
                "model is left unchanged",
                server_round,
                len(accepted),
                self.min_accepted,
            )
            return None, None
        if self.scorer is not None:
            self.score(server_round, accepted_ids, accepted)
        arrays, metrics = self.inner.aggregate_train(server_round, accepted)
        return self.keep_dtypes(arrays), metrics

    def keep_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the global model's dtypes.

        Server optimisers compute in float64 (FedAdam's step mixes float32 arrays with float64
        numpy scalars), which would silently turn a float32 model into float64: every honest
        factory's float32 reply would then fail validation against it.
        """
        if arrays is None or not self._reference:
            return arrays
        out = {}
        changed = False
        for key, value in arrays.items():
            array = value.numpy()
            ref = self._reference.get(key)
            if ref is not None and array.dtype != ref.dtype:
                array, changed = array.astype(ref.dtype), True
            out[key] = Array(np.ascontiguousarray(array))
        return ArrayRecord(out) if changed else arrays

    def score(self, server_round: int, factory_ids: list[str], accepted: list[Message]) -> None:
        """Contribution of each accepted factory, from coalition models of the inner rule.

        Runs before the inner strategy aggregates, so stateful rules (server momentum, adaptive
        moments) are copied in their pre-round state. A scoring failure is logged and leaves
        the round unscored (no payout for it); it never stops the federation.
        """
        assert self.scorer is not None
        try:
            aggregator = coalition_aggregator(self.inner, server_round, accepted, self._reference)
            self.contributions[server_round] = self.scorer.score_round(
                server_round, factory_ids, aggregator, self._reference
            )
        except Exception as exc:  # scoring is bookkeeping: the round itself must go on
            log(
                30,
                "Round %d: contribution scoring failed, round left unscored: %r",
                server_round,
                exc,
            )
