"""What federation buys a solar-cell plant: test PR-AUC of the ``cell_defect`` model trained
federated (with and without DP), centralised, and by each factory alone.

    python -m experiments.bench_cell_defect [--rounds R] [--epsilons 3 8] [--engine inprocess]

Federated runs go through the real route (Flower's simulation engine, the ServerApp, MLflow in
a temporary sqlite file; ``--engine inprocess`` runs the same ServerApp and ClientApp through
:mod:`experiments.inprocess` instead, for machines too busy to start Ray) with the config
tree's training defaults (``conf/task/cell_defect``) and ``--rounds`` rounds; each reports
its final global model, with no model selection.
The centralised and factory-alone baselines are those of :mod:`experiments.bench_utility`
(:func:`~experiments.bench_utility.train_baseline`: non-private SGD, the best validation PR-AUC
over learning rates and epochs), so the comparison favours the baselines.

Besides PR-AUC every row reports F1 and balanced accuracy on the test set at the decision
threshold that maximises F1 on the validation set (chosen with the same model's validation
outputs, never with test labels).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from experiments.bench_utility import load_splits, train_baseline
from experiments.benchkit import scratch_run_overrides
from experiments.inprocess import run_inprocess
from experiments.run import run_simulation
from fl_client.training import LocalTrainConfig, train_local
from fl_server.checkpoint import load_latest
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from standard_models.base import StandardTask
from standard_models.cell_defect.metrics import balanced_accuracy_at, best_f1_threshold, f1_at
from standard_models.registry import get_task

console = Console(width=max(Console().width, 150))
TASK = "cell_defect"


def threshold_scores(
    task: StandardTask, model: nn.Module, validation: Dataset, test: Dataset
) -> tuple[float, float, float]:
    """Test ``(pr_auc, f1, balanced_accuracy)``, the last two at the validation-best threshold."""
    val_out, val_y = task.predict(model, validation)
    test_out, test_y = task.predict(model, test)
    threshold = best_f1_threshold(val_out, val_y)
    return (
        task.main_score(test_out, test_y),
        f1_at(test_out, test_y, threshold),
        balanced_accuracy_at(test_out, test_y, threshold),
    )


def _baseline_model(
    task: StandardTask, datasets: list[Dataset], lr: float, epochs: int, args, seed: int
) -> nn.Module:
    """Retrain the selected baseline (same seeds as :func:`train_baseline`) to score it."""
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    torch.manual_seed(seed)
    model = task.build_model()
    for epoch in range(1, epochs + 1):
        cfg = LocalTrainConfig(
            local_epochs=1,
            batch_size=args.central_batch_size,
            lr=lr,
            momentum=args.central_momentum,
            dp=False,
            seed=seed * 100_003 + epoch,
        )
        train_local(model, data, task.loss_fn(), cfg, noise_multiplier=None)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--factories", type=int, default=4)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[3.0, 8.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--central-epochs", type=int, default=30)
    parser.add_argument("--central-lrs", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--central-batch-size", type=int, default=64)
    parser.add_argument("--central-momentum", type=float, default=0.9)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--no-federated", action="store_true", help="baselines only")
    parser.add_argument("--engine", choices=["flower", "inprocess"], default="flower")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of this process (in-process runs)"
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="extra Hydra overrides for the federated runs"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    task = get_task(TASK)
    rows: list[tuple[str, tuple[float, float, float], str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        common = [
            *scratch_run_overrides(tmp, TASK, args.factories, args.rounds, args.seed),
            *args.overrides,
        ]
        variants = [("federated, no DP", ["privacy=none"])]
        variants += [(f"federated, DP eps={e:g}", [f"privacy.epsilon={e}"]) for e in args.epsilons]
        cfg = finalize(compose_config(common), base=Path.cwd(), output_dir=tmp / "data-only")
        data_dir, _ = ensure_data(cfg)
        validation, test, factories = load_splits(task, data_dir, args.factories)
        groups = [("centralised, no DP", factories)] + [
            (f"factory_{i:03d} alone, no DP", [ds]) for i, ds in enumerate(factories)
        ]
        for label, datasets in groups:
            t0 = time.monotonic()
            b = train_baseline(
                task,
                datasets,
                validation,
                test,
                lrs=args.central_lrs,
                epochs=args.central_epochs,
                batch_size=args.central_batch_size,
                momentum=args.central_momentum,
                eval_every=args.eval_every,
                seed=args.seed,
            )
            model = _baseline_model(task, datasets, b.lr, b.epoch, args, args.seed)
            scores = threshold_scores(task, model, validation, test)
            how = f"best val: lr {b.lr:g}, epoch {b.epoch}/{args.central_epochs}"
            rows.append((label, scores, "-", how, time.monotonic() - t0))
            console.print(f"{rows[-1]}")

        for i, (label, extra) in enumerate([] if args.no_federated else variants):
            out = tmp / str(i)
            run_cfg = finalize(compose_config(common + extra), base=Path.cwd(), output_dir=out)
            t0 = time.monotonic()
            if args.engine == "flower":
                summary = run_simulation(run_cfg)
            else:
                summary = run_inprocess(run_cfg, quiet=True)
            model = task.build_model()
            model.load_state_dict(load_latest(out / "checkpoints")["state_dict"])
            spent = summary.get("factory_epsilon") or {}
            t = run_cfg.task.train
            how = f"final model; batch {t.batch_size}, lr {t.lr:g}, {t.local_epochs} ep/round"
            eps = f"{max(spent.values()):.2f}" if run_cfg.privacy.enabled and spent else "-"
            scores = threshold_scores(task, model, validation, test)
            rows.append((label, scores, eps, how, time.monotonic() - t0))
            console.print(f"{rows[-1]}")

    central = next(r[1][0] for r in rows if r[0].startswith("centralised"))
    table = Table(
        title=f"{TASK} test scores: {args.factories} factories, {args.rounds} rounds; baselines: "
        f"SGD batch {args.central_batch_size}, lr in {args.central_lrs}, up to "
        f"{args.central_epochs} epochs; F1 and balanced accuracy at the validation-best threshold"
    )
    for col in ("training", "PR-AUC", "vs central (pts)", "F1", "bal. acc", "eps spent",
                "model", "seconds"):
        table.add_column(col, justify="left" if col in ("training", "model") else "right")
    for label, (ap, f1, bacc), eps, how, secs in rows:
        table.add_row(
            label, f"{ap:.3f}", f"{100 * (ap - central):+.1f}", f"{f1:.3f}", f"{bacc:.3f}", eps,
            how, f"{secs:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
