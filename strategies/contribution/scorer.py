"""Per-round contribution scoring: estimator + coalition models + validation metric.

:class:`ContributionScorer` is what the strategy wrapper calls once a round's updates have been
validated and before they are aggregated for real. It is independent of Flower's runtime: the
coalition aggregator and the evaluator are passed in, so tests drive it with plain arrays.
:func:`build_scorer` builds the server's scorer from the ``contribution`` config group, scoring
coalition models on the server's validation set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from standard_models.base import StandardTask
from strategies.contribution.coalitions import CoalitionAggregator, State
from strategies.contribution.estimators import estimate
from strategies.contribution.utility import BatchedEvaluator, CoalitionUtility

#: ``contribution.method`` values; ``none`` switches scoring (and so rewards) off.
METHODS = ("none", "exact", "gtg", "loo", "kernel", "linearised")


@dataclass(frozen=True)
class RoundContribution:
    """The scores of one round and what computing them cost."""

    server_round: int
    method: str
    scores: dict[str, float]
    evaluations: int
    seconds: float
    grand_utility: float
    permutations: int = 0
    truncated: bool = False
    extra: dict[str, float] = field(default_factory=dict)


class ContributionScorer:
    """Scores each accepted factory's contribution to a round.

    Parameters
    ----------
    method : ``exact``, ``gtg``, ``loo``, ``kernel`` or ``linearised`` (see
        :mod:`strategies.contribution.estimators`).
    score_models : main metric of each of a batch of parameter sets on the validation set.
    sign : ``1`` when greater metric values are better, ``-1`` for error metrics.
    params : estimator options from the ``contribution`` config group.
    seed : run seed; sampled permutations and coalitions are drawn from ``(seed, round)`` so
        reruns agree.
    evaluator : the batched validation evaluator behind ``score_models``; the ``linearised``
        estimator needs it to score mixtures of the factories' outputs.
    """

    def __init__(
        self,
        method: str,
        score_models: Callable[[Sequence[State]], list[float]],
        sign: float = 1.0,
        params: Mapping[str, object] | None = None,
        seed: int = 0,
        evaluator: BatchedEvaluator | None = None,
    ) -> None:
        if method not in METHODS or method == "none":
            raise ValueError(
                f"contribution.method must be one of {', '.join(METHODS[1:])} for scoring, "
                f"got {method!r}"
            )
        self.method = method
        self.score_models = score_models
        self.sign = float(sign)
        self.params = {k: v for k, v in dict(params or {}).items() if v is not None}
        self.seed = int(seed)
        self.evaluator = evaluator

    def score_round(
        self,
        server_round: int,
        factory_ids: Sequence[str],
        aggregator: CoalitionAggregator,
        reference: State,
    ) -> RoundContribution:
        """Contribution of each factory in ``factory_ids`` (the players, in aggregator order)."""
        start = time.perf_counter()
        baseline = self.score_models([reference])[0]
        utility = CoalitionUtility(
            aggregator, self.score_models, baseline, self.sign, evaluator=self.evaluator
        )
        params = dict(self.params)
        if self.method in ("gtg", "kernel", "linearised"):
            params["seed"] = self.seed * 1_000_003 + int(server_round)
        result = estimate(self.method, len(factory_ids), utility, **params)
        return RoundContribution(
            server_round=int(server_round),
            method=self.method,
            scores={fid: float(v) for fid, v in zip(factory_ids, result.scores, strict=True)},
            evaluations=int(result.evaluations),
            seconds=time.perf_counter() - start,
            grand_utility=float(result.grand_utility),
            permutations=int(result.permutations),
            truncated=bool(result.truncated),
        )


def build_scorer(
    cfg: DictConfig, task: StandardTask, validation: Dataset
) -> ContributionScorer | None:
    """The round scorer described by ``cfg.contribution``; ``None`` for ``method: none``."""
    options = OmegaConf.to_container(cfg.contribution, resolve=True)
    assert isinstance(options, dict)
    method = str(options.pop("method", "none"))
    if method == "none":
        return None
    evaluator = BatchedEvaluator(task, task.build_model(), validation)
    return ContributionScorer(
        method,
        evaluator.scores,
        evaluator.sign,
        params=options,
        seed=int(cfg.seed),
        evaluator=evaluator,
    )
