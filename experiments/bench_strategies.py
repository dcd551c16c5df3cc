"""Which aggregation strategy learns best, and fastest, when factories' label mixes differ.

Every strategy of ``conf/strategy`` runs a whole federation (10 factories, no attack, factory
DP-SGD at the conf's epsilon 8) on Dirichlet label-skew splits of the same task,
``partition=dirichlet partition.alpha=<alpha>`` (0.1: most factories see a few classes; 10:
nearly IID; the conf's quantity skew 0.5 also varies factory sizes), through the project's own
server and client code in one process (:mod:`experiments.inprocess`), with the product's
defaults: contribution scoring (GTG-Shapley) and end-of-run rewards on, as
``python -m experiments.run`` runs.

Reported per task, alpha and strategy:

* the final global model's main metric on the held-out test set (``tep_fault``: macro-F1,
  ``molding_quality``: PR-AUC);
* the rounds it took to reach a target on the server's validation set (the summary's
  ``rounds`` list, one central evaluation per round). The target is 90% of the best final
  validation value any strategy reached on that split: relative, because the reachable level
  differs a lot between tasks and splits under DP (a fixed value would be unreachable on one
  split and trivial on another), and 90% of the best so that "rounds to target" measures
  speed towards what the split allows, not the last noisy decimals. "not reached" where the
  curve never got there within the run.

Strategy settings are the conf's, with one exception: Multi-Krum averages m = n - f = 10
replies (no attackers here, f = 0), as in :mod:`experiments.bench_robustness`; the conf's
m = 2 is sized for 4 factories. Krum and Bulyan run with f = 0. DP noise comes from OS entropy,
so each cell is one noisy draw; ``--repeats`` runs every cell several times (mean reported).

    python -m experiments.bench_strategies                         # both tasks, 3 alphas
    python -m experiments.bench_strategies --tasks tep_fault --alphas 0.1 10 --rounds 20
    python -m experiments.bench_strategies --quick                 # smoke run
    python -m experiments.bench_strategies --resume                # finish an interrupted run

Writes ``outputs/bench_strategies.json`` (every run's validation curve, after every run) and
prints one markdown table per task.
"""

from __future__ import annotations

import statistics

from experiments import benchkit
from fl_server.config import CONF_DIR

STRATEGIES = tuple(sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml")))
ALPHAS = (0.1, 0.5, 10.0)
TASKS = ("tep_fault", "molding_quality")
TARGET_FRACTION = 0.9
#: Rounds per task: about 25 minutes per task for the 30 runs on the 2-core development
#: machine (10-factory runs measured at ~1.2 s + 1.1 s per round for tep_fault and
#: ~1.5 s + 3 s per round for molding_quality, plus one noise plan per factory and split).
DEFAULT_ROUNDS = {"tep_fault": 30, "molding_quality": 12}


def strategy_overrides(strategy: str) -> list[str]:
    """Overrides that size a strategy for 10 factories without attackers."""
    if strategy == "multikrum":
        return [f"strategy.flower.num_nodes_to_select={benchkit.NUM_FACTORIES}"]
    return []


def rounds_to(curve: list[float], target: float) -> int | None:
    """First round (1-based; index 0 is the initial model) whose value reaches ``target``."""
    for r, value in enumerate(curve):
        if r > 0 and value >= target:
            return r
    return None


def run_one(
    bench: benchkit.BenchRunner,
    task: str,
    strategy: str,
    alpha: float,
    rounds: int,
    seed: int,
    rep: int,
) -> dict:
    """One federation on the ``alpha`` split; returns its record (curve, test, time, error)."""
    name = f"strategies-{task}-{strategy}-a{alpha}-s{seed}-r{rep}"
    record: dict = {
        "task": task,
        "strategy": strategy,
        "alpha": alpha,
        "rounds": rounds,
        "seed": seed,
        "repeat": rep,
    }
    overrides = [
        *benchkit.grid_overrides(task, strategy, rounds, seed),
        "partition=dirichlet",
        f"partition.alpha={alpha}",
        *strategy_overrides(strategy),
    ]
    done = benchkit.run_recorded(bench, overrides, name, record)
    if done is not None:
        summary, _ = done
        record["failures"] = [(f["round"], f["factory"], f["status"]) for f in summary["failures"]]
    return record


def summarise(results: dict) -> list[dict]:
    """Per (task, alpha, strategy): mean final test and validation, target, rounds to target."""
    rows = []
    for task in results["tasks"]:
        for alpha in results["alphas"]:
            runs = [r for r in results["runs"] if r["task"] == task and r["alpha"] == alpha]
            ok = [r for r in runs if "val_curve" in r]
            if not ok:
                continue
            target = TARGET_FRACTION * max(r["val_curve"][-1] for r in ok)
            for strategy in results["strategies"]:
                mine = [r for r in runs if r["strategy"] == strategy]
                good = [r for r in mine if "val_curve" in r]
                reached = [rounds_to(r["val_curve"], target) for r in good]
                rows.append(
                    {
                        "task": task,
                        "alpha": alpha,
                        "strategy": strategy,
                        "target": target,
                        "test": statistics.fmean(r["test"] for r in good) if good else None,
                        "val_final": (
                            statistics.fmean(r["val_curve"][-1] for r in good) if good else None
                        ),
                        "rounds_to_target": reached,
                        "errors": [r["error"] for r in mine if "error" in r],
                        "failures": sum(len(r["failures"]) for r in good),
                        "unchanged_rounds": sum(len(r["unchanged_rounds"]) for r in good),
                    }
                )
    return rows


def _rounds_text(reached: list[int | None]) -> str:
    if not reached:
        return "-"
    return "/".join("not reached" if r is None else str(r) for r in reached)


def print_tables(results: dict, rows: list[dict]) -> None:
    """One markdown table per task: rows strategies, per alpha final test and rounds to target."""
    for task in results["tasks"]:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        metric = next(
            (r["main_metric"] for r in results["runs"] if r["task"] == task and "main_metric" in r),
            "main metric",
        )
        alphas = [a for a in results["alphas"] if any(r["alpha"] == a for r in mine)]
        rounds = results["rounds"][task]
        print(
            f"\n### {task}: test {metric} after {rounds} rounds and rounds to reach the "
            f"target on validation (10 factories, Dirichlet label skew, DP epsilon 8)\n"
        )
        for alpha in alphas:
            target = next(r["target"] for r in mine if r["alpha"] == alpha)
            print(
                f"alpha {alpha:g}: target = {TARGET_FRACTION:.0%} of the best final validation "
                f"{metric} = {target:.3f}"
            )
        print()
        head = " | ".join(f"a={a:g} test | a={a:g} rounds" for a in alphas)
        print(f"| strategy | {head} |")
        print("| --- | " + " | ".join("---: | ---:" for _ in alphas) + " |")
        for strategy in results["strategies"]:
            cells = []
            for alpha in alphas:
                row = next(
                    (r for r in mine if r["alpha"] == alpha and r["strategy"] == strategy), None
                )
                if row is None:
                    cells += ["not run", "-"]
                elif row["test"] is None:
                    cells += ["ERROR", "-"]
                else:
                    note = f" U{row['unchanged_rounds']}" if row["unchanged_rounds"] else ""
                    cells += [f"{row['test']:.3f}{note}", _rounds_text(row["rounds_to_target"])]
            print(f"| {strategy} | " + " | ".join(cells) + " |")
    print(
        "\n`rounds`: first round whose validation value reached the target (of the run's "
        "rounds); `U<n>`: global model left unchanged in n rounds; ERROR: the run failed "
        "(reason in the JSON)."
    )


def main(argv: list[str] | None = None) -> None:
    """Run every (task, alpha, strategy) federation and print the tables."""
    benchkit.prepare_process()
    parser = benchkit.grid_parser(__doc__.splitlines()[0], TASKS, DEFAULT_ROUNDS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--alphas", nargs="+", type=float, default=list(ALPHAS))
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (DP noise)")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 3 strategies, 1 alpha")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 3
        args.strategies, args.alphas = ["fedavg", "fedmedian", "krum"], [0.5]
    results = benchkit.grid_results(
        args, DEFAULT_ROUNDS, "runs", alphas=args.alphas, target_fraction=TARGET_FRACTION
    )

    def plan(task: str) -> list[benchkit.GridRun]:
        rounds = results["rounds"][task]

        def run(strategy: str, alpha: float, rep: int) -> benchkit.GridRun:
            return benchkit.GridRun(
                (task, strategy, alpha, rep),
                f"alpha={alpha:g} {strategy:13s}",
                lambda bench: run_one(bench, task, strategy, alpha, rounds, args.seed, rep),
            )

        return [
            run(strategy, alpha, rep)
            for alpha in args.alphas
            for strategy in args.strategies
            for rep in range(args.repeats)
        ]

    benchkit.run_grid(
        args,
        "bench_strategies",
        results,
        "runs",
        key=lambda r: (r["task"], r["strategy"], r["alpha"], r["repeat"]),
        plan=plan,
        status=lambda r: (
            f"test {r['main_metric']}={r['test']:.4f} "
            f"val {r['val_curve'][-1]:.4f} failures={len(r['failures'])} "
            f"unchanged={r['unchanged_rounds']}"
        ),
        report=benchkit.summary_report(summarise, print_tables),
    )


if __name__ == "__main__":
    main()
