"""The main job: compose the config with Hydra, make the data, run the federation, summarise.

    python -m experiments.run              # defaults: 4 factories, 5 rounds, DP
    python -m experiments.run task=rul strategy=fedprox privacy.epsilon=3 federation.num_rounds=10
    python -m experiments.run --multirun privacy.epsilon=1,3,8

The federation runs on Flower's simulation engine (``flwr run`` against a simulation-mode
SuperLink, see :mod:`fl_server.launch.simulation`); the ServerApp receives this job's resolved
config, so the same tree in ``conf/`` drives simulation and deployment.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fl_server.config import finalize, quote_choices
from fl_server.config_schema import ConfigError
from fl_server.rundir import RunDirInUse, run_dir_lock
from fl_server.tracking import TrackingUnavailable, check_tracking, mark_run_ended

# torch, Flower and MLflow are imported only once the config and the tracking store passed their
# checks (see `main`): a bad config is refused in about a second, not after those imports.

APP_DIR = Path(__file__).resolve().parent.parent
console = Console()

# Lines of the Flower stream shown on the console (everything goes to flower.log).
_SHOW = re.compile(r"\[factoryfed\]|WARNING|ERROR|Traceback|Error:|Exception:|MLflow run")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's log prefixes ("INFO :   ", "11/26/2026 22:59:14:INFO:"), stripped for display.
_PREFIX = re.compile(r"^(\d+/\d+/\d+ \d+:\d+:\d+(:[A-Z]+:|\W)|[A-Z]+\s+:)\s*")


class FederationFailed(RuntimeError):
    """The federation ran but did not finish; the message points at its log."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can fix from the message alone: shown as one line, without a traceback.

    A data file's error class is included once its module is loaded (it is, whenever such an
    error was raised), so refusing a folder in use never waits for torch to import.
    """
    errors: list[type[BaseException]] = [
        ConfigError,
        TrackingUnavailable,
        RunDirInUse,
        FileNotFoundError,
        FederationFailed,
    ]
    base = sys.modules.get("standard_models.base")
    if base is not None:
        errors.append(base.DataValidationError)
    return tuple(errors)


def end_mlflow_run(out: Path, uri: str, status: str) -> str | None:
    """Mark the MLflow run recorded in ``out`` as ``status`` if it is still RUNNING.

    The ServerApp ends its run itself when it fails; this covers a ServerApp that never got
    there (killed with its SuperLink, or interrupted). Returns the run id it ended, if any.
    """
    from fl_server.checkpoint import load_run_state

    try:
        state = load_run_state(out)
    except (OSError, ValueError):
        return None
    run_id = (state or {}).get("mlflow_run_id")
    if run_id and mark_run_ended(uri, str(run_id), status):
        return str(run_id)
    return None


def run_simulation(cfg: DictConfig, verbose: bool = False) -> dict:
    """Run one federation for a finalised config; returns the ServerApp's summary.

    The output folder is locked for the whole run (a second process targeting it is refused),
    and an MLflow run the federation leaves RUNNING is ended FAILED (KILLED on an interrupt).
    """
    out = Path(cfg.output_dir)
    with run_dir_lock(out, for_config=out / "config.yaml"):
        try:
            return _run_locked(cfg, out, verbose)
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt | SystemExit)
            ended = end_mlflow_run(out, str(cfg.tracking.uri), "KILLED" if stopped else "FAILED")
            if ended:
                console.print(f"MLflow run {ended} ended {'KILLED' if stopped else 'FAILED'}")
            raise


def _run_locked(cfg: DictConfig, out: Path, verbose: bool) -> dict:
    from fl_server.data import ensure_data
    from fl_server.launch.simulation import SimulationSuperLink
    from fl_server.server_app import resumable_state

    # Refuse a folder holding a finished run here, before its summary is cleared below: the
    # ServerApp would otherwise take it for an interrupted run and "resume" it.
    try:
        resumable_state(out)
    except RuntimeError as exc:
        raise RunDirInUse(str(exc)) from None
    t0 = time.monotonic()
    data_dir, made = ensure_data(cfg)
    console.print(
        f"[bold]factoryfed[/] {cfg.task.name} | {cfg.strategy.name} | "
        f"{cfg.federation.num_factories} factories x {cfg.federation.num_rounds} rounds | "
        + (
            f"DP eps={cfg.privacy.epsilon} delta={cfg.privacy.delta}"
            if cfg.privacy.enabled
            else "no sample-level DP"
        )
        + (
            f" | client-level DP ({cfg.client_dp.mode}) eps={cfg.client_dp.epsilon}"
            if cfg.get("client_dp") is not None and cfg.client_dp.mode != "none"
            else ""
        )
    )
    console.print(f"data: {data_dir} ({'generated' if made else 'reused'})")
    config_file = out / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(cfg))
    log_path = out / "flower.log"
    summary_path = out / "summary.json"
    summary_path.unlink(missing_ok=True)
    with (
        open(log_path, "w") as log,
        SimulationSuperLink(
            out / ".flwr", int(cfg.federation.num_factories), float(cfg.federation.client_cpus)
        ) as link,
    ):
        shown: list[str] = [""]

        def on_line(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            plain = _ANSI.sub("", line)
            if verbose or _SHOW.search(plain):
                # Flower's records can reach the stream through two handlers: show them once.
                text = _PREFIX.sub("", plain).split("[factoryfed] ")[-1].strip()
                if text and text != shown[0]:
                    console.print(text, markup=False, highlight=False)
                    shown[0] = text

        code = link.run_app(
            APP_DIR,
            {"config-file": str(config_file), "data-dir": str(data_dir), "output-dir": str(out)},
            on_line,
            timeout=float(cfg.federation.round_timeout) * (int(cfg.federation.num_rounds) + 2),
        )
    if code != 0 or not summary_path.exists():
        raise FederationFailed(f"the federation did not finish (flwr exit {code}); see {log_path}")
    summary = json.loads(summary_path.read_text())
    summary["wall_seconds"] = time.monotonic() - t0
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def unit_label(unit: str | None, summary: dict) -> str:
    """A factory's privacy unit as the summary table prints it: ``window`` for the task's own
    unit, ``machine (coarser)`` for a coarser one the factory chose in its node config."""
    if not unit:
        return "-"
    declared = (summary.get("privacy") or {}).get("unit")
    return unit if unit == declared else f"{unit} (coarser)"


def print_summary(summary: dict, cfg: DictConfig) -> None:
    """Global metrics, per-factory privacy spend and rewards, failures and how to open MLflow."""
    metric = summary["main_metric"]
    table = Table(title=f"{summary['run_name']}  ({summary['wall_seconds']:.0f} s)")
    table.add_column("round", justify="right")
    keys = [metric] + [k for k in summary["rounds"][-1] if k not in ("round", metric)]
    for k in keys:
        table.add_column(f"val {k}", justify="right")
    for r in summary["rounds"]:
        table.add_row(str(r["round"]), *[f"{r[k]:.4f}" for k in keys])
    table.add_row("test", *[f"{summary['test'].get(k, float('nan')):.4f}" for k in keys])
    console.print(table)
    from fl_server.report import factory_rows, money

    rows = factory_rows(summary)
    if rows:
        currency = str(summary.get("reward_currency") or "")
        # Fits an 80-column terminal: the unit gets a column only when a factory chose a
        # coarser one than the task declares, and "declines next run" is a footnote mark.
        declared = (summary.get("privacy") or {}).get("unit")
        units = {r.privacy_unit for r in rows if r.privacy_unit}
        unit_column = bool(units - {declared})
        notes = [f"epsilon per {declared} (the task's privacy unit)"] if declared else []
        if any(r.below_minimum for r in rows):
            notes.append("* declines the next run: less than privacy.min_run_epsilon left")
        per = Table(
            title="per factory: contribution, rewards and privacy spend",
            caption="; ".join(notes) or None,
        )
        per.add_column("factory", no_wrap=True)
        method = summary.get("contribution")
        per.add_column(f"{method} score" if method else "score", justify="right", no_wrap=True)
        per.add_column("share", justify="right", no_wrap=True)
        per.add_column("paid", justify="right", no_wrap=True)
        if unit_column:
            per.add_column("privacy unit")
        per.add_column("epsilon", justify="right", no_wrap=True)
        per.add_column(f"left of {summary['epsilon_budget']}", justify="right", no_wrap=True)
        for r in rows:
            left = "-" if r.epsilon_left is None else f"{r.epsilon_left:.3f}"
            if r.own_budget and r.epsilon_budget != summary["epsilon_budget"]:
                left += f" of own {r.epsilon_budget:g}"
            cells = [
                r.factory_id,
                "-" if r.contribution is None else f"{r.contribution:+.4f}",
                "-" if r.share is None else f"{100 * r.share:.1f} %",
                "-" if r.payout_minor is None else money(r.payout_minor, currency),
            ]
            if unit_column:
                cells.append(unit_label(r.privacy_unit, summary))
            cells += [
                "-" if r.epsilon_spent is None else f"{r.epsilon_spent:.3f}",
                left + (" *" if r.below_minimum else ""),
            ]
            per.add_row(*cells)
        console.print(per)
    if summary.get("epsilon_client_level") is not None:
        console.print(
            f"client-level DP: epsilon {summary['epsilon_client_level']:.3f} spent after "
            f"{summary['rounds_run']} rounds"
        )
    if summary.get("ledger"):
        console.print(
            f"reward ledger {summary['ledger']}\n  head {summary['ledger_head']}\n"
            "  check it with: factoryfed ledger verify <path> --head <head>",
            markup=False,
            highlight=False,
        )
    for f in summary["failures"]:
        console.print(f"[yellow]round {f['round']}: {f['factory']} {f['status']}: {f['reason']}")
    uri = summary["tracking_uri"]
    console.print(f"MLflow run {summary['mlflow_run_id']}; open the UI with:")
    console.print(
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} "
        f"--default-artifact-root {cfg.tracking.artifact_root} --host 127.0.0.1 --port 5000",
        markup=False,
        highlight=False,
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit so the SuperLink and its workers are stopped on the way out."""
    raise SystemExit(128 + signum)


def prepare(cfg: DictConfig, base: Path, out: Path) -> DictConfig:
    """Everything that must hold before anything expensive starts (data, Ray, Flower, MLflow):
    the whole config is valid and the tracking store is reachable and writable."""
    cfg = finalize(cfg, base=base, output_dir=out)
    check_tracking(str(cfg.tracking.uri))
    return cfg


def fail(exc: BaseException) -> None:
    """One line on stderr and a non-zero exit: 2 for a bad config, 1 for anything else."""
    print(f"factoryfed: error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2 if isinstance(exc, ConfigError) else 1)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns the final validation main metric (for sweepers)."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = prepare(cfg, Path(get_original_cwd()), out)
    except (ConfigError, TrackingUnavailable) as exc:
        fail(exc)
    try:
        summary = run_simulation(cfg)
    except user_errors() as exc:
        fail(exc)
    print_summary(summary, cfg)
    return float(summary["rounds"][-1][summary["main_metric"]])


if __name__ == "__main__":
    sys.argv[1:] = quote_choices(sys.argv[1:])
    main()
