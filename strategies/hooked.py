"""One wrapper that adds factoryfed's hooks to any Flower strategy.

:class:`FactoryFedStrategy` delegates sampling, configuration and aggregation to a Flower
strategy (FedAvg, FedProx, ...) and adds, in one place for all of them:

* per-factory bookkeeping: every reply (a :class:`~fl_common.protocol.TrainReply`) becomes a
  :class:`~strategies.reports.FactoryOutcome` (accepted, rejected, declined for budget, data
  error, error), and each round ends with one :class:`~strategies.reports.RoundRecord` handed
  to the ``on_round`` callback given at construction (the server's round recorder);
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
  (:mod:`strategies.contribution`), with the record sketches accepted factories reported, so
  factories holding the same records are scored and aggregated as one.

A resumed run gives ``round_offset`` (the rounds completed before) at construction: Flower
counts from 1 again, and :meth:`FactoryFedStrategy.true_round` is the one place that turns its
count into the run's round, which the inner strategy, the factories, the records and the
central evaluation all see.

The wrapper follows the shape of Flower's own DP wrappers (a strategy holding a strategy), so
the inner strategy keeps its aggregation rule untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fl_common.protocol import (
    ACCEPTED,
    EPSILON,
    ERROR,
    NUM_EXAMPLES,
    REJECTED,
    REPLY_RECORD,
    ProtocolError,
    TrainReply,
    claimed_factory_id,
    decode_sketch,
    reply_metrics,
)
from strategies.contribution.coalitions import (
    State,
    coalition_aggregator,
    once_per_group,
)
from strategies.contribution.scorer import ContributionScorer, RoundContribution
from strategies.reports import FactoryOutcome, RoundRecord, RoundReport
from strategies.validation import NO_SKETCH, ValidationRules, validate_update


class FactoryFedStrategy(Strategy):
    """Wrap a Flower strategy with validation, per-factory outcomes and one record per round.

    Parameters
    ----------
    inner : Strategy
        The Flower strategy that samples factories and aggregates accepted updates.
    rules : ValidationRules
        Bounds applied to each update before aggregation.
    min_accepted : int
        Fewer accepted updates than this leave the global model unchanged for the round.
    scorer : ContributionScorer, optional
        Scores the accepted factories each round; the scores go into the round's record.
    round_offset : int
        Rounds completed before this process started (a resumed run); 0 for a new run.
    on_round : callable, optional
        Receives each training round's :class:`~strategies.reports.RoundRecord`, after the
        replies were classified and scored and before Flower's central evaluation of the round.
    """

    def __init__(
        self,
        inner: Strategy,
        rules: ValidationRules | None = None,
        min_accepted: int = 1,
        scorer: ContributionScorer | None = None,
        round_offset: int = 0,
        on_round: Callable[[RoundRecord], None] | None = None,
    ) -> None:
        self.inner = inner
        self.rules = rules or ValidationRules()
        self.min_accepted = max(1, int(min_accepted))
        self.scorer = scorer
        self.round_offset = int(round_offset)
        self.on_round = on_round
        #: Which factory each SuperNode answered as, so that a later error reply from Flower
        #: (which carries no factory record) is recorded against the factory, not the node.
        self.node_factories: dict[int, str] = {}
        #: The name each SuperNode was registered under at the SuperLink (deployment with
        #: SuperNode authentication); empty in simulation, where nodes have no names.
        self.registered: dict[int, str] = {}
        self._reference: State = {}
        #: This round's accepted updates as numpy, converted once by :meth:`classify` and
        #: reused by contribution scoring.
        self._updates: dict[str, State] = {}
        #: This round's record sketches of accepted factories (reply key ``record-sketch``),
        #: handed to the scorer's duplicate guard.
        self._sketches: dict[str, np.ndarray] = {}

    def true_round(self, flower_round: int) -> int:
        """The run's round for Flower's count in this process (the one place it is shifted)."""
        return flower_round + self.round_offset

    # -- delegation ------------------------------------------------------------------------
    def summary(self) -> None:
        log(
            INFO,
            "\t├──> factoryfed hooks: validation %s, min accepted %d",
            self.rules,
            self.min_accepted,
        )
        self.inner.summary()

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop for the ``num_rounds`` rounds this process runs; ``evaluate_fn``
        is called with the run's round (round ``round_offset`` first: the model resumed from)."""

        def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            assert evaluate_fn is not None
            return evaluate_fn(self.true_round(flower_round), arrays)

        return super().start(
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate if evaluate_fn is not None else None,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model sent this round and the SuperNodes' registered names,
        then let the inner strategy sample."""
        self.remember_global(arrays)
        try:
            self.learn_registrations(grid.get_nodes())
        except Exception as exc:  # never lose a round over the names; the last ones stand
            log(WARNING, "Could not read the SuperNodes' registered names: %s", exc)
        return self.inner.configure_train(self.true_round(server_round), arrays, config, grid)

    def remember_global(self, arrays: ArrayRecord) -> None:
        """Set the global model that this round's updates are validated against."""
        self._reference = {k: v.numpy() for k, v in arrays.items()}

    def learn_registrations(self, nodes: Iterable[object]) -> None:
        """Record each node's registered name (Flower ``NodeInfo.name``); nameless nodes are
        not bound. Logs the binding whenever it changes."""
        names = {int(n.node_id): str(n.name) for n in nodes if getattr(n, "name", "")}
        if names and any(self.registered.get(k) != v for k, v in names.items()):
            log(
                INFO,
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
        return self.inner.configure_evaluate(self.true_round(server_round), arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(self.true_round(server_round), replies)

    # -- hooks -----------------------------------------------------------------------------
    def classify(self, msg: Message) -> FactoryOutcome:
        """Turn one reply into an outcome; validates the update when the factory trained.

        An accepted update's arrays are converted to numpy here, once, and kept for the
        round's contribution scoring.
        """
        node_id = int(msg.metadata.src_node_id)
        known = self.registered.get(node_id) or self.node_factories.get(node_id)
        if msg.has_error():
            return FactoryOutcome(
                known or f"node-{node_id}", ERROR, msg.error.reason, node_id=node_id
            )
        content = msg.content
        metrics = reply_metrics(content)
        claimed = claimed_factory_id(content)
        if claimed is not None:
            impostor = self._impostor(node_id, claimed)
            if impostor is not None:
                # Recorded against the node's own name (or its node id), never the claimed one.
                name = self.registered.get(node_id, f"node-{node_id}")
                return FactoryOutcome(name, REJECTED, impostor, metrics, node_id)
            self.node_factories[node_id] = claimed
        factory_id = claimed or known or f"node-{node_id}"
        try:
            reply = TrainReply.from_record(content)
        except ProtocolError as exc:
            return FactoryOutcome(factory_id, REJECTED, str(exc), metrics, node_id)
        if reply.status != ACCEPTED:
            return FactoryOutcome(factory_id, reply.status, reply.reason, metrics, node_id)
        assert reply.arrays is not None
        try:
            update = {k: v.numpy() for k, v in reply.arrays.items()}
        except Exception as exc:  # a malformed array payload must not crash the round
            return FactoryOutcome(
                factory_id, REJECTED, f"unreadable arrays ({exc})", metrics, node_id
            )
        why = validate_update(update, self._reference, metrics.get(NUM_EXAMPLES), self.rules)
        if why is None and self.rules.require_record_sketch and not reply.record_sketch:
            why = NO_SKETCH
        if why is not None:
            return FactoryOutcome(factory_id, REJECTED, why, metrics, node_id)
        self._updates.setdefault(factory_id, update)
        if reply.record_sketch and factory_id not in self._sketches:
            self._sketches[factory_id] = decode_sketch(reply.record_sketch)
        return FactoryOutcome(factory_id, ACCEPTED, "", metrics, node_id)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Classify every reply, aggregate only the accepted updates with the inner strategy,
        and hand the round's record to ``on_round``."""
        server_round = self.true_round(server_round)
        report = RoundReport(server_round)
        accepted: list[Message] = []
        accepted_ids: list[str] = []
        self._updates, self._sketches = {}, {}
        for msg in replies:
            outcome = self.classify(msg)
            report.add(outcome)
            if outcome.status == ACCEPTED and report.outcomes[outcome.factory_id] is outcome:
                if REPLY_RECORD in msg.content:
                    del msg.content[REPLY_RECORD]
                accepted.append(msg)
                accepted_ids.append(outcome.factory_id)
            elif outcome.status != ACCEPTED:
                log(
                    WARNING,
                    "Round %d: %s %s: %s",
                    server_round,
                    outcome.factory_id,
                    outcome.status,
                    outcome.reason,
                )
        # Factory order, not arrival order: scores and sums must not depend on who answered first.
        ranked = sorted(zip(accepted_ids, accepted, strict=True), key=lambda pair: pair[0])
        accepted_ids, accepted = [fid for fid, _ in ranked], [msg for _, msg in ranked]
        epsilons = {
            fid: o.metrics[EPSILON] for fid, o in report.outcomes.items() if EPSILON in o.metrics
        }
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        contribution = None
        if len(accepted) < self.min_accepted:
            log(
                WARNING,
                "Round %d: %d accepted update(s), fewer than the minimum %d; the global "
                "model is left unchanged",
                server_round,
                len(accepted),
                self.min_accepted,
            )
            accepted_ids = []
        else:
            if self.scorer is not None:
                updates = [self._updates[fid] for fid in accepted_ids]
                contribution = self.score(server_round, accepted_ids, accepted, updates)
            # Its own copy (some Flower rules consume the records of the replies they get),
            # with each duplicate group entered once, as it was scored.
            groups = contribution.groups if contribution is not None else ()
            merged = once_per_group(self.inner, accepted_ids, accepted, groups)
            if len(merged) < len(accepted):
                log(
                    INFO,
                    "Round %d: copies aggregated once, as their first member: %s",
                    server_round,
                    "; ".join(", ".join(g) for g in groups),
                )
            arrays, metrics = self.inner.aggregate_train(server_round, merged)
            result = (self.keep_dtypes(arrays), metrics)
        self._updates, self._sketches = {}, {}
        if self.on_round is not None:
            self.on_round(RoundRecord(report, contribution, tuple(accepted_ids), epsilons))
        return result

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

    def score(
        self,
        server_round: int,
        factory_ids: list[str],
        accepted: list[Message],
        updates: list[State] | None = None,
    ) -> RoundContribution | None:
        """Contribution of each accepted factory, from coalition models of the inner rule.

        Runs before the inner strategy aggregates, so stateful rules (server momentum, adaptive
        moments) are copied in their pre-round state. ``updates`` are the accepted arrays as
        numpy (reused where the rule is a plain weighted mean). A scoring failure is logged and
        leaves the round unscored (None: no payout for it); it never stops the federation.
        """
        assert self.scorer is not None
        try:
            aggregator = coalition_aggregator(
                self.inner, server_round, accepted, self._reference, updates
            )
            sketches = {f: self._sketches[f] for f in factory_ids if f in self._sketches}
            return self.scorer.score_round(
                server_round, factory_ids, aggregator, self._reference, sketches
            )
        except Exception as exc:  # scoring is bookkeeping: the round itself must go on
            log(
                WARNING,
                "Round %d: contribution scoring failed, round left unscored: %r",
                server_round,
                exc,
            )
            return None
