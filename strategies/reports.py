"""What happened in a training round: each factory's outcome and the round's record.

Plain data: the strategy wrapper fills a :class:`RoundReport` from the replies and hands the
server one :class:`RoundRecord` per round (see :class:`strategies.hooked.FactoryFedStrategy`);
the server's round recorder names it in MLflow. Kept free of Flower so it is unit-tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fl_common.protocol import ACCEPTED
from strategies.contribution.scorer import RoundContribution


@dataclass
class FactoryOutcome:
    """One factory's reply in one round: status, why, and the metrics it reported."""

    factory_id: str
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    node_id: int | None = None


@dataclass
class RoundReport:
    """All factories' outcomes of one training round."""

    server_round: int
    outcomes: dict[str, FactoryOutcome] = field(default_factory=dict)

    def add(self, outcome: FactoryOutcome) -> None:
        """Record ``outcome``; a factory answering twice in a round keeps its first answer."""
        self.outcomes.setdefault(outcome.factory_id, outcome)

    @property
    def accepted(self) -> list[str]:
        return sorted(f for f, o in self.outcomes.items() if o.status == ACCEPTED)

    @property
    def failures(self) -> list[FactoryOutcome]:
        return [o for o in self.outcomes.values() if o.status != ACCEPTED]

    def summary_line(self) -> str:
        """Short human-readable status, e.g. ``3/4 accepted; factory_002 declined``."""
        parts = [f"{len(self.accepted)}/{len(self.outcomes)} accepted"]
        parts += [
            f"{o.factory_id} {o.status}" for o in sorted(self.failures, key=lambda o: o.factory_id)
        ]
        return "; ".join(parts)


@dataclass(frozen=True)
class RoundRecord:
    """What one training round produced, handed by the strategy to the server once.

    ``report`` holds every factory's outcome; ``contribution`` the scores of the accepted
    factories when the round was scored (None: scoring off, too few updates, or it failed);
    ``aggregated`` the factories whose updates went into the global model, in aggregation
    order (empty when too few were accepted and the model was left unchanged); ``epsilons``
    each replying factory's cumulative privacy spend as it reported it (any status).
    """

    report: RoundReport
    contribution: RoundContribution | None = None
    aggregated: tuple[str, ...] = ()
    epsilons: dict[str, float] = field(default_factory=dict)

    @property
    def server_round(self) -> int:
        return self.report.server_round
