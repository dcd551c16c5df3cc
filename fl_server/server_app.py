"""The operator's ServerApp: strategy from config, central evaluation, the run's records.

A round's data flow: the server builds one :class:`~fl_common.protocol.TrainInstruction` from
the config (:func:`train_instruction`); the wrapped Flower strategy sends it with the global
model to the factories, validates their replies, scores each accepted factory's contribution,
aggregates and hands the round's :class:`~strategies.reports.RoundRecord` to the
:class:`~fl_server.recorder.RoundRecorder`; the server then evaluates the new global model on
its validation set and the recorder writes the round (MLflow batch, payout into the
hash-chained ledger, failures, checkpoint, run state). After the last round the server scores
the model on its test set, logs it and writes ``summary.json``.

One job, a run from config to summary on the operator's side; its length is the run's two ends
(opening the MLflow run, resuming, and finishing: test scores, model logging, statements).
"""

from __future__ import annotations

import getpass
import json
import tempfile
import traceback
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from fl_common.protocol import TrainInstruction
from fl_server.checkpoint import load_latest, load_run_state, save_run_state
from fl_server.config import (
    flat_params,
    load_from_run_config,
    malicious_factories,
    train_recipe,
)
from fl_server.data import ensure_data
from fl_server.recorder import RoundRecorder, final_test_metrics
from fl_server.report import run_description, save_plots
from fl_server.rewards.desk import LEDGER_FILE, PayoutDesk, reward_policy
from fl_server.rewards.ledger import audit_ledger
from fl_server.rewards.statements import export_statements, factory_statement, known_factories
from fl_server.rundir import server_run_dir_lock
from fl_server.tracking import NOTE_TAG, MlflowTracker
from standard_models.base import StandardTask
from standard_models.registry import get_task
from strategies.client_dp import ClientDPBudget, client_dp_budget, wrap_client_dp
from strategies.contribution.scorer import build_scorer
from strategies.hooked import FactoryFedStrategy
from strategies.validation import ValidationRules

app = ServerApp()


class NothingTrained(RuntimeError):
    """No round of the run accepted a single update: the run produced no trained model."""


def train_instruction(cfg: DictConfig, run_id: str) -> TrainInstruction:
    """What every factory receives with the global model; Flower's strategy sets the round."""
    t, p = cfg.task.train, cfg.privacy
    batch_size, lr = train_recipe(t, bool(p.enabled))
    return TrainInstruction(
        task=str(cfg.task.name),
        run_id=run_id,
        planned_rounds=int(cfg.federation.num_rounds),
        local_epochs=int(t.local_epochs),
        batch_size=batch_size,
        lr=lr,
        momentum=float(t.momentum),
        dp=bool(p.enabled),
        epsilon=float(p.epsilon) if p.enabled else 0.0,
        delta=float(p.delta),
        accountant=str(p.accountant),
        max_grad_norm=float(p.max_grad_norm),
        grad_sample_mode=str(p.grad_sample_mode),
        min_run_epsilon=float(p.min_run_epsilon),
        seed=int(cfg.seed),
        record_sketch_required=validation_rules(cfg).require_record_sketch,
        # Simulation hints only: factories with a node config never read them.
        data_dir=str(cfg.data_dir),
        output_dir=str(cfg.output_dir),
        **attack_fields(cfg),
    )


def resumable_state(out_dir: Path) -> tuple[dict, dict | None] | None:
    """The run state and latest checkpoint (None before round 0 was saved) of an unfinished run.

    A folder whose run finished (``summary.json`` exists) is refused rather than overwritten:
    its ledger and checkpoints belong to that run.
    """
    state = load_run_state(out_dir)
    if state is None:
        return None
    if (out_dir / "summary.json").exists():
        raise RuntimeError(
            f"output folder {out_dir} holds a finished run (MLflow run "
            f"{state['mlflow_run_id']}); give the new run its own output folder"
        )
    return state, load_latest(out_dir / "checkpoints")


def validation_rules(cfg: DictConfig) -> ValidationRules:
    """``cfg.validation`` as rules; a missing group (older configs) means the defaults."""
    options = cfg.get("validation") or {}
    return ValidationRules(
        max_update_norm=options.get("max_update_norm"),
        max_num_examples=options.get("max_num_examples"),
        reject_unchanged=bool(options.get("reject_unchanged", True)),
        require_record_sketch=bool(options.get("require_record_sketch", False)),
    )


def attack_fields(cfg: DictConfig) -> dict[str, str | float]:
    """The instruction's ``attack*`` fields (simulated robustness benches, fl_client.attacks)."""
    attack = cfg.get("attack")
    if attack is None or str(attack.name) == "none":
        return {"attack": "none", "attack_factories": ""}
    return {
        "attack": str(attack.name),
        "attack_factories": ",".join(malicious_factories(cfg)),
        "attack_fraction": float(attack.get("fraction", 1.0)),
        "attack_factor": float(attack.get("factor", 1.0)),
        "attack_std": float(attack.get("std", 0.0)),
    }


def open_run(
    cfg: DictConfig, tracker: MlflowTracker, model: torch.nn.Module, out_dir: Path
) -> tuple[str, int, dict]:
    """Start the MLflow run, or resume an unfinished one from ``out_dir``.

    Returns the MLflow run id, the round the run resumes after (0 for a new run; ``model``
    then holds that checkpoint's weights) and the saved run state.
    """
    saved = resumable_state(out_dir)
    if saved is not None:
        # A restarted server: same MLflow run, same factories' run id (their privacy ledgers
        # continue), the last checkpoint's weights, the ledger's payouts (never paid twice).
        state, checkpoint = saved
        run_id = tracker.resume(state["mlflow_run_id"])
        offset = 0
        if checkpoint is not None:  # else it crashed before round 0: same initial model (seed)
            offset = int(checkpoint["round"])
            model.load_state_dict(checkpoint["state_dict"])
        log(WARNING, "Resuming MLflow run %s after round %d (from %s)", run_id, offset, out_dir)
        return run_id, offset, state
    run_id = tracker.start(
        str(cfg.run_name),
        flat_params(cfg) | privacy_unit_params(get_task(str(cfg.task.name))),
        tags={
            "task": str(cfg.task.name),
            "strategy": str(cfg.strategy.name),
            "output_dir": str(out_dir),
            "reward_currency": str(cfg.rewards.currency),
            "privacy_unit": get_task(str(cfg.task.name)).privacy_unit.name,
            "mlflow.source.name": "factoryfed ServerApp (fl_server.server_app)",
            "mlflow.source.type": "LOCAL",
            "mlflow.user": _user(),
        },
    )
    tracker.log_text(OmegaConf.to_yaml(cfg), "config/resolved.yaml")
    state = {"mlflow_run_id": run_id, "history": [], "failures": []}
    save_run_state(out_dir, state)
    log(INFO, "MLflow run %s (%s) in %s", run_id, cfg.run_name, cfg.tracking.uri)
    return run_id, 0, state


def privacy_unit_params(task: StandardTask) -> dict[str, str]:
    """The run's privacy-unit params: the unit the task declares (what every epsilon of the
    run counts unless a factory chose a coarser one) and the coarser units a factory may choose
    in its node config (each factory's own choice is logged when it reports it)."""
    return {
        "privacy_unit": task.privacy_unit.name,
        "privacy_unit_choice": "declared",
        "privacy_units_coarser": ", ".join(task.unit_names()[1:]) or "none",
    }


def _user() -> str:
    """The operator's login name for the run's "Created by" (``unknown`` where there is none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run_summary(
    cfg: DictConfig,
    task: StandardTask,
    recorder: RoundRecorder,
    budget: ClientDPBudget | None,
    test_scores: dict | None = None,
) -> dict:
    """What the run recorded so far, in the shape of ``summary.json`` (the description's and
    the plots' input; see :mod:`fl_server.report`)."""
    desk = recorder.desk
    p = cfg.privacy
    return {
        "mlflow_run_id": recorder.run_id,
        "run_name": str(cfg.run_name),
        "tracking_uri": str(cfg.tracking.uri),
        "task": str(cfg.task.name),
        "strategy": str(cfg.strategy.name),
        "main_metric": task.main_metric,
        "rounds": recorder.history,
        "test": dict(test_scores or {}),
        "factory_epsilon": recorder.factory_epsilon,
        "epsilon_budget": float(p.epsilon) if p.enabled else None,
        "privacy": {
            "enabled": bool(p.enabled),
            "epsilon": float(p.epsilon),
            "delta": float(p.delta),
            "unit": task.privacy_unit.name,
            "units": task.unit_names(),
            "min_run_epsilon": float(p.min_run_epsilon),
        },
        "factory_privacy": recorder.factory_privacy,
        "training": training_settings(cfg),
        "rounds_run": recorder.num_rounds,
        "epsilon_client_level": budget.epsilon(recorder.num_rounds) if budget else None,
        "failures": recorder.failures,
        "factory_rounds": recorder.factory_rounds,
        "contribution": str(cfg.contribution.method),
        "contribution_cumulative": desk.book.cumulative_contribution if desk else {},
        "payout_cumulative": desk.book.cumulative_payout if desk else {},
        "reward_currency": str(cfg.rewards.currency),
        "reward_carry": desk.book.carry if desk else None,
        "ledger": str(desk.path) if desk else None,
        "ledger_head": desk.ledger.head() if desk else None,
    }


def training_settings(cfg: DictConfig) -> dict:
    """What every factory was told to train with (the instruction's values, not the config's
    two recipes): ``batch_size``, ``lr``, ``local_epochs`` and ``recipe``, ``dp`` when the
    task's DP-SGD recipe (``task.train.dp_batch_size``/``dp_lr``) replaced a plain value."""
    t = cfg.task.train
    dp = bool(cfg.privacy.enabled)
    batch_size, lr = train_recipe(t, dp)
    differs = (batch_size, lr) != train_recipe(t, dp=False)
    return {
        "batch_size": batch_size,
        "lr": lr,
        "local_epochs": int(t.local_epochs),
        "recipe": "dp" if dp and differs else "plain",
    }


def rounds_within_budget(num_rounds: int, budget: ClientDPBudget | None) -> int:
    """``num_rounds``, cut to what the client-level DP ``budget`` (if any) allows.

    Refuses to start (raises) when not even one round fits the budget.
    """
    if budget is None:
        return num_rounds
    budget.check(1)
    if budget.max_rounds < num_rounds:
        log(
            WARNING,
            "Client-level DP: epsilon %.2f allows %d of the %d planned rounds; the run "
            "stops after round %d so no model past the budget is ever released",
            budget.epsilon_budget,
            budget.max_rounds,
            num_rounds,
            budget.max_rounds,
        )
        return budget.max_rounds
    return num_rounds


def run_federation(grid: Grid, cfg: DictConfig) -> dict:
    """Run the whole federation described by ``cfg``; returns the summary written to disk."""
    torch.manual_seed(int(cfg.seed))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir, made = ensure_data(cfg)
    if made:
        log(INFO, "Generated factory data in %s", data_dir)

    task = get_task(str(cfg.task.name))
    validation = task.to_dataset(task.load_frame(data_dir / "validation.parquet"))
    model = task.build_model()
    tracker = MlflowTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    run_id, offset, state = open_run(cfg, tracker, model, out_dir)

    client_dp = cfg.get("client_dp") or {"mode": "none"}
    num_factories = int(cfg.federation.num_factories)
    inner = wrap_client_dp(instantiate(cfg.strategy.flower), client_dp, num_factories)
    budget = client_dp_budget(client_dp, num_factories)
    num_rounds = rounds_within_budget(int(cfg.federation.num_rounds), budget)
    scorer = build_scorer(cfg, task, validation)
    desk = (
        PayoutDesk(reward_policy(cfg, num_rounds), out_dir / LEDGER_FILE, run_id)
        if scorer
        else None
    )
    recorder = RoundRecorder(
        tracker,
        out_dir,
        run_id,
        num_rounds,
        task.main_metric,
        desk=desk,
        client_dp_budget=budget,
        history=state["history"],
        failures=state["failures"],
        resumed_round=offset if offset > 0 else None,
        epsilon_budget=float(cfg.privacy.epsilon) if cfg.privacy.enabled else None,
        factory_rounds=state.get("factory_rounds"),
        privacy_units=task.unit_names(),
    )
    if scorer is not None:  # a resumed run's guards continue from its recorded rounds
        scorer.resume(recorder.factory_rounds)

    def describe(server_round: int) -> None:
        """Refresh the run's description after each round (one tag write)."""
        tracker.set_tags({NOTE_TAG: run_description(run_summary(cfg, task, recorder, budget))})

    recorder.on_round = describe
    strategy = FactoryFedStrategy(
        inner,
        rules=validation_rules(cfg),
        min_accepted=int(cfg.federation.min_factories),
        scorer=scorer,
        round_offset=offset,
        on_round=recorder.receive,
    )

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation of the round's global model, then the round's records."""
        model.load_state_dict(arrays.to_torch_state_dict())
        scores = task.evaluate(model, validation)
        recorder.record(server_round, scores, model.state_dict())
        return MetricRecord({k: float(v) for k, v in scores.items()})

    status = "FAILED"
    try:
        if num_rounds > offset:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=num_rounds - offset,
                timeout=float(cfg.federation.round_timeout),
                train_config=train_instruction(cfg, run_id).to_record(),
                evaluate_fn=evaluate,
            )
        # `model` holds the final global weights: `evaluate` loaded them after the last round
        # (Flower's Result.arrays stays empty if no round ever aggregated).
        if recorder.accepted_updates() == 0:
            raise NothingTrained(
                f"no round accepted an update from any factory in {num_rounds} round(s), so "
                "the run trained nothing; see failures.json for each factory's reason"
            )
        summary = finish(cfg, tracker, task, model, validation, data_dir, recorder, budget)
        status = "FINISHED"
        return summary
    except Exception as exc:
        log(WARNING, "Federation failed:\n%s", traceback.format_exc())
        record_failure(tracker, recorder, run_summary(cfg, task, recorder, budget), exc)
        raise
    finally:
        tracker.end(status)


def record_failure(
    tracker: MlflowTracker, recorder: RoundRecorder, summary: dict, exc: BaseException
) -> None:
    """Say why the run failed where an operator looks first: its description and a tag, with
    ``failures.json``. Best effort: a tracking store that is itself the failure is left be."""
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    try:
        recorder.log_failures()
        tracker.set_tags(
            {"failure_reason": reason, NOTE_TAG: run_description(summary, failure=reason)}
        )
    except Exception:  # noqa: BLE001 - the original error is what the caller re-raises
        log(WARNING, "Could not record the failure in MLflow:\n%s", traceback.format_exc())


def log_statements(
    tracker: MlflowTracker, summary: dict, desk: PayoutDesk, out_dir: Path
) -> list[Path]:
    """Every paid factory's statement of this run (CSV, JSON, PNG) under
    ``rewards/statements/`` in MLflow and ``statements/`` in the run's folder."""
    entries, verification = audit_ledger(desk.path)
    folder = out_dir / "statements"
    context = {
        "run_name": summary["run_name"],
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "currency": summary["reward_currency"],
        "epsilon_budget": summary["epsilon_budget"],
        "privacy_unit": summary["privacy"]["unit"],
        "factory_epsilon": summary["factory_epsilon"],
        "factory_privacy": summary.get("factory_privacy") or {},
    }
    docs = [
        factory_statement(entries, fid, verification, run_id=desk.run_id, context=context)
        for fid in known_factories(entries, desk.run_id)
    ]
    paths = export_statements(docs, folder)
    if paths:
        tracker.log_artifacts(folder, "rewards/statements")
    return paths


def model_version_description(summary: dict) -> str:
    """What a registered version is: its run, task, test score, privacy and ledger head."""
    metric = summary["main_metric"]
    eps = summary["factory_epsilon"]
    privacy = (
        f"sample-level DP, largest factory epsilon {max(eps.values()):.3f} of "
        f"{summary['epsilon_budget']:g} per {summary['privacy']['unit']}"
        if summary["privacy"]["enabled"] and eps
        else "no sample-level DP"
    )
    return (
        f"factoryfed run {summary['run_name']} (MLflow run {summary['mlflow_run_id']}): task "
        f"{summary['task']}, strategy {summary['strategy']}, "
        f"{len(summary['factory_rounds'])} rounds; test {metric} "
        f"{summary['test'].get(metric, float('nan')):.4f}; {privacy}; reward ledger head "
        f"{summary['ledger_head'] or '(no rewards)'}"
    )


def finish(
    cfg: DictConfig,
    tracker: MlflowTracker,
    task: StandardTask,
    model: torch.nn.Module,
    validation: Dataset,
    data_dir: Path,
    recorder: RoundRecorder,
    budget: ClientDPBudget | None,
) -> dict:
    """Score the final model on the test set, log it and everything an operator reads about
    the run (plots, statements, failures, description), and write ``summary.json``."""
    out_dir = recorder.out_dir
    num_rounds = recorder.num_rounds
    desk = recorder.desk
    test = task.to_dataset(task.load_frame(data_dir / "test.parquet"))
    test_scores = task.evaluate(model, test)
    # Logged at the final step before the model, so MLflow links the model to these metrics.
    tracker.log_metrics(num_rounds, final_test_metrics(test_scores))
    summary = run_summary(cfg, task, recorder, budget, test_scores)
    registered = f"factoryfed-{cfg.task.name}" if cfg.tracking.register_model else None
    example = torch.stack([validation[i][0] for i in range(min(4, len(validation)))])
    version = tracker.log_model(
        model.eval(),
        example.numpy(),
        registered,
        step=num_rounds,
        description=model_version_description(summary),
        tags={
            "task": summary["task"],
            "strategy": summary["strategy"],
            f"test_{task.main_metric}": f"{test_scores[task.main_metric]:.4f}",
            "privacy_unit": summary["privacy"]["unit"],
            "ledger_head": summary["ledger_head"] or "",
        },
    )
    summary.update(registered_model=registered, model_version=version)
    recorder.log_failures()
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifacts(save_plots(summary, tmp)[0].parent, "plots")
    if desk is not None:
        log_statements(tracker, summary, desk, out_dir)
    tracker.set_tags({NOTE_TAG: run_description(summary)})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tracker.log_dict(summary, "summary.json")
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: config from the run config, then the federation."""
    cfg = load_from_run_config(context.run_config)
    # Started by experiments.run, the runner already holds the folder's lock for this config
    # file; started directly by `flwr run`, the ServerApp takes it so no other run shares it.
    config_file = str(context.run_config.get("config-file", "") or "") or None
    with server_run_dir_lock(Path(cfg.output_dir), config_file):
        run_federation(grid, cfg)
