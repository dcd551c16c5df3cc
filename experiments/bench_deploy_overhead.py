"""Per-round wall time of one small federation in deployment and in simulation, side by side.

The same config (``molding_quality``, 3 factories, DP-SGD at epsilon 8, a few rounds) runs:

* ``inprocess``: :mod:`experiments.inprocess` (the real ServerApp and ClientApp logic in this
  process, no Flower runtime): the work of a round without any transport;
* ``simulation``: :func:`experiments.run.run_simulation` (``flwr run`` on Flower's simulation
  engine, Ray, one CPU per factory);
* ``deploy-flower``: a real deployment on loopback (TLS SuperLink with SuperNode
  authentication, three SuperNodes, ``flwr run``) as Flower runs it: a fresh
  ``flwr-clientapp`` process per message that imports torch & co., the SuperExec polling for
  tasks every second (``warm_clientapp=False``);
* ``deploy-poll``: the same with ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=--poll``;
* ``deploy``: what :mod:`fl_server.launch.flower` starts by default: a warm ClientApp launcher
  per SuperNode (:mod:`fl_server.launch.warm_clientapp`);
* ``deploy-warm-poll``: the warm launcher and ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=--poll``.

A round's wall time is the ServerApp's MLflow metric ``server/round_seconds`` (from the end of
one round to the end of the next: sending, the factories' work, replies, aggregation, central
evaluation, checkpoint and logging), the same code in every mode. ``train`` is the slowest
factory's local training (``factory/<id>/train_time``) in that round, so ``round - train`` is
what the runtime adds. Every mode logs to its own SQLite MLflow store; nothing binds outside
127.0.0.1 and every process is stopped by PID.

    python -m experiments.bench_deploy_overhead                 # all modes, 4 rounds
    python -m experiments.bench_deploy_overhead --rounds 3 --modes deploy-flower deploy

Takes about 10 minutes here (2 cores); the simulation mode needs ``flwr[simulation]`` (Ray).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fl_common.env import set_quiet
from fl_server.launch.process import child_env

set_quiet()

REPO = Path(__file__).resolve().parent.parent
IDS = ["factory_000", "factory_001", "factory_002"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MODES = ("inprocess", "simulation", "deploy-flower", "deploy-poll", "deploy", "deploy-warm-poll")


def overrides(rounds: int, root: Path) -> list[str]:
    return [
        "task=molding_quality",
        "federation.num_factories=3",
        f"federation.num_rounds={rounds}",
        "federation.min_factories=2",
        "federation.round_timeout=300",
        "contribution=none",
        "tracking.register_model=false",
        "seed=0",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_root={root / 'artifacts'}",
        f"data_root={root.parent / 'data'}",
    ]


def round_metrics(summary: dict) -> dict[int, tuple[float, float]]:
    """``{round: (round_seconds, slowest factory train_time)}`` from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run_id = summary["mlflow_run_id"]
    rounds = {m.step: m.value for m in client.get_metric_history(run_id, "server/round_seconds")}
    train: dict[int, float] = {}
    for fid in IDS:
        for m in client.get_metric_history(run_id, f"factory/{fid}/train_time"):
            train[m.step] = max(train.get(m.step, 0.0), m.value)
    return {k: (v, train.get(k, float("nan"))) for k, v in sorted(rounds.items())}


def run_inprocess(rounds: int, root: Path) -> dict:
    import torch

    from experiments.inprocess import run_inprocess as run
    from fl_server.config import compose_config, finalize

    torch.set_num_threads(1)  # as each factory process in the other modes
    cfg = finalize(compose_config(overrides(rounds, root)), base=REPO, output_dir=root / "out")
    return run(cfg, quiet=True)


def run_simulation(rounds: int, root: Path) -> dict:
    from experiments.run import run_simulation as run
    from fl_server.config import compose_config, finalize

    cfg = finalize(compose_config(overrides(rounds, root)), base=REPO, output_dir=root / "out")
    return run(cfg)


def run_deployed(rounds: int, root: Path, warm: bool, poll: float | None) -> dict:
    """Provision, start SuperLink and SuperNodes, ``flwr run``, stop everything."""
    from fl_server.config import compose_config, finalize
    from fl_server.data import ensure_data
    from fl_server.launch.flower import start_superlink, start_supernode, wait_connected
    from fl_server.launch.flwr_run import run_app
    from fl_server.launch.process import Handle
    from fl_server.provision import provision, register_factories

    t0 = time.monotonic()
    bundles = provision(root / "bundles", IDS)
    cfg = finalize(compose_config(overrides(rounds, root)), base=REPO, output_dir=root / "out")
    data_dir, _ = ensure_data(cfg)
    handles: list[Handle] = []
    try:
        link = start_superlink(
            bundles.operator_dir,
            root / "operator",
            port=None,
            extra_env=ONE_THREAD,
            task_poll_interval=poll,
        )
        handles.append(link)
        regs = register_factories(bundles.operator_dir, link.info["connection"], link.env)
        assert all(r.ok for r in regs), regs
        for i, fid in enumerate(IDS):
            handles.append(
                start_supernode(
                    bundles.factories[fid].path,
                    root / fid,
                    data_dir / f"factory_{i:03d}.parquet",
                    root / fid / "ledger.json",
                    superlink=link.info["address"],
                    port=None,
                    extra_env=ONE_THREAD,
                    warm_clientapp=warm,
                    task_poll_interval=poll,
                )
            )
        for node in handles[1:]:
            wait_connected(node, 120)
        ready = time.monotonic() - t0
        run_config = {
            "overrides": " ".join(overrides(rounds, root)),
            "output-dir": str(root / "out"),
            "data-dir": str(data_dir),
        }
        env = child_env(root / "operator" / "flwr")
        env.update(ONE_THREAD)
        with open(root / "flwr-run.log", "w") as log:
            code = run_app(
                root / "operator" / "flwr",
                REPO,
                run_config,
                on_line=lambda line: print(line, file=log, flush=True),
                timeout=300 * (rounds + 1),
                env=env,
            )
        if code != 0:
            raise RuntimeError(f"flwr run exited with {code}; see {root / 'flwr-run.log'}")
    finally:
        for handle in reversed(handles):
            handle.stop(grace=5)
    summary = json.loads((root / "out" / "summary.json").read_text())
    summary["wall_seconds"] = time.monotonic() - t0
    summary["startup_seconds"] = ready
    return summary


LABELS = {
    "inprocess": "in-process (experiments.inprocess)",
    "simulation": "simulation (Ray, flwr run)",
    "deploy-flower": "deployment, Flower defaults",
    "deploy-poll": "deployment, task poll {poll} s",
    "deploy": "deployment, warm ClientApp (fl_server.launch)",
    "deploy-warm-poll": "deployment, warm + task poll {poll} s",
}


def main(argv: list[str] | None = None) -> int:
    from fl_server.launch.flower import DEFAULT_TASK_POLL_INTERVAL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--poll", type=float, default=0.2, help="task poll interval to try (s)")
    parser.add_argument("--keep", help="keep every run's files in this folder")
    args = parser.parse_args(argv)

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    results: dict[str, dict[int, tuple[float, float]]] = {}
    walls: dict[str, float] = {}
    for mode in args.modes:
        root = (base / mode).resolve()
        root.mkdir(parents=True, exist_ok=True)
        print(f"[bench] {mode} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        if mode == "inprocess":
            summary = run_inprocess(args.rounds, root)
        elif mode == "simulation":
            summary = run_simulation(args.rounds, root)
        elif mode == "deploy-flower":
            summary = run_deployed(args.rounds, root, warm=False, poll=None)
        elif mode == "deploy-poll":
            summary = run_deployed(args.rounds, root, warm=False, poll=args.poll)
        elif mode == "deploy":
            summary = run_deployed(args.rounds, root, warm=True, poll=DEFAULT_TASK_POLL_INTERVAL)
        else:
            summary = run_deployed(args.rounds, root, warm=True, poll=args.poll)
        walls[mode] = time.monotonic() - t0
        results[mode] = round_metrics(summary)

    rounds = list(range(1, args.rounds + 1))
    head = f"{'mode':<44}" + "".join(f"{'r' + str(k):>7}" for k in rounds)
    head += f"{'mean':>8}{'train':>8}{'added':>8}{'run':>8}"
    print(f"\nper-round wall time, seconds (molding_quality, 3 factories, {args.rounds} rounds)")
    print(head)
    print("-" * len(head))
    for mode, per in results.items():
        label = LABELS[mode].format(poll=args.poll)
        steady = [per[k][0] for k in rounds if k in per and k > 1] or [per[1][0]]
        train = [per[k][1] for k in rounds if k in per and k > 1] or [per[1][1]]
        mean, mean_train = statistics.mean(steady), statistics.mean(train)
        cells = "".join(f"{per[k][0]:7.1f}" if k in per else f"{'-':>7}" for k in rounds)
        print(
            f"{label:<44}{cells}{mean:8.1f}{mean_train:8.2f}{mean - mean_train:8.1f}"
            f"{walls[mode]:8.0f}"
        )
    print(
        "\nmean: rounds 2+ (round 1 includes warm-up); train: slowest factory's local training; "
        "added = mean - train (runtime overhead); run: whole run incl. start-up (s)."
    )
    if not args.keep:
        print(f"(run folders in {base})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
