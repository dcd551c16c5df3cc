"""The operator's ServerApp: strategy from config, central evaluation, checkpoints, MLflow.

Each round: the wrapped Flower strategy sends the global model and the training config to the
factories, validates their updates, scores each accepted factory's contribution and aggregates;
then the server evaluates the new global model on its validation set, pays the round's rewards
into the hash-chained ledger, logs the round to MLflow in one batch (``server/*`` and
``factory/<id>/*``) and checkpoints the model.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fl_server.checkpoint import load_latest, load_run_state, save_checkpoint, save_run_state
from fl_server.config import flat_params, load_from_run_config, malicious_factories
from fl_server.data import ensure_data
from fl_server.payouts import LEDGER_FILE, PayoutDesk, build_scorer, reward_policy
from fl_server.tracking import MlflowTracker
from standard_models.registry import get_task
from strategies.client_dp import wrap_client_dp
from strategies.hooked import FactoryFedStrategy
from strategies.validation import ValidationRules

INFO, WARNING = 20, 30

app = ServerApp()


def train_config_of(cfg: DictConfig, run_id: str) -> ConfigRecord:
    """What every factory receives with the global model (flat, Flower ConfigRecord types)."""
    t, p = cfg.task.train, cfg.privacy
    return ConfigRecord(
        {
            "task": str(cfg.task.name),
            "run-id": run_id,
            "planned-rounds": int(cfg.federation.num_rounds),
            "local-epochs": int(t.local_epochs),
            "batch-size": int(t.batch_size),
            "lr": float(t.lr),
            "momentum": float(t.momentum),
            "dp": bool(p.enabled),
            "epsilon": float(p.epsilon) if p.enabled else 0.0,
            "delta": float(p.delta),
            "accountant": str(p.accountant),
            "max-grad-norm": float(p.max_grad_norm),
            "grad-sample-mode": str(p.grad_sample_mode),
            "min-run-epsilon": float(p.min_run_epsilon),
            "seed": int(cfg.seed),
            # Simulation hints only: factories with a node config never read them.
            "data-dir": str(cfg.data_dir),
            "output-dir": str(cfg.output_dir),
            **attack_entries(cfg),
        }
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
    )


def attack_entries(cfg: DictConfig) -> dict[str, str | float]:
    """The ``attack-*`` train-config keys (simulated robustness benches; see fl_client.attacks)."""
    attack = cfg.get("attack")
    if attack is None or str(attack.name) == "none":
        return {"attack": "none", "attack-factories": ""}
    return {
        "attack": str(attack.name),
        "attack-factories": ",".join(malicious_factories(cfg)),
        "attack-fraction": float(attack.get("fraction", 1.0)),
        "attack-factor": float(attack.get("factor", 1.0)),
        "attack-std": float(attack.get("std", 0.0)),
    }


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
    saved = resumable_state(out_dir)
    history: list[dict] = []
    failures: list[dict] = []
    offset = 0
    if saved is not None:
        # A restarted server: same MLflow run, same factories' run id (their privacy ledgers
        # continue), the last checkpoint's weights, the ledger's payouts (never paid twice).
        state, checkpoint = saved
        run_id = tracker.resume(state["mlflow_run_id"])
        if checkpoint is not None:  # else it crashed before round 0: same initial model (seed)
            offset = int(checkpoint["round"])
            model.load_state_dict(checkpoint["state_dict"])
        history, failures = list(state["history"]), list(state["failures"])
        log(WARNING, "Resuming MLflow run %s after round %d (from %s)", run_id, offset, out_dir)
    else:
        run_id = tracker.start(
            str(cfg.run_name),
            flat_params(cfg),
            tags={
                "task": str(cfg.task.name),
                "strategy": str(cfg.strategy.name),
                "output_dir": str(out_dir),
            },
        )
        tracker.log_text(OmegaConf.to_yaml(cfg), "config/resolved.yaml")
        save_run_state(out_dir, {"mlflow_run_id": run_id, "history": [], "failures": []})
        log(INFO, "MLflow run %s (%s) in %s", run_id, cfg.run_name, cfg.tracking.uri)

    num_rounds = int(cfg.federation.num_rounds)
    inner = wrap_client_dp(
        instantiate(cfg.strategy.flower),
        cfg.get("client_dp") or {"mode": "none"},
        int(cfg.federation.num_factories),
    )
    budget = getattr(inner, "client_dp_budget", None)
    if budget is not None:
        budget.check(1)  # refuses to start when not even one round fits the budget
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
            num_rounds = budget.max_rounds
    scorer = build_scorer(cfg, task, validation)
    desk = (
        PayoutDesk(reward_policy(cfg, num_rounds), out_dir / LEDGER_FILE, run_id)
        if scorer
        else None
    )
    strategy = FactoryFedStrategy(
        inner,
        rules=validation_rules(cfg),
        min_accepted=int(cfg.federation.min_factories),
        scorer=scorer,
    )
    strategy.round_offset = offset
    round_start = [time.monotonic()]
    main_metric = task.main_metric

    def end_of_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation, MLflow batch, checkpoint and a progress line for one round."""
        server_round = flower_round + offset
        model.load_state_dict(arrays.to_torch_state_dict())
        scores = task.evaluate(model, validation)
        if flower_round == 0 and offset > 0:  # the resumed checkpoint: logged before the crash
            return MetricRecord({k: float(v) for k, v in scores.items()})
        metrics = {f"server/{k}": float(v) for k, v in scores.items()}
        if budget is not None:
            metrics["server/epsilon_client_level"] = budget.epsilon(server_round)
        report = strategy.reports.get(server_round)
        if report is not None:
            metrics.update(report.mlflow_metrics(strategy.known_factories))
            metrics["server/accepted"] = float(len(report.accepted))
            metrics["server/round_seconds"] = time.monotonic() - round_start[0]
            eps = [o.metrics["epsilon"] for o in report.outcomes.values() if "epsilon" in o.metrics]
            if eps:
                metrics["server/epsilon_max"] = max(eps)
            for o in report.failures:
                failures.append(
                    {
                        "round": server_round,
                        "factory": o.factory_id,
                        "status": o.status,
                        "reason": o.reason,
                    }
                )
            if report.failures:
                tracker.log_dict(failures, "failures.json")
            contribution = strategy.contributions.get(server_round)
            if contribution is not None:
                metrics.update(contribution.mlflow_metrics())
            if desk is not None:
                epsilons = {
                    fid: o.metrics["epsilon"]
                    for fid, o in report.outcomes.items()
                    if "epsilon" in o.metrics
                }
                metrics.update(desk.metrics(desk.settle(server_round, contribution, epsilons)))
                tracker.log_artifact(desk.path, "rewards")
                tracker.set_tags({"ledger_head": desk.ledger.head()})
        tracker.log_metrics(server_round, metrics)
        save_checkpoint(
            out_dir / "checkpoints",
            server_round,
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            scores,
        )
        history.append({"round": server_round, **scores})
        save_run_state(out_dir, {"mlflow_run_id": run_id, "history": history, "failures": failures})
        status = report.summary_line() if report else "initial model"
        log(
            INFO,
            "[factoryfed] round %d/%d  %s=%.4f  loss=%.4f  (%s)",
            server_round,
            num_rounds,
            main_metric,
            scores[main_metric],
            scores["loss"],
            status,
        )
        round_start[0] = time.monotonic()
        return MetricRecord({k: float(v) for k, v in scores.items()})

    status = "FAILED"
    try:
        if num_rounds > offset:
            strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=num_rounds - offset,
                timeout=float(cfg.federation.round_timeout),
                train_config=train_config_of(cfg, run_id),
                evaluate_fn=end_of_round,
            )
        # `model` holds the final global weights: end_of_round loaded them after the last
        # round (Flower's Result.arrays stays empty if no round ever aggregated).
        test = task.to_dataset(task.load_frame(data_dir / "test.parquet"))
        test_scores = task.evaluate(model, test)
        tracker.log_metrics(num_rounds, {f"test/{k}": v for k, v in test_scores.items()})
        final_eps = {}
        for r in sorted(strategy.reports):
            for fid, o in strategy.reports[r].outcomes.items():
                if "epsilon" in o.metrics:
                    final_eps[fid] = o.metrics["epsilon"]
        registered = f"factoryfed-{cfg.task.name}" if cfg.tracking.register_model else None
        example = torch.stack([validation[i][0] for i in range(min(4, len(validation)))])
        version = tracker.log_model(model.eval(), example.numpy(), registered)
        summary = {
            "mlflow_run_id": run_id,
            "run_name": str(cfg.run_name),
            "tracking_uri": str(cfg.tracking.uri),
            "task": str(cfg.task.name),
            "strategy": str(cfg.strategy.name),
            "main_metric": main_metric,
            "rounds": history,
            "test": test_scores,
            "factory_epsilon": final_eps,
            "epsilon_budget": float(cfg.privacy.epsilon) if cfg.privacy.enabled else None,
            "rounds_run": num_rounds,
            "epsilon_client_level": budget.epsilon(num_rounds) if budget is not None else None,
            "failures": failures,
            "contribution": str(cfg.contribution.method),
            "contribution_cumulative": desk.book.cumulative_contribution if desk else {},
            "payout_cumulative": desk.book.cumulative_payout if desk else {},
            "reward_currency": str(cfg.rewards.currency),
            "reward_carry": desk.book.carry if desk else None,
            "ledger": str(desk.path) if desk else None,
            "ledger_head": desk.ledger.head() if desk else None,
            "registered_model": registered,
            "model_version": version,
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_dict(summary, "summary.json")
        status = "FINISHED"
        return summary
    except Exception:
        log(WARNING, "Federation failed:\n%s", traceback.format_exc())
        raise
    finally:
        tracker.end(status)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: config from the run config, then the federation."""
    cfg = load_from_run_config(context.run_config)
    run_federation(grid, cfg)
