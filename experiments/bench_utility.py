"""What federation buys a factory, and what DP and federation each cost: a task's main metric
for federated, centralised and factory-alone training, with and without DP, per split.

For every task, split (the task's ``natural`` factory structure and Dirichlet label skew at
each ``--alphas`` value) and seed, on the held-out test set of the same data:

* **federated, DP eps=E** and **federated, no DP**: a whole federation of ``--factories``
  factories through the product path (the ServerApp and ClientApp code of
  ``python -m experiments.run``, in one process, :mod:`experiments.inprocess`) with the
  product's defaults (contribution scoring and rewards on, the task's training settings, the
  main job's rounds); the final global model, no selection. FedAvg by default; each strategy
  of ``--strategies`` adds its own pair of rows.
* **centralised, DP eps=E**: the same recipe on the pooled data, as one factory holding every
  factory's rows (a one-factory federation on a ``data_dir`` of the pooled file, through the
  same path): the same rounds, local epochs, batch and privacy unit, and the same epsilon over
  the whole run, at each ``--central-dp-lr-factors`` multiple of the recipe's DP learning rate,
  keeping the run with the best final validation score. The fair reference for the cost of
  federation alone under DP.
* **centralised, no DP**: the same network on the pooled data without DP or federation's
  constraints, as well as this trainer can: SGD with momentum (``--central-batch-size``), each
  learning rate of ``--central-lrs`` for ``--central-epochs`` epochs, keeping the model with the
  best validation score over learning rates and epochs (checked every ``--eval-every``). The
  federated runs get no such selection, so this comparison favours the baseline.
* **factory alone, no DP**: the same selection on one factory's data only, for each factory
  (mean, worst and best over factories): what a plant gets without federating.

Gaps are reported as "worse by" (points of the metric for scores in [0, 1], its own units
otherwise): *cost of DP* = federated no DP - federated DP; *cost of federation under DP* =
centralised DP - federated DP; *gap to pooled data* = centralised no DP - federated DP.
Every cell is the mean (and spread, min..max) over ``--seeds``; DP noise comes from OS entropy,
so seeds also vary the noise. Centralised baselines are trained once per seed and pooled data
set: the Dirichlet splits of one seed deal out the same rows (the same segments of the same
runs, for ``tep_fault``), so they share their centralised runs.

    python -m experiments.bench_utility                       # tep_fault, 4 splits, 3 seeds
    python -m experiments.bench_utility --tasks molding_quality rul --seeds 0
    python -m experiments.bench_utility --epsilons 1 3 8 --alphas   # natural split only
    python -m experiments.bench_utility --strategies fedavg fedavgm  # federated rows of both
    python -m experiments.bench_utility --quick                     # smoke run
    python -m experiments.bench_utility --resume                    # finish an interrupted run

Writes ``outputs/bench_utility.json`` (every run, after every run) and prints one markdown
table per task.
"""

from __future__ import annotations

import hashlib
import itertools
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import ConcatDataset, Dataset

from experiments import benchkit
from fl_client.training import LocalTrainConfig, train_local
from fl_server.config import CONF_DIR, train_recipe
from fl_server.data import ensure_data
from standard_models.base import StandardTask
from standard_models.datafiles import factory_path, holdout_paths
from standard_models.registry import get_task

TASKS = ("tep_fault", "molding_quality", "rul")
STRATEGIES = tuple(sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml")))
#: Dirichlet label-skew alphas besides the natural split (0.1: most factories see a few
#: classes; 10: nearly IID; the conf's quantity skew 0.5 also varies factory sizes).
ALPHAS = (0.1, 0.5, 10.0)
SEEDS = (0, 1, 2)
#: The main job's rounds (``conf/federation/small.yaml``).
DEFAULT_ROUNDS = {task: 10 for task in TASKS}
#: Table rows in print order, by label prefix (anything else, the factory-alone rows, last).
ROW_ORDER = (
    "federated, DP",
    "federated, no DP",
    "federated ",
    "centralised, DP",
    "centralised, no",
)
#: The product's default strategy (``conf/config.yaml``); the centralised DP run uses it too.
DEFAULT_STRATEGY = "fedavg"


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

    Returns the test score of the model with the best validation score (in the task's
    direction, ``greater_is_better``) over every learning rate and every ``eval_every``-th
    epoch: early stopping and learning-rate selection, which no federated run gets.
    """
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
    sign = 1.0 if task.greater_is_better else -1.0
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
            if best is None or sign * val > sign * best.validation:
                test_score = task.evaluate(model, test)[task.main_metric]
                best = Baseline(test_score, val, lr, epoch)
    assert best is not None
    return best


def pool_factory_files(task: StandardTask, data_dir: Path, num_factories: int, out: Path) -> str:
    """Write every factory's rows of ``data_dir`` as one factory's file in ``out``.

    ``out`` gets ``factory_000.parquet`` (the factories' frames one after another, as the
    task reads them) and copies of the server's validation and test files: a ``data_dir``
    for a one-factory federation on the pooled data. Returns a digest of the pooled rows and
    the server's files, so that splits that pool the same data share their baselines.
    """
    frames = [task.load_frame(factory_path(data_dir, i)) for i in range(num_factories)]
    pooled = pd.concat(frames, ignore_index=True)
    digest = hashlib.sha256()
    # Row order differs between splits of the same rows; the digest must not.
    digest.update(pd.util.hash_pandas_object(pooled, index=False).sort_values().values.tobytes())
    out.mkdir(parents=True, exist_ok=True)
    pooled.to_parquet(factory_path(out, 0), index=False)
    for path in holdout_paths(data_dir):
        data = path.read_bytes()
        digest.update(data)
        (out / path.name).write_bytes(data)
    return digest.hexdigest()[:16]


def split_overrides(split: str) -> list[str]:
    """Partition overrides of a split: ``natural`` or a Dirichlet alpha such as ``0.1``."""
    if split == "natural":
        return ["partition=natural"]
    return ["partition=dirichlet", f"partition.alpha={float(split)}"]


class Cell:
    """Every run of one (task, split, seed): the federations and the baselines.

    Data is made (or found) once; the seed and the pooled data's digest key the centralised
    baselines, which ``shared`` reuses across splits that pool the same rows.
    """

    def __init__(self, args: object, task: str, split: str, seed: int, rounds: int) -> None:
        self.args, self.task, self.split, self.seed, self.rounds = args, task, split, seed, rounds
        self.overrides = [
            f"task={task}",
            f"federation.num_factories={args.factories}",
            f"federation.num_rounds={rounds}",
            f"seed={seed}",
            *split_overrides(split),
        ]
        self._data_dir: Path | None = None
        self._pooled: tuple[Path, str] | None = None

    def record(self, kind: str, **extra: object) -> dict:
        """A fresh entry of this cell."""
        return {
            "task": self.task,
            "split": self.split,
            "seed": self.seed,
            "kind": kind,
            "rounds": self.rounds,
            **extra,
        }

    def _reused(self, entry: dict) -> dict:
        """Another split's entry of the same pooled data, recorded for this split."""
        return {**entry, "split": self.split, "shared": True, "seconds": 0.0}

    def federated(
        self, bench: benchkit.BenchRunner, epsilon: float | None, strategy: str = DEFAULT_STRATEGY
    ) -> dict:
        """A federation of ``--factories`` factories with ``strategy`` (its conf's settings);
        ``epsilon`` None trains without DP."""
        kind = "federated" if epsilon is None else "federated_dp"
        record = self.record(kind, epsilon=epsilon, strategy=strategy)
        privacy = ["privacy=none"] if epsilon is None else [f"privacy.epsilon={epsilon}"]
        name = f"utility-{self.task}-{self.split}-s{self.seed}-{kind}-e{epsilon}-{strategy}"
        overrides = [*self.overrides, f"strategy={strategy}", *privacy]
        _record_run(bench, overrides, name, record)
        return record

    def data_dir(self, bench: benchkit.BenchRunner) -> Path:
        """This cell's factory files (made, or found and checked, once)."""
        if self._data_dir is None:
            cfg = bench.config(self.overrides, f"utility-data-{self.task}-{self.split}-{self.seed}")
            self._data_dir, _ = ensure_data(cfg)
        return self._data_dir

    def pooled(self, bench: benchkit.BenchRunner) -> tuple[Path, str]:
        """The pooled data folder of this cell and its digest (made once)."""
        if self._pooled is None:
            folder = bench.workdir / "pooled" / f"{self.task}-{self.split}-s{self.seed}"
            digest = pool_factory_files(
                get_task(self.task), self.data_dir(bench), self.args.factories, folder
            )
            self._pooled = (folder, digest)
        return self._pooled

    def central_dp(self, bench: benchkit.BenchRunner, epsilon: float, shared: dict) -> dict:
        """The federation's recipe on the pooled data: a one-factory federation with DP, once
        at each ``--central-dp-lr-factors`` multiple of the recipe's DP learning rate; the run
        with the best final validation score is the row (every candidate's learning rate,
        validation and test score are kept in its ``candidates``).

        The pooled data takes several times the steps a factory takes per epoch, so the
        federation's rate is not the pooled run's best; without the choice the reference is
        weaker than centralised DP-SGD can be and the cost of federation looks smaller.
        """
        folder, digest = self.pooled(bench)
        key = ("central_dp", epsilon, self.seed, digest)
        if key in shared:
            return self._reused(shared[key])
        name = f"utility-{self.task}-{self.split}-s{self.seed}-central_dp-e{epsilon}"
        base = [
            *self.overrides,
            "federation.num_factories=1",
            "federation.min_factories=1",
            f"data_dir={folder}",
            f"privacy.epsilon={epsilon}",
        ]
        _, recipe_lr = train_recipe(bench.config(base, name).task.train, dp=True)
        candidates = []
        for factor in self.args.central_dp_lr_factors:
            lr = recipe_lr * factor
            candidate = self.record("central_dp", epsilon=epsilon, pooled=digest, lr=lr)
            _record_run(bench, [*base, f"task.train.dp_lr={lr}"], f"{name}-lr{lr:g}", candidate)
            candidates.append(candidate)
        done = [c for c in candidates if "error" not in c]
        if not done:
            return candidates[0]
        sign = 1.0 if get_task(self.task).greater_is_better else -1.0
        record = dict(max(done, key=lambda c: sign * c["val_curve"][-1]))
        record["candidates"] = [
            {"lr": c["lr"], "validation": c["val_curve"][-1], "test": c["test"]} for c in done
        ]
        shared[key] = record
        return record

    def baselines(self, bench: benchkit.BenchRunner, shared: dict) -> list[dict]:
        """Centralised and factory-alone non-private baselines (best validation model)."""
        task = get_task(self.task)
        validation, test, factories = load_splits(task, self.data_dir(bench), self.args.factories)
        options = {
            "lrs": self.args.central_lrs,
            "epochs": self.args.central_epochs,
            "batch_size": self.args.central_batch_size,
            "momentum": self.args.central_momentum,
            "eval_every": self.args.eval_every,
            "seed": self.seed,
        }
        _, digest = self.pooled(bench)
        out = []
        if ("central", self.seed, digest) in shared:
            out.append(self._reused(shared[("central", self.seed, digest)]))
        else:
            t0 = time.monotonic()
            b = train_baseline(task, factories, validation, test, **options)
            record = self.record(
                "central",
                pooled=digest,
                main_metric=task.main_metric,
                **asdict(b),
                seconds=time.monotonic() - t0,
            )
            shared[("central", self.seed, digest)] = record
            out.append(record)
        for i, ds in enumerate(factories):
            t0 = time.monotonic()
            b = train_baseline(task, [ds], validation, test, **options)
            out.append(
                self.record(
                    "alone",
                    factory=i,
                    main_metric=task.main_metric,
                    **asdict(b),
                    seconds=time.monotonic() - t0,
                )
            )
        return out


def _record_run(bench: benchkit.BenchRunner, overrides: list[str], name: str, record: dict) -> None:
    done = benchkit.run_recorded(bench, overrides, name, record)
    if done is not None:
        summary, cfg = done
        spent = summary.get("factory_epsilon") or {}
        record["epsilon_spent"] = max(spent.values()) if cfg.privacy.enabled and spent else None
        record["failures"] = len(summary.get("failures") or [])


def _spread(values: list[float], digits: int = 3) -> str:
    """Mean and (min..max) of one cell's seeds."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def summarise(results: dict) -> list[dict]:
    """Per (task, split, row): the seeds' test scores, and per seed the gaps between rows."""
    rows: list[dict] = []
    for task in results["tasks"]:
        t = get_task(task)
        sign = 1.0 if t.greater_is_better else -1.0
        for split in results["splits"]:
            runs = [
                r
                for r in results["runs"]
                if r["task"] == task and r["split"] == split and "test" in r
            ]
            if not runs:
                continue
            by_seed: dict[int, dict[str, float]] = {}
            labelled: dict[str, list[float]] = {}
            for r in runs:
                label = _label(r)
                if r["kind"] == "alone":
                    continue
                labelled.setdefault(label, []).append(r["test"])
                by_seed.setdefault(r["seed"], {})[label] = r["test"]
            alone: dict[int, list[float]] = {}
            for r in runs:
                if r["kind"] == "alone":
                    alone.setdefault(r["seed"], []).append(r["test"])
            for seed, scores in alone.items():
                labelled.setdefault("factory alone, no DP (mean)", []).append(
                    statistics.fmean(scores)
                )
                worst = min(scores, key=lambda v: sign * v)
                best = max(scores, key=lambda v: sign * v)
                labelled.setdefault("factory alone, no DP (worst)", []).append(worst)
                labelled.setdefault("factory alone, no DP (best)", []).append(best)
                by_seed.setdefault(seed, {})
            gaps: dict[str, list[float]] = {}
            for strategy, eps in itertools.product(
                results.get("strategies", [DEFAULT_STRATEGY]), results["epsilons"]
            ):
                fed_dp = _label({"kind": "federated_dp", "epsilon": eps, "strategy": strategy})
                fed = _label({"kind": "federated", "strategy": strategy})
                which = "" if strategy == DEFAULT_STRATEGY else f"{strategy}, "
                pairs = {
                    f"cost of DP ({which}eps={eps:g})": (fed, fed_dp),
                    f"cost of federation under DP ({which}eps={eps:g})": (
                        f"centralised, DP eps={eps:g}",
                        fed_dp,
                    ),
                    f"gap to pooled data ({which}eps={eps:g})": ("centralised, no DP", fed_dp),
                }
                for name, (ref, row) in pairs.items():
                    for scores in by_seed.values():
                        if ref in scores and row in scores:
                            gap = sign * (scores[ref] - scores[row])
                            gaps.setdefault(name, []).append(gap)
            rows.append(
                {
                    "task": task,
                    "split": split,
                    "metric": t.main_metric,
                    "scores": labelled,
                    "gaps": gaps,
                    "seeds": sorted(by_seed),
                }
            )
    return rows


def _label(r: dict) -> str:
    eps = r.get("epsilon")
    strategy = r.get("strategy", DEFAULT_STRATEGY)
    federated = "federated" if strategy == DEFAULT_STRATEGY else f"federated {strategy}"
    return {
        "federated_dp": f"{federated}, DP eps={eps:g}" if eps is not None else "",
        "federated": f"{federated}, no DP",
        "central_dp": f"centralised, DP eps={eps:g}" if eps is not None else "",
        "central": "centralised, no DP",
    }.get(r["kind"], r["kind"])


def print_tables(results: dict, rows: list[dict]) -> None:
    """One markdown table per task: rows are trainings and gaps, columns are splits."""
    for task in results["tasks"]:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        splits = [r["split"] for r in mine]
        metric = mine[0]["metric"]
        unit = "points" if get_task(task).greater_is_better else metric
        print(
            f"\n### {task}: test {metric}, {results['factories']} factories, "
            f"{results['rounds'][task]} rounds; mean (min..max) over seeds {results['seeds']}\n"
        )
        head = " | ".join("natural" if s == "natural" else f"Dirichlet {s}" for s in splits)
        print(f"| training | {head} |")
        print("| --- | " + " | ".join("---:" for _ in splits) + " |")
        labels = list(dict.fromkeys(label for r in mine for label in r["scores"]))
        for label in sorted(labels, key=_row_order):
            cells = [_spread(r["scores"].get(label, [])) for r in mine]
            print(f"| {label} | " + " | ".join(cells) + " |")
        gap_names = list(dict.fromkeys(name for r in mine for name in r["gaps"]))
        for name in gap_names:
            scale = 100.0 if unit == "points" else 1.0
            cells = [_spread([scale * g for g in r["gaps"].get(name, [])], 1) for r in mine]
            print(f"| *{name}, worse by ({unit})* | " + " | ".join(cells) + " |")
    print(
        "\nGaps are per seed, then averaged: cost of DP = federated no DP - federated DP; cost of "
        "federation under DP = centralised DP - federated DP; gap to pooled data = centralised "
        "no DP (best validation epoch and learning rate) - federated DP."
    )
    for line in guard_lines(results):
        print(line)


def guard_lines(results: dict) -> list[str]:
    """Per task, what the copy guard did to the benchmark's honest factories: federated runs
    that scored some pair as one factory (every one a false positive) and runs where a pair
    flagged by its updates was paid apart because the record sketches share no hash."""
    lines = []
    for task in results["tasks"]:
        runs = [
            r
            for r in results["runs"]
            if r["task"] == task and r["kind"].startswith("federated") and "guards" in r
        ]
        if not runs:
            continue
        grouped = [r for r in runs if r["guards"]["groups"]]
        cleared = [r for r in runs if r["guards"]["cleared"]]
        where = "; ".join(
            f"{_label(r)}, {r['split']}, seed {r['seed']}: "
            + " ".join("+".join(g) for g in r["guards"]["groups"])
            for r in grouped
        )
        lines.append(
            f"{task}: honest factories scored as one (copy-guard false positives) in "
            f"{len(grouped)} of {len(runs)} federated runs{' (' + where + ')' if where else ''}; "
            f"a pair flagged by its updates paid apart by its record sketches in {len(cleared)}."
        )
    return lines


def _row_order(label: str) -> tuple[int, str]:
    for i, prefix in enumerate(ROW_ORDER):
        if label.startswith(prefix):
            return i, label
    return len(ROW_ORDER), label


def main(argv: list[str] | None = None) -> None:
    """Run every (task, split, seed) cell and print the tables."""
    benchkit.prepare_process()
    parser = benchkit.grid_parser(__doc__.splitlines()[0], TASKS, DEFAULT_ROUNDS)
    parser.set_defaults(tasks=["tep_fault"])
    parser.add_argument("--alphas", nargs="*", type=float, default=list(ALPHAS))
    parser.add_argument("--no-natural", action="store_true", help="Dirichlet splits only")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--factories", type=int, default=4)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0])
    parser.add_argument("--central-epochs", type=int, default=60)
    parser.add_argument("--central-lrs", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--central-batch-size", type=int, default=64)
    parser.add_argument("--central-momentum", type=float, default=0.9)
    parser.add_argument(
        "--central-dp-lr-factors",
        type=float,
        nargs="+",
        default=None,
        help="the centralised DP row is the best, by final validation score, of runs at these "
        "multiples of the task's DP learning rate (default 1 0.5 0.25; --quick: 1)",
    )
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=[DEFAULT_STRATEGY],
        choices=STRATEGIES,
        help="strategies of the federated rows (each with its conf's settings); the "
        f"centralised DP run keeps {DEFAULT_STRATEGY}",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 seed, natural split")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 2
        args.seeds, args.alphas, args.central_epochs, args.central_lrs = [0], [], 2, [0.05]
        args.central_dp_lr_factors = args.central_dp_lr_factors or [1.0]
    args.central_dp_lr_factors = args.central_dp_lr_factors or [1.0, 0.5, 0.25]
    if min(args.factories - 1, args.central_epochs, args.eval_every, args.central_batch_size) < 1:
        parser.error("--factories >= 2; --central-epochs, --eval-every, --central-batch-size >= 1")
    if min(args.central_dp_lr_factors) <= 0:
        parser.error(f"--central-dp-lr-factors {args.central_dp_lr_factors}: must be > 0")
    if any(e <= 0 for e in args.epsilons):
        parser.error(f"--epsilons {args.epsilons}: every epsilon must be > 0")
    splits = ([] if args.no_natural else ["natural"]) + [f"{a:g}" for a in args.alphas]
    if not splits:
        parser.error("no split: drop --no-natural or give --alphas")
    results = {
        "tasks": args.tasks,
        "splits": splits,
        "seeds": args.seeds,
        "epsilons": args.epsilons,
        "factories": args.factories,
        "strategies": args.strategies,
        "rounds": {t: args.rounds or DEFAULT_ROUNDS[t] for t in args.tasks},
        "overrides": {
            "central": [
                args.central_epochs,
                args.central_lrs,
                args.central_batch_size,
                args.central_momentum,
                args.eval_every,
            ],
            "central_dp_lr_factors": args.central_dp_lr_factors,
        },
        "runs": [],
        "seconds": {},
    }
    shared: dict = {}

    def plan(task: str) -> list[benchkit.GridRun]:
        rounds = results["rounds"][task]
        runs: list[benchkit.GridRun] = []
        for seed in args.seeds:
            for split in splits:
                cell = Cell(args, task, split, seed, rounds)
                tag = f"{split:>7s} s{seed}"
                for strategy in args.strategies:
                    for eps in [*args.epsilons, None]:
                        kind = "federated" if eps is None else "federated_dp"
                        runs.append(
                            _grid_run(
                                cell,
                                kind,
                                eps,
                                tag,
                                lambda b, c=cell, e=eps, s=strategy: [c.federated(b, e, s)],
                                strategy,
                            )
                        )
                for eps in args.epsilons:
                    runs.append(
                        _grid_run(
                            cell,
                            "central_dp",
                            eps,
                            tag,
                            lambda b, c=cell, e=eps: [c.central_dp(b, e, shared)],
                        )
                    )
                runs.append(
                    _grid_run(
                        cell, "baselines", None, tag, lambda b, c=cell: c.baselines(b, shared)
                    )
                )
        return runs

    benchkit.run_grid(
        args,
        "bench_utility",
        results,
        "runs",
        key=_key,
        plan=plan,
        status=_status,
        report=benchkit.summary_report(summarise, print_tables),
    )


def _key(entry: dict) -> tuple:
    kind = "baselines" if entry["kind"] in ("central", "alone") else entry["kind"]
    strategy = entry.get("strategy", DEFAULT_STRATEGY) if kind.startswith("federated") else None
    return entry["task"], entry["split"], entry["seed"], kind, entry.get("epsilon"), strategy


def _grid_run(
    cell: Cell, kind: str, eps: float | None, tag: str, run: object, strategy: str | None = None
) -> benchkit.GridRun:
    label = f"{tag} {kind}" + (f" eps={eps:g}" if eps is not None else "")
    label += f" {strategy}" if strategy not in (None, DEFAULT_STRATEGY) else ""
    key = (cell.task, cell.split, cell.seed, kind, eps, strategy)
    return benchkit.GridRun(key, label, run)


def _status(entry: dict) -> str:
    return f"{entry['kind']} test {entry['main_metric']}={entry['test']:.4f}"


if __name__ == "__main__":
    main()
