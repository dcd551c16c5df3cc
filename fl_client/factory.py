"""A factory's whole training round: load its data, account privacy, train, report.

This is plain Python with no Flower runtime so it can be tested and reused on its own: the
round is described by the server's :class:`~fl_common.protocol.TrainInstruction` and the
factory's own :class:`FactorySite` (who it is, where its data and privacy ledger are, its
budget); the ClientApp parses the one and builds the other from its node config.

Order of a DP round, chosen so that privacy spend is never lost or exceeded:

0. for a deployed factory, check the instruction against the factory's privacy policy
   (:mod:`fl_client.policy`) and decline with :class:`~fl_client.policy.PolicyDeclined`
   before any data is read or the ledger written (a noise floor or per-round ceiling is
   checked on the plan made from the file's row count, read from Parquet metadata);
1. load and validate the factory's file (errors name the file and column) and, when the
   site has a sketch key, hash its records into the keyed sketch the reply carries
   (:mod:`fl_common.sketch`);
2. open the ledger on the factory's disk and adopt any longer history the caller carried;
3. plan the run's noise multiplier once from the budget left (later rounds reuse it);
4. reserve this round's spend on disk, or decline with :class:`BudgetExhausted`;
5. train.

In simulated robustness benches a factory the server names as malicious poisons its training
labels (after step 1, on the in-memory dataset) or its trained weights (after step 5); see
:mod:`fl_client.attacks`. Every other factory runs exactly the steps above.

One job, the factory's round; its length is the privacy steps 0-4, each checked before training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from fl_client.attacks import (
    DATA_ATTACKS,
    UPDATE_ATTACKS,
    AttackConfig,
    poison_dataset,
    poison_update,
)
from fl_client.policy import POLICY_PREFIX, PolicyDeclined, PrivacyPolicy, plan_refusal, refusal
from fl_client.privacy import (
    BudgetExhausted,
    PrivacyLedger,
    epsilon_of,
    normalize_history,
    plan_noise_multiplier,
)
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
from fl_common.sketch import record_fingerprint
from standard_models.base import DataValidationError, StandardTask


@dataclass(frozen=True)
class FactorySite:
    """What only the factory decides: its name, where its data and ledger live, its privacy.

    ``epsilon_budget``/``delta`` are the factory's own privacy budget (its node config), or
    the federation's default from the instruction when the factory sets none.
    ``accountant``: the factory's accountant; ``None`` takes the instruction's (simulation).
    ``epsilon_cap``: a stricter cumulative epsilon for this session (the server asked for less
    than the budget); the ledger keeps ``epsilon_budget`` as its lifetime budget.
    ``privacy_unit``: the unit the factory's epsilon protects when it chose one coarser than
    the task's declared unit (node config ``privacy-unit``); ``None`` keeps the task's.
    ``policy``: the factory's privacy policy, checked before anything is read; ``None`` (a
    caller that builds the site by hand) checks nothing.
    ``sketch_key``: the key the factories share for record sketches
    (:func:`~fl_common.sketch.record_fingerprint`); ``None`` sends no sketch.
    """

    factory_id: str
    data_path: Path
    ledger_path: Path
    epsilon_budget: float
    delta: float
    accountant: str | None = None
    epsilon_cap: float | None = None
    privacy_unit: str | None = None
    policy: PrivacyPolicy | None = None
    sketch_key: str | None = None


def local_seed(instruction: TrainInstruction) -> int:
    """The seed of the round's non-private randomness (data order, dropout).

    Distinct for every round of a run (up to 999 rounds) and reproducible from the run seed:
    ``1000 * seed + server_round``.
    """
    return 1000 * instruction.seed + instruction.server_round


def reproducible_dp_seed(instruction: TrainInstruction, factory_id: str) -> int:
    """The seed of a factory's DP noise and sampling in a reproducible (benchmark) round.

    Derived from the round's :func:`local_seed` *and* the factory, so factories simulated side
    by side draw independent noise, as real factories (OS entropy) do: with one shared seed
    every factory would add the same noise vector, which would not average out in the
    aggregate and would make honest updates look alike.
    """
    digest = hashlib.sha256(f"{local_seed(instruction)}/{factory_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def local_train_config(
    instruction: TrainInstruction, reproducible_dp: bool = False, factory_id: str | None = None
) -> LocalTrainConfig:
    """The round's local training hyper-parameters, from the server's instruction.

    ``reproducible_dp`` derives the DP noise and sampling from the seed and ``factory_id``
    too (:func:`reproducible_dp_seed`): tests and benchmarks only (see
    :class:`~fl_client.training.LocalTrainConfig`).
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
        dp_seed=(
            reproducible_dp_seed(instruction, factory_id)
            if reproducible_dp and factory_id is not None
            else None
        ),
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
    ``record_sketch``: the keyed sketch of the records the factory holds (empty without a
    ``sketch_key``).
    """

    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    history: list[list[float | int]] = field(default_factory=list)
    record_sketch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))


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


def row_count(data_path: Path) -> int:
    """Number of rows of the factory's Parquet file, read from its footer, not its data.

    Planning the run's noise needs the number of examples, and a policy check must decline
    before any of the factory's production data is read. Every example uses at least one row,
    so the row count bounds the number of examples (and of privacy units) from above.

    Raises:
        DataValidationError: the file is missing or not Parquet.
    """
    try:
        return int(pq.read_metadata(data_path).num_rows)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataValidationError(data_path, f"cannot read the Parquet footer: {exc}") from exc


def _open_ledger(site: FactorySite, accountant: str) -> PrivacyLedger:
    """The factory's ledger, with the session's stricter cap when the server asked for one.

    The ledger stores the factory's lifetime budget; a stricter cap is a session budget, which
    :meth:`PrivacyLedger.open` grants only on an existing file, so a new ledger is first saved
    with the lifetime budget (it would be saved when the run is planned anyway).
    """
    ledger = PrivacyLedger.open(
        site.ledger_path, site.factory_id, site.epsilon_budget, site.delta, accountant
    )
    cap = site.epsilon_cap
    if cap is None or cap >= ledger.budget:
        return ledger
    if not Path(site.ledger_path).exists():
        ledger.save()
    return PrivacyLedger.open(site.ledger_path, site.factory_id, cap, site.delta, accountant)


def planned_noise(
    ledger: PrivacyLedger,
    instruction: TrainInstruction,
    num_examples: int,
) -> tuple[float, float]:
    """The run's noise multiplier and one round's epsilon, without writing the ledger.

    The same plan :meth:`PrivacyLedger.noise_multiplier_for_run` makes (or the one it made for
    this run already): :func:`~fl_client.privacy.plan_noise_multiplier` over the ledger's
    history at its budget, for ``planned_rounds * local_epochs * steps_per_epoch`` steps.

    Raises:
        BudgetExhausted: the budget left cannot cover the planned steps.
    """
    sample_rate = sample_rate_for(num_examples, instruction.batch_size)
    round_steps = instruction.local_epochs * steps_per_epoch(num_examples, instruction.batch_size)
    plan = ledger.runs.get(str(instruction.run_id))
    if plan is not None:
        sigma = float(plan["noise_multiplier"])
    else:
        sigma = plan_noise_multiplier(
            ledger.history,
            target_epsilon=ledger.budget,
            delta=ledger.delta,
            sample_rate=sample_rate,
            planned_steps=instruction.planned_rounds * round_steps,
            accountant=ledger.accountant,
        )
    round_epsilon = epsilon_of([(sigma, sample_rate, round_steps)], ledger.delta, ledger.accountant)
    return sigma, round_epsilon


def check_policy(
    site: FactorySite,
    instruction: TrainInstruction,
    num_examples: int | None = None,
    rows_are_units: bool = True,
) -> None:
    """Decline an instruction that would weaken the site's policy; read no data, write nothing.

    Any factory, simulated or deployed, also declines a federation that requires record
    sketches when it has no ``sketch_key`` (its node config holds no ``record-sketch-key``):
    the server would reject its update, so training it would spend budget for nothing.

    ``num_examples``: the true number of training units once the data is loaded; ``None``
    plans from the file's :func:`row_count`, which is the unit count exactly when every row
    is one unit (``rows_are_units``: a shot, an image). Where a unit holds several rows (a
    window of samples, a machine) the row count only bounds the units from above, and the
    plan it gives is the least noisy one, so it could decline what the true count passes:
    then only the fields that need no count are checked here, and :func:`run_factory_round`
    checks the plan with the true count after loading, still before the ledger is written or
    anything is trained.

    Raises:
        PolicyDeclined: the instruction (or the noise it would plan) breaks the policy.
        BudgetExhausted: the budget left cannot cover the planned steps.
    """
    if instruction.record_sketch_required and site.sketch_key is None:
        raise PolicyDeclined(
            f"{POLICY_PREFIX}'record-sketch-key' is not set, and this federation accepts only "
            "replies that carry the factory's record sketch (instruction "
            "'record-sketch-required'); set the key the factories agreed among themselves to "
            "take part",
            "record-sketch-required",
        )
    policy = site.policy
    if policy is None:
        return
    declined = refusal(policy, instruction)
    if declined is not None:
        raise declined
    if not policy.limits_noise or (num_examples is None and not rows_are_units):
        return
    n = row_count(site.data_path) if num_examples is None else num_examples
    ledger = _open_ledger_readonly(site, str(policy.accountant))
    declined = plan_refusal(policy, *planned_noise(ledger, instruction, n))
    if declined is not None:
        raise declined


def _open_ledger_readonly(site: FactorySite, accountant: str) -> PrivacyLedger:
    """The ledger as :func:`_open_ledger` would give it, without ever writing the file."""
    ledger = PrivacyLedger.open(
        site.ledger_path, site.factory_id, site.epsilon_budget, site.delta, accountant
    )
    cap = site.epsilon_cap
    if cap is not None and cap < ledger.budget:
        if Path(site.ledger_path).exists():
            return PrivacyLedger.open(
                site.ledger_path, site.factory_id, cap, site.delta, accountant
            )
        ledger = PrivacyLedger(site.ledger_path, site.factory_id, cap, site.delta, accountant)
    return ledger


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

    A site with a deployed ``policy`` first checks the instruction (:func:`check_policy`) and
    declines before reading data or writing the ledger; ``site.accountant`` and
    ``site.epsilon_cap`` then replace the instruction's accountant and budget.

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
        fl_client.policy.PolicyDeclined: the instruction would weaken ``site.policy``;
            nothing was read, trained or written.
    """
    server_round, planned_rounds = instruction.server_round, instruction.planned_rounds
    if server_round < 1 or planned_rounds < 1:
        raise ValueError(
            f"server_round and planned_rounds must be >= 1, got {server_round}, {planned_rounds}"
        )
    unit = privacy_unit or site.privacy_unit
    check_policy(site, instruction, rows_are_units=task.rows_are_units(unit))
    factory_id, run_id = site.factory_id, instruction.run_id
    delta, accountant = site.delta, site.accountant or instruction.accountant
    frame = task.load_frame(site.data_path)
    sketch = np.zeros(0, np.uint64)
    if site.sketch_key is not None:
        sketch = record_fingerprint(frame, site.sketch_key)
    dataset = task.to_train_dataset(frame, unit)
    malicious = attack is not None and attack.is_malicious(factory_id)
    if malicious and attack is not None and attack.name in DATA_ATTACKS:
        dataset = poison_dataset(task, dataset, attack.fraction, attack.label_generator(factory_id))
    num_examples = len(dataset)  # type: ignore[arg-type]

    model = task.build_model()
    model.load_state_dict(global_state)
    cfg = local_train_config(instruction, reproducible_dp, factory_id)

    def train(noise_multiplier: float | None) -> TrainResult:
        return train_local(
            model,
            dataset,
            task.loss_fn(),
            cfg,
            noise_multiplier=noise_multiplier,
            global_state=global_state,
            supports_ghost=task.supports_ghost,
        )

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
        result = train(None)
        metrics = _metrics(result, epsilon, delta, False)
        state = _attacked(result.state_dict, global_state, attack, factory_id, server_round)
        _mark(metrics, attack, malicious)
        return FactoryRoundResult(state, metrics, history, sketch)

    if site.policy is not None and site.policy.limits_noise:
        check_policy(site, instruction, num_examples)  # now with the true unit count
    ledger = _open_ledger(site, accountant)
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

    result = train(noise_multiplier)
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
        sketch,
    )
