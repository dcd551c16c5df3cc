"""Coalition models: each coalition's aggregate, built with the round's own aggregation rule.

A coalition's utility is the quality of the model its members' updates would have produced this
round. That model must come from the same rule the strategy applies to the real round (FedAvg's
weighted mean, FedAdam's server step, Krum's selection, ...), otherwise the scores describe a
different federation from the one that ran. Two aggregators provide this:

* :class:`StrategyAggregator` works for any Flower strategy: a copy of the strategy, in the
  state it had before the round, aggregates the coalition's replies. Copies keep the real
  strategy's state (server momentum, adaptive moments) untouched.
* :class:`WeightedMeanAggregator` is the same rule as FedAvg and FedProx's server side, written
  as one matrix product over all requested coalitions; :func:`coalition_aggregator` picks it
  only for those two exact classes, and a test checks it against Flower's output.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import Bulyan, FedAvg, FedProx, Krum, MultiKrum, Strategy
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights

Coalition = frozenset[int]
State = dict[str, np.ndarray]

#: Flower classes whose server-side aggregation is exactly the weighted mean of the updates.
WEIGHTED_MEAN_STRATEGIES: tuple[type, ...] = (FedAvg, FedProx)


def detached(replies: Sequence[Message]) -> list[Message]:
    """Copies of ``replies`` whose records the receiving strategy may consume.

    Flower's FedMedian and FedTrimmedAvg (and Bulyan through them) ``pop`` the arrays out of the
    replies they aggregate. The same accepted replies are aggregated many times in a round (each
    coalition model, then the real aggregation), so every call gets records of its own and no
    call can empty another's input. The arrays themselves are shared: no strategy writes them.
    """
    out: list[Message] = []
    for msg in replies:
        clone = copy.copy(msg)
        clone.content = RecordDict({key: _copy_record(rec) for key, rec in msg.content.items()})
        out.append(clone)
    return out


def _copy_record(
    record: ArrayRecord | MetricRecord | ConfigRecord,
) -> ArrayRecord | MetricRecord | ConfigRecord:
    return type(record)(dict(record.items()))


class CoalitionAggregator(ABC):
    """Builds the model each coalition of this round's accepted updates would produce."""

    @abstractmethod
    def aggregate(self, coalitions: Sequence[Coalition]) -> list[State]:
        """The aggregated parameters of each non-empty coalition, in order."""


class WeightedMeanAggregator(CoalitionAggregator):
    """``sum_i w_i x_i / sum_i w_i`` over a coalition, for many coalitions in one product.

    Parameters
    ----------
    updates : list of parameter dicts, one per player (same keys and shapes).
    weights : the weight of each player (FedAvg: its ``num-examples``).
    """

    def __init__(self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]):
        if len(updates) != len(weights) or not updates:
            raise ValueError("need one weight per update and at least one update")
        self.keys = list(updates[0])
        self.shapes = [np.shape(updates[0][k]) for k in self.keys]
        self.dtypes = [np.asarray(updates[0][k]).dtype for k in self.keys]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.matrix = np.stack(
            [
                np.concatenate([np.asarray(u[k], dtype=np.float64).ravel() for k in self.keys])
                for u in updates
            ]
        )
        self.weights = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(self.weights)) or np.any(self.weights <= 0):
            raise ValueError(f"weights must be finite and positive, got {list(weights)}")

    def merged(self, players: Sequence[Sequence[int]]) -> WeightedMeanAggregator:
        """The same round with each of ``players`` (groups of update indices) as one update.

        A group is represented by its first member's update (smallest index) with the
        *smallest* member weight: a duplicate group enters the round as one factory of its
        honest size, and a copy cannot raise the group's weight by claiming more rows. Not the
        members' mean: copies trained on the same records carry independent DP noise, so their
        mean is a less noisy update of the same data, worth more than one factory's, and that
        surplus is exactly what a copier would be paid for.
        """
        out = copy.copy(self)
        rows, weights = [], []
        for members in players:
            idx = sorted(members)
            rows.append(self.matrix[idx[0]])
            weights.append(float(self.weights[idx].min()))
        out.matrix = np.stack(rows)
        out.weights = np.asarray(weights, dtype=np.float64)
        return out

    def updates(self) -> list[State]:
        """Each player's parameters, in player order."""
        return self.aggregate([frozenset([i]) for i in range(len(self.weights))])

    def aggregate(self, coalitions: Sequence[Coalition]) -> list[State]:
        n = len(self.weights)
        mask = np.zeros((len(coalitions), n))
        for row, members in enumerate(coalitions):
            if not members:
                raise ValueError("the empty coalition has no aggregate (it is the global model)")
            mask[row, sorted(members)] = 1.0
        w = mask * self.weights
        flat = (w / w.sum(axis=1, keepdims=True)) @ self.matrix
        out: list[State] = []
        for vector in flat:
            state, offset = {}, 0
            for key, shape, size, dtype in zip(
                self.keys, self.shapes, self.sizes, self.dtypes, strict=True
            ):
                state[key] = vector[offset : offset + size].reshape(shape).astype(dtype)
                offset += size
            out.append(state)
        return out


class StrategyAggregator(CoalitionAggregator):
    """Any Flower strategy's own ``aggregate_train``, run on a copy per coalition.

    ``strategy`` must be in its state from before the round's real aggregation. A coalition the
    rule cannot aggregate (Krum or Bulyan below their minimum number of updates, for instance)
    produces no new model: it keeps ``fallback`` (the previous global model), so its utility
    is zero, which is what such a coalition would have achieved in a real round.
    """

    def __init__(
        self,
        strategy: Strategy,
        server_round: int,
        replies: Sequence[Message],
        fallback: Mapping[str, np.ndarray],
    ) -> None:
        self.strategy = strategy
        self.server_round = server_round
        self.replies = list(replies)
        self.fallback = {k: np.asarray(v) for k, v in fallback.items()}
        self.failed = 0

    def aggregate(self, coalitions: Sequence[Coalition]) -> list[State]:
        out: list[State] = []
        for members in coalitions:
            if not members:
                raise ValueError("the empty coalition has no aggregate (it is the global model)")
            trial = copy.deepcopy(self.strategy)
            msgs = detached([self.replies[i] for i in sorted(members)])
            try:
                arrays, _ = trial.aggregate_train(self.server_round, msgs)
            except Exception as exc:  # the rule refuses this coalition size or content
                arrays = None
                if self.failed == 0:
                    log(WARNING, "Coalition of %d cannot be aggregated: %s", len(members), exc)
            if arrays is None:
                self.failed += 1
                out.append(dict(self.fallback))
            else:  # in the global model's dtypes, as the real round's aggregate is kept
                out.append(
                    {
                        k: v.numpy().astype(self.fallback[k].dtype, copy=False)
                        if k in self.fallback
                        else v.numpy()
                        for k, v in arrays.items()
                    }
                )
        return out


class KrumFamilyAggregator(StrategyAggregator):
    """Flower's Krum, MultiKrum and Bulyan, computed for many coalitions from arrays read once.

    Through :class:`StrategyAggregator` every coalition costs a deep copy of the strategy, copies
    of the replies and Flower's conversion of every reply's arrays to numpy (Bulyan's
    ``to_numpy_ndarrays(keep_input=False)`` also runs a full garbage collection per reply): about
    150 coalitions a round made Bulyan with GTG scoring cost minutes per round. Here each reply's
    arrays are read once, and each coalition runs the same numpy operations as Flower's
    ``select_multikrum``, ``aggregate_arrayrecords`` and ``Bulyan.aggregate_train``, on the
    coalition's replies in the order Flower gets them (sorted member indices), so every model
    is Flower's bit for bit (``tests/test_contribution_scoring.py`` checks it on random
    coalitions). A coalition Bulyan refuses (fewer than ``4 f + 3`` replies) keeps
    ``fallback``, as :class:`StrategyAggregator` does.
    """

    def __init__(
        self,
        strategy: Strategy,
        server_round: int,
        replies: Sequence[Message],
        fallback: Mapping[str, np.ndarray],
        updates: Sequence[State] | None = None,
    ) -> None:
        super().__init__(strategy, server_round, replies, fallback)
        if updates is None:
            updates = [
                {k: v.numpy() for k, v in next(iter(m.content.array_records.values())).items()}
                for m in self.replies
            ]
        self.states = [dict(u) for u in updates]
        self.keys = list(self.states[0]) if self.states else []
        key = strategy.weighted_by_key
        self.weights = [
            float(next(iter(m.content.metric_records.values()))[key]) for m in self.replies
        ]
        # Flower's compute_distances flattens each reply the same way, once per call.
        self.flat = [np.concatenate(list(u.values()), axis=None).ravel() for u in self.states]
        self.f = int(strategy.num_malicious_nodes)
        self.bulyan = isinstance(strategy, Bulyan)

    def _select(self, members: list[int], count: int) -> list[int]:
        """``select_multikrum`` on the replies ``members`` (in that order)."""
        flat_w = np.stack([self.flat[i] for i in members], axis=0)
        norms = np.square(flat_w).sum(axis=1)
        distances = norms[:, None] + norms[None, :] - 2 * flat_w @ flat_w.T
        num_closest = max(1, len(members) - self.f - 2)
        scores = [
            np.sum(row[np.argsort(row)[1 : num_closest + 1].tolist()]) for row in distances
        ]
        return [members[i] for i in np.argsort(scores)[:count]]

    def _bulyan(self, members: list[int]) -> State | None:
        if len(members) < 4 * self.f + 3:
            return None
        theta = len(members) - 2 * self.f
        beta = theta - 2 * self.f
        selected = [[self.states[i][k] for k in self.keys] for i in self._select(members, theta)]
        medians = [np.median(arr, axis=0) for arr in zip(*selected, strict=True)]
        merged = aggregate_n_closest_weights(medians, selected, beta)
        return {k: np.asarray(v) for k, v in zip(self.keys, merged, strict=True)}

    def _multikrum(self, members: list[int]) -> State:
        chosen = self._select(members, int(self.strategy.num_nodes_to_select))
        total = sum(self.weights[i] for i in chosen)
        out: State = {}
        for i in chosen:
            factor = self.weights[i] / total
            for k in self.keys:
                if k not in out:
                    out[k] = self.states[i][k] * factor
                else:
                    out[k] += self.states[i][k] * factor
        return out

    def aggregate(self, coalitions: Sequence[Coalition]) -> list[State]:
        out: list[State] = []
        for coalition in coalitions:
            if not coalition:
                raise ValueError("the empty coalition has no aggregate (it is the global model)")
            members = sorted(coalition)
            state = self._bulyan(members) if self.bulyan else self._multikrum(members)
            if state is None:
                self.failed += 1
                out.append(dict(self.fallback))
            else:  # in the global model's dtypes, as the real round's aggregate is kept
                out.append(
                    {
                        k: v.astype(self.fallback[k].dtype, copy=False) if k in self.fallback else v
                        for k, v in state.items()
                    }
                )
        return out


#: Flower classes :class:`KrumFamilyAggregator` reproduces (the exact classes: a subclass may
#: change the rule).
KRUM_FAMILY: tuple[type, ...] = (Krum, MultiKrum, Bulyan)


def coalition_aggregator(
    strategy: Strategy,
    server_round: int,
    replies: Sequence[Message],
    fallback: Mapping[str, np.ndarray],
    updates: Sequence[State] | None = None,
) -> CoalitionAggregator:
    """The fastest aggregator that reproduces ``strategy``'s rule exactly.

    FedAvg and FedProx (the exact classes, not subclasses that may override aggregation) get the
    batched weighted mean, Krum, MultiKrum and Bulyan their own rule on arrays read once
    (:class:`KrumFamilyAggregator`); every other strategy aggregates coalitions through its
    own code.
    ``updates``: the replies' arrays already converted to numpy (in reply order), if the caller
    has them; otherwise they are read from the replies.
    """
    if type(strategy) in WEIGHTED_MEAN_STRATEGIES:
        key = strategy.weighted_by_key
        weights = [float(next(iter(msg.content.metric_records.values()))[key]) for msg in replies]
        if updates is None:
            updates = [
                {k: v.numpy() for k, v in next(iter(msg.content.array_records.values())).items()}
                for msg in replies
            ]
        return WeightedMeanAggregator(updates, weights)
    if type(strategy) in KRUM_FAMILY:
        return KrumFamilyAggregator(strategy, server_round, replies, fallback, updates)
    return StrategyAggregator(strategy, server_round, replies, fallback)


class GroupedAggregator(CoalitionAggregator):
    """Players made of groups of ``inner``'s players: a coalition stands for its groups' union.

    Used where a rule cannot merge updates (any strategy but the weighted mean): a duplicate
    group then enters every coalition with all its members, as it entered the real round.
    """

    def __init__(self, inner: CoalitionAggregator, players: Sequence[Sequence[int]]) -> None:
        self.inner = inner
        self.players = [frozenset(p) for p in players]

    def aggregate(self, coalitions: Sequence[Coalition]) -> list[State]:
        return self.inner.aggregate(
            [frozenset().union(*(self.players[p] for p in c)) for c in coalitions]
        )


def merge_players(
    aggregator: CoalitionAggregator, players: Sequence[Sequence[int]]
) -> CoalitionAggregator:
    """``aggregator`` with ``players`` (disjoint groups of its update indices) as its players.

    Unchanged when every player is one update; a weighted mean merges each group into one
    update (:meth:`WeightedMeanAggregator.merged`); any other rule aggregates the union of the
    members (:class:`GroupedAggregator`).
    """
    if all(len(p) == 1 for p in players) and [p[0] for p in players] == list(
        range(len(players))
    ):
        return aggregator
    if isinstance(aggregator, WeightedMeanAggregator):
        return aggregator.merged(players)
    return GroupedAggregator(aggregator, players)


def group_players(
    factory_ids: Sequence[str], groups: Sequence[Sequence[str]]
) -> list[list[int]]:
    """Players of a round whose duplicate ``groups`` are scored as one: lists of indices into
    ``factory_ids``, one per ungrouped factory and one per group, ordered by first index."""
    index = {fid: i for i, fid in enumerate(factory_ids)}
    grouped = {m for g in groups for m in g}
    players = [[index[f]] for f in factory_ids if f not in grouped]
    players += [sorted(index[m] for m in g) for g in groups]
    return sorted(players, key=min)


def once_per_group(
    strategy: Strategy,
    factory_ids: Sequence[str],
    replies: Sequence[Message],
    groups: Sequence[Sequence[str]],
) -> list[Message]:
    """Copies of ``replies`` (see :func:`detached`) for the real aggregation, with each duplicate
    group entered once, as the scorer entered it.

    For a weighted-mean rule (FedAvg, FedProx) a group the scorer merged into one player is one
    update in every coalition it scored: its first member's (in factory order) with the
    smallest member weight (:meth:`WeightedMeanAggregator.merged`). The real aggregation gets
    the same, so the model the federation keeps is the grand coalition that was scored and paid
    for, and a copier cannot double its data's weight in the global model: the first member's
    reply carries the group's smallest weight and the other members' replies are left out.
    Any other rule scored each group as the union of its members (:class:`GroupedAggregator`)
    and gets every reply, as it did. ``factory_ids`` name ``replies`` in order.
    """
    out = detached(replies)
    if not groups or type(strategy) not in WEIGHTED_MEAN_STRATEGIES:
        return out
    index = {fid: i for i, fid in enumerate(factory_ids)}
    key = strategy.weighted_by_key
    left_out: set[int] = set()
    for group in groups:
        members = sorted(index[f] for f in group if f in index)
        if len(members) < 2:
            continue
        records = [next(iter(out[i].content.metric_records.values())) for i in members]
        records[0][key] = min(rec[key] for rec in records)
        left_out.update(members[1:])
    return [msg for i, msg in enumerate(out) if i not in left_out]


def round_updates(aggregator: CoalitionAggregator) -> tuple[list[State], list[float]]:
    """The round's accepted updates and their aggregation weights, in player order.

    For any other rule than the weighted mean the weight is the reply's ``num-examples``.
    """
    if isinstance(aggregator, WeightedMeanAggregator):
        return aggregator.updates(), aggregator.weights.tolist()
    if isinstance(aggregator, StrategyAggregator):
        states, weights = [], []
        for msg in aggregator.replies:
            arrays = next(iter(msg.content.array_records.values()))
            states.append({k: v.numpy() for k, v in arrays.items()})
            metrics = next(iter(msg.content.metric_records.values()))
            weights.append(float(metrics.get("num-examples", 1.0)))
        return states, weights
    raise TypeError(f"cannot read the updates of a {type(aggregator).__name__}")
