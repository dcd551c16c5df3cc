"""Flower's server-side DP wrappers, fixed so the released model matches the accounting.

:func:`wrap_client_dp` puts Flower's server-side clipping wrapper (fixed or adaptive) around
the inner Flower strategy, as the ``client_dp`` config group says. The wrappers are thin
subclasses of Flower's classes; what they change, and why, is in :class:`_ClientDPHooks` and
:class:`ClientDPAdaptiveClipping`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from strategies.client_dp.accounting import ClientDPBudget, client_dp_budget
from strategies.client_dp.options import ClientDPOptions, field_name, parse_client_dp

#: Metric each reply gets (value 1) so the inner FedAvg takes the unweighted mean.
CLIENT_DP_WEIGHT_KEY = "client-dp-weight"


class _ClientDPHooks:
    """What both server-side wrappers add to Flower's, so the release matches the accounting.

    * the budget guard runs in ``configure_train``, before any factory is asked to train;
    * the inner FedAvg takes the *unweighted* mean for the DP aggregate: the noise
      ``z * C / k`` is calibrated to a sensitivity of ``C / k``, which a mean weighted by
      ``num-examples`` does not have (one large factory can move it by up to ``C``);
    * noise is calibrated to the ``k`` updates actually aggregated (Flower uses the configured
      ``num_sampled_clients``, under-noising rounds where some factories were rejected or
      failed);
    * each reply's arrays are put in the global model's key order, since Flower clips by
      position against the arrays ``configure_train`` saw;
    * a factory that sends the global model back unchanged (update norm 0) does not crash the
      round: Flower computes ``clipping_norm / norm``, a ZeroDivisionError with a Python float,
      so the norm is kept as a numpy scalar, for which it is ``inf`` (scale 1: nothing to clip);
    * no replies means no release (Flower's adaptive wrapper would divide by zero).
    """

    client_dp_budget: ClientDPBudget | None
    _num_aggregated: int
    _clipping_norm: np.float64

    @property
    def clipping_norm(self) -> float:
        """The clipping norm of the current round (a numpy scalar, see the class docstring)."""
        return self._clipping_norm

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self._clipping_norm = np.float64(value)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse a round past the budget, then let Flower's wrapper remember the global model."""
        if self.client_dp_budget is not None:
            self.client_dp_budget.check(server_round)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Align and uniformly weight the replies, then clip, average and noise (Flower)."""
        replies_list = list(replies)
        if not replies_list:
            return None, None
        current: ArrayRecord = self.current_arrays  # type: ignore[attr-defined]
        if len(current) == 0:
            raise RuntimeError(
                "client-level DP needs the round's global model: call configure_train before "
                "aggregate_train"
            )
        order = list(current.keys())
        content = [msg for msg in replies_list if not msg.has_error()]
        for msg in content:
            for name, record in list(msg.content.array_records.items()):
                if list(record.keys()) != order:
                    if set(record.keys()) != set(order):
                        raise ValueError(
                            f"reply from node {msg.metadata.src_node_id} has arrays "
                            f"{sorted(record.keys())}, the global model {sorted(order)}"
                        )
                    msg.content[name] = ArrayRecord({k: record[k] for k in order})
            for metrics in msg.content.metric_records.values():
                metrics[CLIENT_DP_WEIGHT_KEY] = 1
        self._num_aggregated = len(content)
        inner: FedAvg = self.strategy  # type: ignore[attr-defined]
        weighted_by = inner.weighted_by_key
        inner.weighted_by_key = CLIENT_DP_WEIGHT_KEY
        try:
            with np.errstate(divide="ignore"):  # norm 0 -> scale inf -> 1, see the docstring
                return super().aggregate_train(server_round, replies_list)  # type: ignore[misc]
        finally:
            inner.weighted_by_key = weighted_by

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """Gaussian noise of standard deviation ``z * C / k`` on the mean of ``k`` updates."""
        nds = aggregated.to_numpy_ndarrays()
        stdv = compute_stdv(
            self.noise_multiplier,  # type: ignore[attr-defined]
            self.clipping_norm,  # type: ignore[attr-defined]
            max(1, self._num_aggregated),
        )
        add_gaussian_noise_inplace(nds, stdv)
        log(
            INFO,
            "client-level DP: noise stdev %.4g on the mean of %d updates",
            stdv,
            self._num_aggregated,
        )
        return ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in zip(aggregated.keys(), nds, strict=True)}
        )


class ClientDPFixedClipping(_ClientDPHooks, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, with the budget guard and the fixes of the hooks.

    Flower's own ``accountant=`` argument is not used (it needs ``dp-accounting``); the budget
    is :class:`ClientDPBudget`.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        budget: ClientDPBudget | None = None,
    ) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.client_dp_budget = budget
        self._num_aggregated = num_sampled_clients


class ClientDPAdaptiveClipping(_ClientDPHooks, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping (Andrew et al. 2021), with two corrections.

    * Flower 1.42 updates the clipping norm *before* adding the noise, so the noise is
      calibrated to the next round's norm while the updates were clipped to this round's;
      when the norm shrinks the aggregate is under-noised by a data-dependent factor. Here the
      update is deferred until the noise has been added.
    * Flower's update ``C *= exp(-lr * (clipped_fraction - target))`` moves the norm the wrong
      way (too many updates clipped -> smaller norm -> more clipped), so the norm runs off to 0
      or infinity. Here ``C *= exp(lr * (clipped_fraction - target))``: Andrew et al.'s rule
      with ``target_clipped_quantile`` read as Flower documents it (the fraction of updates
      that should be clipped; the paper's unclipped quantile is ``1 - target``).

    The account is :func:`adaptive_effective_noise_multiplier`.
    """

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        num_sampled_clients: int,
        initial_clipping_norm: float = 0.1,
        target_clipped_quantile: float = 0.5,
        clip_norm_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
        *,
        budget: ClientDPBudget | None = None,
    ) -> None:
        super().__init__(
            strategy,
            noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm,
            target_clipped_quantile,
            clip_norm_lr,
            clipped_count_stddev,
        )
        self.client_dp_budget = budget
        self._num_aggregated = num_sampled_clients
        self._pending_clipped_fraction: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        """Keep the noisy clipped fraction; the norm changes after this round's noise."""
        self._pending_clipped_fraction = clipped_fraction

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip with this round's norm, noise with it, then adapt the norm for the next round."""
        self._pending_clipped_fraction = None
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            fraction = self._pending_clipped_fraction
            self._pending_clipped_fraction = None
            if fraction is not None:
                self.clipping_norm *= math.exp(
                    self.clip_norm_lr * (fraction - self.target_clipped_quantile)
                )


def _check_inner(inner: Strategy, opts: ClientDPOptions) -> None:
    """Refuse inner strategies for which the noise would not match the accounting."""
    if not isinstance(inner, FedAvg) or type(inner).aggregate_train is not FedAvg.aggregate_train:
        raise ValueError(
            f"strategy: client_dp.mode={opts.mode} needs a strategy that releases the mean of "
            f"the updates (fedavg, fedprox); {type(inner).__name__} aggregates differently "
            "(robust rule or server optimizer), so noise scaled to clipping_norm / k would not "
            "bound one factory's influence"
        )
    sampled = max(int(opts.num_factories * inner.fraction_train), inner.min_train_nodes)
    if sampled != opts.num_sampled_clients:
        raise ValueError(
            f"{field_name('num_sampled_clients')} = {opts.num_sampled_clients} but the strategy "
            f"samples {sampled} of {opts.num_factories} factories per round (fraction_train="
            f"{inner.fraction_train}, min_train_nodes={inner.min_train_nodes}); the "
            "accountant's sample rate must be the real one"
        )


def wrap_client_dp(inner: Strategy, options: Mapping[str, Any], num_factories: int) -> Strategy:
    """Put server-side client-level DP around ``inner`` as ``options`` (``cfg.client_dp``) says.

    ``mode: none`` returns ``inner`` itself. ``fixed`` and ``adaptive`` return
    :class:`ClientDPFixedClipping` / :class:`ClientDPAdaptiveClipping` (subclasses of Flower's
    ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``) around ``inner``, with
    ``num_sampled_clients`` factories per round (all by default) and the budget guard attached
    as ``client_dp_budget``. ``inner`` must aggregate by FedAvg's mean and sample exactly
    ``num_sampled_clients`` of ``num_factories`` factories. Bad options raise ValueError naming
    the field.
    """
    opts = parse_client_dp(options, num_factories)
    if opts.mode == "none":
        return inner
    _check_inner(inner, opts)
    budget = client_dp_budget(options, num_factories)
    if opts.mode == "fixed":
        return ClientDPFixedClipping(
            inner,
            opts.noise_multiplier,
            opts.clipping_norm,
            opts.num_sampled_clients,
            budget=budget,
        )
    return ClientDPAdaptiveClipping(
        inner,
        opts.noise_multiplier,
        opts.num_sampled_clients,
        initial_clipping_norm=opts.initial_clipping_norm,
        target_clipped_quantile=opts.target_clipped_quantile,
        clip_norm_lr=opts.clip_norm_lr,
        clipped_count_stddev=opts.clipped_count_stddev,
        budget=budget,
    )
