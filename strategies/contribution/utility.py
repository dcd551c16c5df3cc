"""Coalition utility: how much a coalition's model improves the server's validation metric.

``U(S) = m(model_S) - m(previous global)`` for a metric where greater is better (the sign flips
for error metrics such as RMSE), so the empty coalition is worth exactly zero: without any
update the federation keeps the previous model.

Evaluation is where the cost is, so the validation set is turned into one tensor once per run
and each coalition's parameters go straight into the network with
:func:`torch.func.functional_call`: no model copies, no state-dict loads, no data loader. The
estimators ask for whole batches of coalitions, and only the task's main metric is computed
(:meth:`~standard_models.base.StandardTask.main_score`). Stacking the batch's parameters under
:func:`torch.func.vmap` was measured too: on CPU it was twice as slow as one call per model for
the TEP network (the stacked activations no longer fit in cache), so it is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from standard_models.base import StandardTask
from strategies.contribution.coalitions import Coalition, CoalitionAggregator, State


class BatchedEvaluator:
    """Scores many parameter sets of one network on a fixed validation set.

    Parameters
    ----------
    task : the standard task (its :meth:`~standard_models.base.StandardTask.output_metrics`
        gives the metric).
    model : a network of the task; only its structure is used, its weights are never changed.
    dataset : the server's validation set, materialised once here.
    """

    def __init__(self, task: StandardTask, model: nn.Module, dataset: Dataset) -> None:
        self.task = task
        self.model = model
        self.metric = task.main_metric
        self.sign = 1.0 if task.greater_is_better else -1.0
        loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset), shuffle=False)
        self.inputs, self.target = next(iter(loader))
        self._names = [name for name, _ in model.named_parameters()]
        self._buffers = dict(model.named_buffers())

    def _forward(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(self.model, (params, self._buffers), (self.inputs,))

    @torch.no_grad()
    def outputs(self, states: Sequence[Mapping[str, np.ndarray]]) -> list[torch.Tensor]:
        """The network's outputs on the validation set for each parameter set."""
        was_training = self.model.training
        self.model.eval()
        out: list[torch.Tensor] = []
        try:
            for state in states:
                params = {name: torch.as_tensor(np.asarray(state[name])) for name in self._names}
                out.append(self._forward(params))
        finally:
            self.model.train(was_training)
        return out

    def scores(self, states: Sequence[Mapping[str, np.ndarray]]) -> list[float]:
        """The task's main metric for each parameter set."""
        return [self.task.main_score(out, self.target) for out in self.outputs(states)]


class CoalitionUtility:
    """The batch utility function the estimators call, for one round.

    Aggregates each requested coalition with the round's rule, scores the models in one batch
    and returns their improvement over the previous global model. A non-finite metric (say,
    average precision on a validation set without positives) counts as no improvement.
    """

    def __init__(
        self,
        aggregator: CoalitionAggregator,
        score: Callable[[Sequence[State]], list[float]],
        baseline: float,
        sign: float = 1.0,
    ) -> None:
        self.aggregator = aggregator
        self.score = score
        self.baseline = float(baseline)
        self.sign = float(sign)
        self.models = 0

    def __call__(self, coalitions: Sequence[Coalition]) -> list[float]:
        states = self.aggregator.aggregate(coalitions)
        self.models += len(states)
        out = []
        for value in self.score(states):
            gain = self.sign * (value - self.baseline)
            out.append(gain if math.isfinite(gain) else 0.0)
        return out
