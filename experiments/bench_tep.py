"""What federation buys a TEP plant: macro-F1 of federated (with and without DP), centralized
and factory-alone training of the same ``tep_fault`` model, on the same held-out test set.

    python -m experiments.bench_tep [--rounds R] [--factories N] [--epsilons 1 3 8]

Federated runs go through the real route (Flower's simulation engine, the ServerApp, MLflow in
a temporary sqlite file); the centralized and factory-alone baselines train the same model with
the same local trainer for the same number of epochs (rounds x local epochs), without DP.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import ConcatDataset

from experiments.run import run_simulation
from fl_client.training import LocalTrainConfig, train_local
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from standard_models.datafiles import factory_path
from standard_models.registry import get_task

console = Console()


def _local_baseline(task, datasets, test, cfg, epochs: int, seed: int) -> float:
    """Train one fresh model on the concatenation of ``datasets`` without DP; test macro-F1."""
    torch.manual_seed(seed)
    model = task.build_model()
    train_cfg = LocalTrainConfig(
        local_epochs=epochs,
        batch_size=int(cfg.task.train.batch_size),
        lr=float(cfg.task.train.lr),
        momentum=float(cfg.task.train.momentum),
        dp=False,
        seed=seed,
    )
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    result = train_local(model, data, task.loss_fn(), train_cfg, noise_multiplier=None)
    model.load_state_dict(result.state_dict)
    return task.evaluate(model, test)[task.main_metric]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--factories", type=int, default=4)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = [
            "task=tep_fault",
            f"federation.num_factories={args.factories}",
            f"federation.num_rounds={args.rounds}",
            f"seed={args.seed}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
            f"tracking.artifact_root={tmp / 'artifacts'}",
            "tracking.register_model=false",
        ]
        variants = [(f"federated, DP eps={e:g}", [f"privacy.epsilon={e}"]) for e in args.epsilons]
        variants.append(("federated, no DP", ["privacy=none"]))
        cfg = None
        for i, (label, extra) in enumerate(variants):
            cfg = finalize(compose_config(common + extra), base=Path.cwd(), output_dir=tmp / str(i))
            t0 = time.monotonic()
            summary = run_simulation(cfg)
            rows.append((label, summary["test"]["macro_f1"], time.monotonic() - t0))

        assert cfg is not None
        task = get_task("tep_fault")
        data_dir, _ = ensure_data(cfg)
        test = task.to_dataset(task.load_frame(data_dir / "test.parquet"))
        factories = [
            task.to_dataset(task.load_frame(factory_path(data_dir, i)))
            for i in range(args.factories)
        ]
        epochs = args.rounds * int(cfg.task.train.local_epochs)
        t0 = time.monotonic()
        rows.append(
            (
                "centralized, no DP",
                _local_baseline(task, factories, test, cfg, epochs, args.seed),
                time.monotonic() - t0,
            )
        )
        for i, ds in enumerate(factories):
            t0 = time.monotonic()
            f1 = _local_baseline(task, [ds], test, cfg, epochs, args.seed)
            rows.append((f"factory_{i:03d} alone, no DP", f1, time.monotonic() - t0))

    central = next(f1 for label, f1, _ in rows if label.startswith("centralized"))
    table = Table(
        title=f"tep_fault test macro-F1: {args.factories} factories, {args.rounds} rounds "
        f"(centralized/alone: {epochs} epochs)"
    )
    for col in ("training", "macro-F1", "vs centralized (points)", "seconds"):
        table.add_column(col, justify="left" if col == "training" else "right")
    for label, f1, secs in rows:
        table.add_row(label, f"{f1:.3f}", f"{100 * (f1 - central):+.1f}", f"{secs:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
