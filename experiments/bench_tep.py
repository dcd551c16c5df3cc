"""What federation buys a TEP plant: macro-F1 of federated (with and without DP), centralized
and factory-alone training of the same ``tep_fault`` model, on the same held-out test set.

    python -m experiments.bench_tep [--rounds R] [--factories N] [--epsilons 1 3 8]

Federated runs go through the real route (Flower's simulation engine, the ServerApp, MLflow in
a temporary sqlite file) with the config tree's training defaults and ``--rounds`` rounds; each
reports the final global model, with no model selection.

The centralized and factory-alone baselines train the same network without DP and without
federation's constraints, as well as this trainer can: plain mini-batch SGD with momentum
(batch ``--central-batch-size``), each learning rate of ``--central-lrs`` trained for
``--central-epochs`` epochs, the model kept being the one with the best validation macro-F1
over all learning rates and epochs (checked every ``--eval-every`` epochs). The federated runs
get no such selection, so the comparison favours the baselines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import ConcatDataset, Dataset

from experiments.benchkit import scratch_run_overrides
from experiments.run import run_simulation
from fl_client.training import LocalTrainConfig, train_local
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from standard_models.base import StandardTask
from standard_models.datafiles import factory_path
from standard_models.registry import get_task

# Wide enough for the table when the output is piped (rich then assumes 80 columns).
console = Console(width=max(Console().width, 150))
#: Rounds of the federated runs: more than the main job's default (``conf/federation``), since
#: each factory's share of the data is small and FedAvg must merge disjoint fault families.
DEFAULT_ROUNDS = 10


@dataclass
class Baseline:
    """A non-private baseline: test score of the best-validation model and how it was found."""

    test: float
    validation: float
    lr: float
    epoch: int


def load_splits(
    task: StandardTask, data_dir: Path, num_factories: int
) -> tuple[Dataset, Dataset, list[Dataset]]:
    """The server's validation and test sets and every factory's data, as the task reads them."""
    validation = task.to_dataset(task.load_frame(data_dir / "validation.parquet"))
    test = task.to_dataset(task.load_frame(data_dir / "test.parquet"))
    factories = [
        task.to_dataset(task.load_frame(factory_path(data_dir, i))) for i in range(num_factories)
    ]
    return validation, test, factories


def train_baseline(
    task: StandardTask,
    datasets: list[Dataset],
    validation: Dataset,
    test: Dataset,
    *,
    lrs: list[float],
    epochs: int,
    batch_size: int,
    momentum: float,
    eval_every: int,
    seed: int,
) -> Baseline:
    """Train a fresh model on the union of ``datasets`` without DP, for each learning rate.

    Returns the test score of the model with the best validation score over every learning
    rate and every ``eval_every``-th epoch (early stopping and learning-rate selection).
    """
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    best: Baseline | None = None
    for lr in lrs:
        torch.manual_seed(seed)
        model = task.build_model()
        for epoch in range(1, epochs + 1):
            cfg = LocalTrainConfig(
                local_epochs=1,
                batch_size=batch_size,
                lr=lr,
                momentum=momentum,
                dp=False,
                seed=seed * 100_003 + epoch,
            )
            train_local(model, data, task.loss_fn(), cfg, noise_multiplier=None)
            if epoch % eval_every and epoch != epochs:
                continue
            val = task.evaluate(model, validation)[task.main_metric]
            if best is None or val > best.validation:
                test_score = task.evaluate(model, test)[task.main_metric]
                best = Baseline(test_score, val, lr, epoch)
    assert best is not None
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--factories", type=int, default=4)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--central-epochs", type=int, default=80)
    parser.add_argument("--central-lrs", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--central-batch-size", type=int, default=64)
    parser.add_argument("--central-momentum", type=float, default=0.9)
    parser.add_argument("--eval-every", type=int, default=5)
    args = parser.parse_args(argv)
    if min(args.rounds, args.central_epochs, args.eval_every, args.central_batch_size) < 1:
        parser.error("--rounds, --central-epochs, --eval-every and --central-batch-size: >= 1")

    rows: list[tuple[str, float, str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = scratch_run_overrides(tmp, "tep_fault", args.factories, args.rounds, args.seed)
        variants = [(f"federated, DP eps={e:g}", [f"privacy.epsilon={e}"]) for e in args.epsilons]
        variants.append(("federated, no DP", ["privacy=none"]))
        cfg = None
        for i, (label, extra) in enumerate(variants):
            cfg = finalize(compose_config(common + extra), base=Path.cwd(), output_dir=tmp / str(i))
            t0 = time.monotonic()
            summary = run_simulation(cfg)
            spent = summary.get("factory_epsilon") or {}
            t = cfg.task.train
            how = f"final model; batch {t.batch_size}, lr {t.lr:g}, {t.local_epochs} ep/round"
            eps = f"{max(spent.values()):.2f}" if cfg.privacy.enabled and spent else "-"
            rows.append((label, summary["test"]["macro_f1"], eps, how, time.monotonic() - t0))

        assert cfg is not None
        task = get_task("tep_fault")
        data_dir, _ = ensure_data(cfg)
        validation, test, factories = load_splits(task, data_dir, args.factories)
        options = {
            "lrs": args.central_lrs,
            "epochs": args.central_epochs,
            "batch_size": args.central_batch_size,
            "momentum": args.central_momentum,
            "eval_every": args.eval_every,
            "seed": args.seed,
        }
        groups = [("centralized, no DP", factories)] + [
            (f"factory_{i:03d} alone, no DP", [ds]) for i, ds in enumerate(factories)
        ]
        for label, datasets in groups:
            t0 = time.monotonic()
            b = train_baseline(task, datasets, validation, test, **options)
            how = f"best val: lr {b.lr:g}, epoch {b.epoch}/{args.central_epochs}"
            rows.append((label, b.test, "-", how, time.monotonic() - t0))

    central = next(row[1] for row in rows if row[0].startswith("centralized"))
    table = Table(
        title=f"tep_fault test macro-F1: {args.factories} factories, {args.rounds} rounds; "
        f"baselines: SGD batch {args.central_batch_size}, lr in {args.central_lrs}, "
        f"up to {args.central_epochs} epochs"
    )
    for col in ("training", "macro-F1", "vs centralized (points)", "eps spent", "model", "seconds"):
        table.add_column(col, justify="left" if col in ("training", "model") else "right")
    for label, f1, eps, how, secs in rows:
        table.add_row(label, f"{f1:.3f}", f"{100 * (f1 - central):+.1f}", eps, how, f"{secs:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
