"""Per-round contribution scoring: estimator + coalition models + validation metric + guards.

:class:`ContributionScorer` is what the strategy wrapper calls once a round's updates have been
validated and before they are aggregated for real. It is independent of Flower's runtime: the
coalition aggregator and the evaluator are passed in, so tests drive it with plain arrays.
:func:`build_scorer` builds the server's scorer from the ``contribution`` config group, scoring
coalition models on the server's validation set.

With guards (``contribution.guards``, on by default; :mod:`strategies.contribution.guards`) each
round's updates are first checked: factories detected as copies of each other are scored as
*one player* (for a weighted-mean rule, one member's update with the group's smallest weight;
its score split equally among the members), and every factory whose round scores over the run
so far cannot be told from what pure noise of the same norm scores (the placebo noise test,
:func:`~strategies.contribution.guards.placebo_statistic`) is named in the round's ``withheld``,
which the payout desk leaves out of the pool's split.

The placebo test costs, per round, ``max(n, noise_placebos)`` placebo model runs on the
validation set (one per player once ``n`` reaches ``noise_placebos``), one run of the global
model, ``n`` runs of the players' own models where the estimator does not already make them
(every rule but the weighted mean), and ``2 * (noise_placebos + 1) * n`` metric evaluations of
mixed outputs: linear in ``n``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from standard_models.base import StandardTask
from strategies.contribution.coalitions import (
    CoalitionAggregator,
    State,
    WeightedMeanAggregator,
    group_players,
    merge_players,
    round_updates,
)
from strategies.contribution.estimators import estimate
from strategies.contribution.guards import (
    ContributionGuard,
    GuardConfig,
    flat_deltas,
    gradient_statistic,
    placebo_rng,
    placebo_statistic,
    placebo_update,
)
from strategies.contribution.utility import BatchedEvaluator, CoalitionUtility, scoring_subset

#: ``contribution.method`` values; ``none`` switches scoring (and so rewards) off, ``auto``
#: picks the estimator from the round's aggregation rule (:data:`AUTO_PARAMS`).
METHODS = ("none", "exact", "gtg", "loo", "kernel", "linearised", "auto")

#: What ``auto`` resolves to, with the options each takes: ``linearised`` where the coalition
#: models are a weighted mean (FedAvg, FedProx; its output mixture is that rule's first-order
#: expansion), ``gtg`` with every other rule.
AUTO_PARAMS: dict[str, tuple[str, ...]] = {
    "linearised": ("surrogate_evaluations", "surrogate", "batch_size"),
    "gtg": ("within_tol", "between_tol", "convergence_tol", "max_permutations", "batch_size"),
}


@dataclass(frozen=True)
class RoundContribution:
    """The scores of one round, what computing them cost, and what the guards found.

    ``scores`` are the credit of each factory (a duplicate group's score already split among its
    members). The guard fields are empty when the guards are off: ``withheld`` the factories
    (of the whole run so far) whose pay is withheld because their updates cannot be told from
    noise; ``groups`` the duplicate groups scored as one player this round; ``alignment`` each
    scored factory's noise score this round (placebo or alignment ``z``); ``noise_z`` every
    factory's test statistic
    over its rounds so far; ``pairs`` this round's flagged pairs; ``record_groups`` the groups
    whose reported record sketches overlap; ``cleared`` this round's flagged pairs not grouped
    because their record sketches share no hash; ``sketched`` this round's factories whose
    record sketch the server holds.
    """

    server_round: int
    method: str
    scores: dict[str, float]
    evaluations: int
    seconds: float
    grand_utility: float
    permutations: int = 0
    truncated: bool = False
    extra: dict[str, float] = field(default_factory=dict)
    withheld: tuple[str, ...] = ()
    groups: tuple[tuple[str, ...], ...] = ()
    alignment: dict[str, float] = field(default_factory=dict)
    noise_z: dict[str, float] = field(default_factory=dict)
    pairs: tuple[tuple[str, str], ...] = ()
    record_groups: tuple[tuple[str, ...], ...] = ()
    sketched: tuple[str, ...] = ()
    cleared: tuple[tuple[str, str], ...] = ()

    def group_of(self, factory_id: str) -> tuple[str, ...]:
        """The duplicate group ``factory_id`` was scored in this round (empty: none)."""
        return next((g for g in self.groups if factory_id in g), ())


class ContributionScorer:
    """Scores each accepted factory's contribution to a round.

    Parameters
    ----------
    method : ``exact``, ``gtg``, ``loo``, ``kernel`` or ``linearised`` (see
        :mod:`strategies.contribution.estimators`), or ``auto``: ``linearised`` in rounds whose
        coalition models are a weighted mean, ``gtg`` otherwise (each with its own options of
        ``params``).
    score_models : main metric of each of a batch of parameter sets on the validation set.
    sign : ``1`` when greater metric values are better, ``-1`` for error metrics.
    params : estimator options from the ``contribution`` config group.
    seed : run seed; sampled permutations and coalitions are drawn from ``(seed, round)`` so
        reruns agree.
    evaluator : the batched validation evaluator behind ``score_models``; the ``linearised``
        estimator and the placebo noise test need it to score mixtures of the factories'
        outputs.
    guards : the noise and duplicate guards' settings; None switches them off.
    """

    def __init__(
        self,
        method: str,
        score_models: Callable[[Sequence[State]], list[float]],
        sign: float = 1.0,
        params: Mapping[str, object] | None = None,
        seed: int = 0,
        evaluator: BatchedEvaluator | None = None,
        guards: GuardConfig | None = None,
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
        self.guard = ContributionGuard(guards) if guards is not None and guards.active else None
        if self.guard is not None and self.guard.config.scored_noise and evaluator is None:
            raise ValueError(
                f"contribution.guards.noise_rule={self.guard.config.noise_rule} needs the "
                "validation evaluator to score updates against noise; use noise_rule=alignment "
                "or switch noise_test off without it"
            )

    def resume(self, rounds: Sequence[Mapping[str, object]]) -> None:
        """Continue a restarted run: the guards' state from its recorded rounds."""
        if self.guard is not None:
            self.guard.restore(rounds)

    def score_round(
        self,
        server_round: int,
        factory_ids: Sequence[str],
        aggregator: CoalitionAggregator,
        reference: State,
        sketches: Mapping[str, np.ndarray] | None = None,
    ) -> RoundContribution:
        """Contribution of each factory in ``factory_ids`` (the players, in aggregator order).

        ``sketches``: the record sketches this round's replies carried (``{id: hashes}``); the
        guard keeps each factory's latest and groups overlapping record sets.
        """
        start = time.perf_counter()
        ids = list(factory_ids)
        found = None
        players: list[list[int]] = [[i] for i in range(len(ids))]
        updates: list[State] = []
        weights: list[float] = []
        deltas = np.zeros((0, 0))
        if self.guard is not None and ids:
            self.guard.observe_sketches(sketches or {})
            updates, weights = round_updates(aggregator)
            deltas = flat_deltas(updates, reference)
            found = self.guard.observe(ids, deltas, weights)
            players = group_players(ids, found.groups)
        baseline = self.score_models([reference])[0]
        utility = CoalitionUtility(
            merge_players(aggregator, players),
            self.score_models,
            baseline,
            self.sign,
            evaluator=self.evaluator,
        )
        if found is not None and self.guard is not None and self.guard.config.scored_noise:
            if self.guard.config.placebo:
                noise = self._placebo_scores(
                    server_round, ids, players, updates, weights, deltas, reference, utility
                )
            else:
                noise = self._gradient_scores(ids, players, deltas, reference)
            found = self.guard.score_noise(found, noise)
        method, params = self.method, dict(self.params)
        if method == "auto":
            mean = isinstance(utility.aggregator, WeightedMeanAggregator)
            method = "linearised" if mean else "gtg"
            params = {k: v for k, v in params.items() if k in AUTO_PARAMS[method]}
        if method in ("gtg", "kernel", "linearised"):
            params["seed"] = self.seed * 1_000_003 + int(server_round)
        result = estimate(method, len(players), utility, **params)
        scores: dict[str, float] = {}
        for members, value in zip(players, result.scores, strict=True):
            for m in members:
                scores[ids[m]] = float(value) / len(members)
        guard_fields: dict = {}
        if found is not None:
            guard_fields = {
                "withheld": found.withheld,
                "groups": found.groups,
                "alignment": found.alignment,
                "noise_z": {f: v.z for f, v in sorted(found.verdicts.items())},
                "pairs": found.pairs,
                "record_groups": found.record_groups,
                "sketched": tuple(f for f in ids if f in self.guard.sketches),
                "cleared": found.cleared,
            }
        return RoundContribution(
            server_round=int(server_round),
            method=method,
            scores={fid: scores[fid] for fid in ids},
            evaluations=int(result.evaluations),
            seconds=time.perf_counter() - start,
            grand_utility=float(result.grand_utility),
            permutations=int(result.permutations),
            truncated=bool(result.truncated),
            **guard_fields,
        )

    def _gradient_scores(
        self,
        ids: Sequence[str],
        players: Sequence[Sequence[int]],
        deltas: np.ndarray,
        reference: State,
    ) -> dict[str, float]:
        """Each factory's :func:`gradient_statistic` this round (its player's first member's,
        for a duplicate group), against the validation loss gradient at ``reference``."""
        assert self.evaluator is not None
        grads = self.evaluator.loss_gradient(reference)
        zero = {k: np.zeros_like(np.asarray(v)) for k, v in reference.items()}
        flat = flat_deltas([{**zero, **grads}], zero)[0]  # the updates' layout; buffers: 0
        firsts = [min(members) for members in players]
        z = gradient_statistic(deltas[firsts], flat)
        return {ids[m]: float(z[p]) for p, members in enumerate(players) for m in members}

    def _placebo_scores(
        self,
        server_round: int,
        ids: Sequence[str],
        players: Sequence[Sequence[int]],
        updates: Sequence[State],
        weights: Sequence[float],
        deltas: np.ndarray,
        reference: State,
        utility: CoalitionUtility,
    ) -> dict[str, float]:
        """Each factory's placebo ``z`` this round (its player's, for a duplicate group).

        A player is scored by its first member's update with the smallest member weight, as
        :meth:`~strategies.contribution.coalitions.WeightedMeanAggregator.merged` enters it.
        Placebos are drawn from ``(seed, round, first member's id)``; each player gets
        ``ceil(noise_placebos / n)`` of them.
        """
        evaluator = self.evaluator
        assert evaluator is not None and self.guard is not None
        size = self.guard.config.noise_placebos
        firsts = [min(members) for members in players]
        own_updates = [updates[f] for f in firsts]
        if isinstance(utility.aggregator, WeightedMeanAggregator):
            game = utility.output_game()  # the linearised estimator reuses these outputs
            own, player_weights = game.outputs, game.weights.tolist()
        else:
            own = torch.stack(evaluator.outputs(own_updates))
            player_weights = [min(weights[m] for m in members) for members in players]
        per = math.ceil(size / len(players))
        states, owners = [], []
        for p, first in enumerate(firsts):
            for draw in range(per):
                rng = placebo_rng(self.seed, server_round, ids[first], draw)
                states.append(placebo_update(own_updates[p], reference, rng))
                owners.append(p)
        outputs = evaluator.outputs(states + [reference])
        norms = np.linalg.norm(deltas[firsts], axis=1)  # the guard's flattened updates
        z = placebo_statistic(
            own,
            torch.stack(outputs[:-1]),
            owners,
            outputs[-1],
            norms,
            player_weights,
            evaluator.score_outputs,
            evaluator.sign,
            size,
        )
        return {ids[m]: float(z[p]) for p, members in enumerate(players) for m in members}


def build_scorer(
    cfg: DictConfig, task: StandardTask, validation: Dataset
) -> ContributionScorer | None:
    """The round scorer described by ``cfg.contribution``; ``None`` for ``method: none``.

    The guards are on unless ``contribution.guards`` switches them off (a config without the
    block, from before the guards existed, gets their defaults: the placebo noise test on).
    Coalitions are scored on at most ``contribution.validation_examples`` of the validation
    set (:func:`~strategies.contribution.utility.scoring_subset`; null or absent: all of it).
    """
    options = OmegaConf.to_container(cfg.contribution, resolve=True)
    assert isinstance(options, dict)
    method = str(options.pop("method", "none"))
    guards = options.pop("guards", None)
    limit = options.pop("validation_examples", None)
    if method == "none":
        return None
    evaluator = BatchedEvaluator(
        task, task.build_model(), scoring_subset(validation, None if limit is None else int(limit))
    )
    return ContributionScorer(
        method,
        evaluator.scores,
        evaluator.sign,
        params=options,
        seed=int(cfg.seed),
        evaluator=evaluator,
        guards=GuardConfig.from_options(guards),  # type: ignore[arg-type]
    )
