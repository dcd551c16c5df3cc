"""A factory's whole training round: load its data, account privacy, train, report.

This is plain Python with no Flower runtime so it can be tested and reused on its own: the
round is described by the server's :class:`~fl_common.protocol.TrainInstruction` and the
factory's own :class:`FactorySite` (who it is, where its data and privacy ledger are, its
budget); the ClientApp parses the one and builds the other from its node config.

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

from dataclasses import dataclass, field
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
from fl_common.protocol import (
    DELTA,
    DP,
    EPSILON,
    MALICIOUS,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    SAMPLE_RATE,
    STEPS,
    TRAIN_LOSS,
    TRAIN_TIME,
    TrainInstruction,
)
from standard_models.base import StandardTask


@dataclass(frozen=True)
class FactorySite:
    """What only the factory decides: its name, where its data and ledger live, its budget.

    ``epsilon_budget``/``delta`` are the factory's own privacy budget (its node config), or
    the federation's default from the instruction when the factory sets none.
    """

    factory_id: str
    data_path: Path
    ledger_path: Path
    epsilon_budget: float
    delta: float


def local_seed(instruction: TrainInstruction) -> int:
    """The seed of the round's non-private randomness (data order, dropout).

    Distinct for every round of a run (up to 999 rounds) and reproducible from the run seed:
    ``1000 * seed + server_round``.
    """
    return 1000 * instruction.seed + instruction.server_round


def local_train_config(
    instruction: TrainInstruction, reproducible_dp: bool = False
) -> LocalTrainConfig:
    """The round's local training hyper-parameters, from the server's instruction.

    ``reproducible_dp`` derives the DP noise and sampling from the seed too: tests and
    benchmarks only (see :class:`~fl_client.training.LocalTrainConfig`).
    """
    return LocalTrainConfig(
        local_epochs=instruction.local_epochs,
        batch_size=instruction.batch_size,
        lr=instruction.lr,
        momentum=instruction.momentum,
        max_grad_norm=instruction.max_grad_norm,
        proximal_mu=instruction.proximal_mu,
        dp=instruction.dp,
        grad_sample_mode=instruction.grad_sample_mode,
        seed=local_seed(instruction),
        reproducible_dp=reproducible_dp,
    )


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


def _metrics(result: TrainResult, epsilon: float, delta: float, dp: bool) -> dict[str, float | int]:
    return {
        NUM_EXAMPLES: int(result.num_examples),
        TRAIN_LOSS: float(result.train_loss),
        EPSILON: float(epsilon),
        DELTA: float(delta),
        NOISE_MULTIPLIER: float(result.noise_multiplier),
        SAMPLE_RATE: float(result.sample_rate),
        STEPS: int(result.steps),
        TRAIN_TIME: float(result.train_seconds),
        DP: int(dp),
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
        metrics[MALICIOUS] = 1.0 if malicious else 0.0


def run_factory_round(
    task: StandardTask,
    instruction: TrainInstruction,
    site: FactorySite,
    global_state: dict[str, torch.Tensor],
    carried_history: list[Any] | None = None,
    attack: AttackConfig | None = None,
    reproducible_dp: bool = False,
    privacy_unit: str | None = None,
) -> FactoryRoundResult:
    """Train one federated round at one factory and account its privacy spend.

    Epsilon, sample rate and steps count the task's privacy unit (``privacy_unit``, default
    the unit the task declares; see ``StandardTask.to_train_dataset``).

    With ``instruction.dp`` the run's noise multiplier is planned once, from the budget left in
    the ledger, for ``planned_rounds * local_epochs * steps_per_epoch`` steps; each round then
    reserves its steps on disk before training. A round that would take the cumulative epsilon
    above the site's ``epsilon_budget`` (including rounds beyond ``planned_rounds``, or a budget
    already spent by earlier runs) raises :class:`~fl_client.privacy.BudgetExhausted` without
    training. So does a new run when less than ``min_run_epsilon`` of the budget is left: the
    noise that so little budget buys would make its updates harm the global model rather than
    help it.

    Without DP nothing is spent and ``noise_multiplier`` is 0, but the round's update carries
    no formal guarantee at all. The ``epsilon`` metric then still reports the DP spend recorded
    so far (0.0 if this factory never trained with DP), so it is never mistaken for a bound on
    a non-private release; ``dp = 0`` marks such rounds and a mean ``dp`` below 1 across
    factories shows that some updates were not private.

    ``carried_history`` is the accountant history the ClientApp kept in its node state (adopted
    when longer than the ledger's). ``attack`` (simulation only): if it names the factory as
    malicious, a ``label_flip`` trains on poisoned labels and a model-poisoning attack replaces
    the trained weights with poisoned ones; privacy is accounted as for an honest round. The
    metrics then carry ``malicious``. ``None`` (the default) or an attack on other factories
    changes nothing.

    Raises:
        standard_models.base.DataValidationError: the data file is missing or malformed.
        fl_client.privacy.LedgerError: the ledger file is corrupt or not this factory's.
        fl_client.privacy.BudgetExhausted: the round would overspend; nothing was trained.
    """
    server_round, planned_rounds = instruction.server_round, instruction.planned_rounds
    if server_round < 1 or planned_rounds < 1:
        raise ValueError(
            f"server_round and planned_rounds must be >= 1, got {server_round}, {planned_rounds}"
        )
    factory_id, run_id = site.factory_id, instruction.run_id
    delta, accountant = site.delta, instruction.accountant
    frame = task.load_frame(site.data_path)
    dataset = task.to_train_dataset(frame, privacy_unit)
    malicious = attack is not None and attack.is_malicious(factory_id)
    if malicious and attack is not None and attack.name in DATA_ATTACKS:
        dataset = poison_dataset(task, dataset, attack.fraction, attack.label_generator(factory_id))
    num_examples = len(dataset)  # type: ignore[arg-type]

    model = task.build_model()
    model.load_state_dict(global_state)
    cfg = local_train_config(instruction, reproducible_dp)

    ledger_path = Path(site.ledger_path)
    if not cfg.dp:
        if ledger_path.exists():
            ledger = PrivacyLedger.open(
                ledger_path, factory_id, site.epsilon_budget, delta, accountant
            )
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

    ledger = PrivacyLedger.open(ledger_path, factory_id, site.epsilon_budget, delta, accountant)
    ledger.absorb(carried_history)
    sample_rate = sample_rate_for(num_examples, cfg.batch_size)
    round_steps = cfg.local_epochs * steps_per_epoch(num_examples, cfg.batch_size)
    left = ledger.budget - ledger.spent_epsilon()
    min_run_epsilon = instruction.min_run_epsilon
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
