"""A factory's whole training round: load its data, account privacy, train, report.

This is plain Python with no Flower types so it can be tested and reused on its own; the
ClientApp converts records to and from these arguments and results.

Order of a DP round, chosen so that privacy spend is never lost or exceeded:

1. load and validate the factory's file (errors name the file and column);
2. open the ledger on the factory's disk and adopt any longer history the caller carried;
3. plan the run's noise multiplier once from the budget left (later rounds reuse it);
4. reserve this round's spend on disk, or decline with :class:`BudgetExhausted`;
5. train.

In simulated robustness benches a factory the server names as malicious poisons its training
labels (after step 1, on the in-memory dataset) or its trained weights (after step 5); see
:mod:`fl_client.attacks`. Every other factory runs exactly the steps above.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fl_client.attacks import (
    DATA_ATTACKS,
    UPDATE_ATTACKS,
    AttackConfig,
    poison_dataset,
    poison_update,
)
from fl_client.privacy import BudgetExhausted, PrivacyLedger, epsilon_of, normalize_history
from fl_client.training import (
    LocalTrainConfig,
    TrainResult,
    sample_rate_for,
    steps_per_epoch,
    train_local,
)
from standard_models.base import StandardTask


@dataclass
class FactoryRoundResult:
    """The trained weights, the round's metrics and the history to carry to the next round.

    ``metrics`` holds plain ``int``/``float`` values: ``num-examples``, ``train_loss``,
    ``epsilon`` (cumulative DP spend after this round), ``delta``, ``noise_multiplier``,
    ``sample_rate``, ``steps``, ``train_time`` and ``dp`` (1 if this round ran DP-SGD, else 0);
    when the round was given an attack config, also ``malicious`` (1.0 if this factory carried
    out the attack, else 0.0).
    ``history`` is the ledger's accountant history as lists, for ``context.state``.
    """

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    history: list[list[float | int]] = field(default_factory=list)


def _metrics(
    result: TrainResult, epsilon: float, delta: float, dp: bool
) -> dict[str, float | int]:
    return {
        "num-examples": int(result.num_examples),
        "train_loss": float(result.train_loss),
        "epsilon": float(epsilon),
        "delta": float(delta),
        "noise_multiplier": float(result.noise_multiplier),
        "sample_rate": float(result.sample_rate),
        "steps": int(result.steps),
        "train_time": float(result.train_seconds),
        "dp": int(dp),
    }


def _attacked(
    state: dict[str, torch.Tensor],
    global_state: dict[str, torch.Tensor],
    attack: AttackConfig | None,
    factory_id: str,
    server_round: int,
) -> dict[str, torch.Tensor]:
    """The weights to reply: ``state``, or its poisoned version if this factory attacks."""
    if attack is None or attack.name not in UPDATE_ATTACKS or not attack.is_malicious(factory_id):
        return state
    return poison_update(
        global_state,
        state,
        attack.name,
        attack.params(),
        attack.update_generator(factory_id, server_round),
    )


def _mark(metrics: dict[str, float | int], attack: AttackConfig | None, malicious: bool) -> None:
    """Add ``malicious`` to the metrics of a round that was given an attack config."""
    if attack is not None:
        metrics["malicious"] = 1.0 if malicious else 0.0


def run_factory_round(
    task: StandardTask,
    data_path: str | Path,
    ledger_path: str | Path,
    factory_id: str,
    run_id: str,
    server_round: int,
    planned_rounds: int,
    global_state: dict[str, torch.Tensor],
    train_cfg: LocalTrainConfig,
    epsilon_budget: float,
    delta: float,
    accountant: str = "rdp",
    carried_history: list[Any] | None = None,
    min_run_epsilon: float = 0.0,
    attack: AttackConfig | None = None,
    privacy_unit: str | None = None,
) -> FactoryRoundResult:
    """Train one federated round at one factory and account its privacy spend.

    Epsilon, sample rate and steps count the task's privacy unit (``privacy_unit``, default
    the unit the task declares; see ``StandardTask.to_train_dataset``).

    With ``train_cfg.dp`` the run's noise multiplier is planned once, from the budget left in
    the ledger, for ``planned_rounds * local_epochs * steps_per_epoch`` steps; each round then
    reserves its steps on disk before training. A round that would take the cumulative epsilon
    above ``epsilon_budget`` (including rounds beyond ``planned_rounds``, or a budget already
    spent by earlier runs) raises :class:`~fl_client.privacy.BudgetExhausted` without training.
    So does a new run when less than ``min_run_epsilon`` of the budget is left: the noise that
    so little budget buys would make its updates harm the global model rather than help it.

    Without DP nothing is spent and ``noise_multiplier`` is 0, but the round's update carries
    no formal guarantee at all. The ``epsilon`` metric then still reports the DP spend recorded
    so far (0.0 if this factory never trained with DP), so it is never mistaken for a bound on
    a non-private release; ``dp = 0`` marks such rounds and a mean ``dp`` below 1 across
    factories shows that some updates were not private.

    ``attack`` (simulation only): if it names ``factory_id`` as malicious, a ``label_flip``
    trains on poisoned labels and a model-poisoning attack replaces the trained weights with
    poisoned ones; privacy is accounted as for an honest round. The metrics then carry
    ``malicious``. ``None`` (the default) or an attack on other factories changes nothing.

    Raises:
        standard_models.base.DataValidationError: the data file is missing or malformed.
        fl_client.privacy.LedgerError: the ledger file is corrupt or not this factory's.
        fl_client.privacy.BudgetExhausted: the round would overspend; nothing was trained.
    """
    if server_round < 1 or planned_rounds < 1:
        raise ValueError(
            f"server_round and planned_rounds must be >= 1, got {server_round}, {planned_rounds}"
        )
    frame = task.load_frame(data_path)
    dataset = task.to_train_dataset(frame, privacy_unit)
    malicious = attack is not None and attack.is_malicious(factory_id)
    if malicious and attack is not None and attack.name in DATA_ATTACKS:
        dataset = poison_dataset(task, dataset, attack.fraction, attack.label_generator(factory_id))
    num_examples = len(dataset)  # type: ignore[arg-type]

    model = task.build_model()
    model.load_state_dict(global_state)
    # Vary the non-private randomness (data order, dropout) from round to round.
    cfg = replace(train_cfg, seed=train_cfg.seed + server_round)

    ledger_path = Path(ledger_path)
    if not cfg.dp:
        if ledger_path.exists():
            ledger = PrivacyLedger.open(ledger_path, factory_id, epsilon_budget, delta, accountant)
            ledger.absorb(carried_history)
            history = ledger.history_as_lists()
            epsilon = ledger.spent_epsilon()
        else:
            history = [list(e) for e in normalize_history(carried_history)]
            epsilon = epsilon_of(history, delta, accountant)
        result = train_local(
            model,
            dataset,
            task.loss_fn(),
            cfg,
            noise_multiplier=None,
            global_state=global_state,
            supports_ghost=task.supports_ghost,
        )
        metrics = _metrics(result, epsilon, delta, False)
        state = _attacked(result.state_dict, global_state, attack, factory_id, server_round)
        _mark(metrics, attack, malicious)
        return FactoryRoundResult(state, metrics, history)

    ledger = PrivacyLedger.open(ledger_path, factory_id, epsilon_budget, delta, accountant)
    ledger.absorb(carried_history)
    sample_rate = sample_rate_for(num_examples, cfg.batch_size)
    round_steps = cfg.local_epochs * steps_per_epoch(num_examples, cfg.batch_size)
    left = ledger.budget - ledger.spent_epsilon()
    if str(run_id) not in ledger.runs and left < min_run_epsilon:
        raise BudgetExhausted(
            ledger.spent_epsilon(),
            ledger.budget,
            delta,
            f"only {left:.3g} of the budget is left, below the minimum {min_run_epsilon:g} "
            "worth starting a run with",
        )
    noise_multiplier = ledger.noise_multiplier_for_run(
        run_id, sample_rate, planned_rounds * round_steps
    )
    epsilon = ledger.reserve_round(run_id, server_round, noise_multiplier, sample_rate, round_steps)

    result = train_local(
        model,
        dataset,
        task.loss_fn(),
        cfg,
        noise_multiplier=noise_multiplier,
        global_state=global_state,
        supports_ghost=task.supports_ghost,
    )
    if result.steps != round_steps or result.sample_rate != sample_rate:
        raise RuntimeError(
            f"trained {result.steps} steps at sample rate {result.sample_rate}; "
            f"reserved {round_steps} at {sample_rate}"
        )
    metrics = _metrics(result, epsilon, delta, True)
    _mark(metrics, attack, malicious)
    return FactoryRoundResult(
        _attacked(result.state_dict, global_state, attack, factory_id, server_round),
        metrics,
        ledger.history_as_lists(),
    )
