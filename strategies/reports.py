"""What happened to each factory in a round, and how it is named in MLflow.

Plain data: the strategy wrapper fills a :class:`RoundReport` from the replies, the server
turns it into ``factory/<id>/<metric>`` values. Kept free of Flower so it is unit-tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCEPTED = "accepted"
REJECTED = "rejected"  # the server refused the update (validation)
DECLINED = "declined"  # the factory refused to train (privacy budget)
DATA_ERROR = "data-error"  # the factory's data file is unusable
ERROR = "error"  # anything else that failed on the factory side

# Reply metric names (Flower's convention uses dashes for num-examples) -> MLflow names.
_RENAMES = {"num-examples": "num_examples"}


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

    def mlflow_metrics(self, known_factories: set[str]) -> dict[str, float]:
        """Per-factory metrics named ``factory/<id>/<metric>`` for every known factory.

        A factory that did not answer this round still gets ``participated = 0`` so gaps are
        visible on the operator's charts rather than silently missing.
        """
        out: dict[str, float] = {}
        for factory_id in sorted(known_factories | set(self.outcomes)):
            prefix = f"factory/{factory_id}/"
            outcome = self.outcomes.get(factory_id)
            status = outcome.status if outcome else "absent"
            out[prefix + "participated"] = 1.0 if status == ACCEPTED else 0.0
            out[prefix + "rejected"] = 1.0 if status == REJECTED else 0.0
            out[prefix + "declined"] = 1.0 if status == DECLINED else 0.0
            out[prefix + "failed"] = 1.0 if status in (DATA_ERROR, ERROR) else 0.0
            if outcome:
                for name, value in outcome.metrics.items():
                    out[prefix + _RENAMES.get(name, name)] = float(value)
        return out

    def summary_line(self) -> str:
        """Short human-readable status, e.g. ``3/4 accepted; factory_002 declined``."""
        parts = [f"{len(self.accepted)}/{len(self.outcomes)} accepted"]
        parts += [
            f"{o.factory_id} {o.status}" for o in sorted(self.failures, key=lambda o: o.factory_id)
        ]
        return "; ".join(parts)
