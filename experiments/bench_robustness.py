"""How much each aggregation strategy loses to each attack, with 10 factories and k attackers.

Every cell is one whole federation through the project's own server and client code
(:func:`fl_server.server_app.run_federation` and the factories' ClientApp, in one process via
:mod:`experiments.inprocess`), composed from ``conf/`` with ``strategy=<s> attack=<a>
attack.num_malicious=<k> federation.num_factories=10 federation.num_rounds=<R>`` on the
product's defaults: contribution scoring (GTG-Shapley) and end-of-run rewards stay on, as in
``python -m experiments.run``, so the attackers face the federation a user runs. Factory
DP-SGD stays on (``privacy=dp``, epsilon 8): the defences are measured on the updates a factory
really sends, noise included. The score is the final global model's main metric on the held-out test
set (``tep_fault``: macro-F1; ``molding_quality``: PR-AUC), next to the same strategy's clean
run (k = 0), and the change in points (100 x (attacked - clean); negative is a drop).

How the robust rules are told about the attackers:

* Krum, Multi-Krum and Bulyan get ``num_malicious_nodes`` f = k (the conf default
  ``${oc.select:attack.num_malicious,0}``: the defence knows the true number, its best case).
* Multi-Krum averages m = n - f replies (the paper's choice; the conf's 2 suits 4 factories).
* Bulyan needs n >= 4f + 3 replies, so with 10 factories it can only be configured for
  f <= 1. For k = 2 and 3 it runs with f = 1 (what an operator of 10 factories can set) and the
  cell is marked ``*``: the attackers outnumber what the rule was configured for. Configured
  with f = k it would never aggregate (Flower skips the round) and the model would stay at its
  initialisation.
* FedTrimmedAvg keeps the conf's beta = 0.25 (it trims floor(0.25 x 10) = 2 replies per side):
  k = 3 is marked ``*``. FedMedian tolerates k < n / 2. FedAvg-family rules claim nothing.
* Every rule sits behind the server's update validation (finite values, shapes, a changed
  model; no norm bound by default), so the ``nan`` attack is stopped before aggregation; the
  table shows it and the JSON counts the rejected updates of every cell.

DP noise is drawn from OS entropy (a factory's privacy must not depend on a known seed), so two
runs of one cell differ; the benchmark repeats FedAvg's clean run (``--repeats``) and prints
the spread, the yardstick for which drops are real. Each factory's noise multiplier is planned
once per data set and reused across runs (:func:`experiments.benchkit.memoized_noise_planning`:
the same values, without re-running Opacus's search in every run).

    python -m experiments.bench_robustness                      # full table, both tasks
    python -m experiments.bench_robustness --tasks tep_fault --rounds 10
    python -m experiments.bench_robustness --strategies fedprox fedadam fedyogi fedavgm \\
        --out outputs/bench_robustness_more.json                 # the remaining strategies
    python -m experiments.bench_robustness --tasks tep_fault --strategies fedavg fedmedian \\
        --attacks sign_flip scale --ks 2 --overrides partition=dirichlet partition.alpha=10 \\
        --out outputs/bench_robustness_iid.json                  # a near-IID split
    python -m experiments.bench_robustness --quick               # smoke run, about 2 minutes
    python -m experiments.bench_robustness --resume              # finish an interrupted run

Writes ``outputs/bench_robustness.json`` (every cell, after every run) and prints one
markdown table per task and attack.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from experiments import benchkit

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
MORE_STRATEGIES = ("fedprox", "fedadam", "fedyogi", "fedavgm")
ATTACKS = ("sign_flip", "scale", "label_flip", "noise", "nan")
KS = (0, 1, 2, 3)
TASKS = ("tep_fault", "molding_quality")
#: Rounds per task, sized so the full table (6 strategies x 16 cells, plus 2 repeats) takes
#: about 40 minutes per task on the 2-core development machine (shared with other jobs):
#: measured about 1.2 s + 1.1 s per round for a 10-factory tep_fault run and 1.5 s + 3 s per
#: round for molding_quality (more DP-SGD steps per round).
DEFAULT_ROUNDS = {"tep_fault": 15, "molding_quality": 6}


def defence(
    strategy: str, k: int, n: int, beta: float = 0.25
) -> tuple[list[str], int | None, bool]:
    """Overrides telling ``strategy`` about ``k`` attackers among ``n``.

    Returns the overrides, the f the rule is configured with (None for rules without one) and
    whether ``k`` exceeds what the configured rule tolerates (the ``*`` mark).
    """
    if strategy == "bulyan":
        f = min(k, max(0, (n - 3) // 4))
        return [f"strategy.flower.num_malicious_nodes={f}"], f, k > f
    if strategy in ("krum", "multikrum"):
        overrides = [f"strategy.flower.num_malicious_nodes={k}"]
        if strategy == "multikrum":
            overrides.append(f"strategy.flower.num_nodes_to_select={max(1, n - k)}")
        return overrides, k, n <= 2 * k + 2
    if strategy == "fedtrimmedavg":
        return [], None, k > math.floor(beta * n)
    if strategy == "fedmedian":
        return [], None, 2 * k >= n
    return [], None, False


def run_cell(
    bench: benchkit.BenchRunner,
    task: str,
    strategy: str,
    attack: str,
    k: int,
    rounds: int,
    seed: int,
    tag: str = "",
    extra: Sequence[str] = (),
) -> dict:
    """One federation; returns the cell's record (metric, curve, rejections, time or error).

    ``tag`` names a repeat of a cell (``-rep1``...) and is kept in the record; every clean
    FedAvg cell is marked ``repeat``, the runs the spread is taken over. ``extra``: Hydra
    overrides applied on top (the bench's ``--overrides``, e.g. a split).
    """
    overrides, f, beyond = defence(strategy, k, benchkit.NUM_FACTORIES)
    attack_args = ["attack=none"] if k == 0 else [f"attack={attack}", f"attack.num_malicious={k}"]
    name = f"robust-{task}-{strategy}-{attack if k else 'clean'}-k{k}-s{seed}{tag}"
    record: dict = {
        "task": task,
        "strategy": strategy,
        "attack": attack if k else "none",
        "k": k,
        "f": f,
        "beyond_tolerance": beyond,
        "rounds": rounds,
        "seed": seed,
    }
    if tag:
        record["tag"] = tag
    if strategy == "fedavg" and k == 0:
        record["repeat"] = True
    done = benchkit.run_recorded(
        bench,
        [*benchkit.grid_overrides(task, strategy, rounds, seed), *attack_args, *overrides, *extra],
        name,
        record,
    )
    if done is None:
        return record
    from fl_server.config import malicious_factories

    summary, cfg = done
    failures = summary["failures"]
    record.update(
        malicious=malicious_factories(cfg),
        rejected=sum(1 for x in failures if x["status"] == "rejected"),
        rejected_reasons=sorted({x["reason"].split(":")[0] for x in failures}),
        failures=len(failures),
    )
    return record


def fmt(value: float | None) -> str:
    """A metric as printed in the tables."""
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def cell_text(cell: dict | None, clean: float | None) -> str:
    """``value (change vs clean, points)`` and marks.

    ``*`` beyond the rule's tolerance, ``R`` if updates were rejected, ``U<n>`` if the global
    model was left unchanged in n rounds.
    """
    if cell is None:
        return "not run"
    if "error" in cell:
        return "ERROR"
    text = fmt(cell["test"])
    if clean is not None and not math.isnan(cell["test"]):
        text += f" ({100 * (cell['test'] - clean):+.1f})"
    marks = ("*" if cell["beyond_tolerance"] else "") + ("R" if cell["rejected"] else "")
    if cell["unchanged_rounds"]:
        marks += f"U{len(cell['unchanged_rounds'])}"
    return text + (f" {marks}" if marks else "")


def print_tables(results: dict) -> None:
    """One markdown table per task and attack: rows strategies, columns clean and k = 1..3."""
    cells = results["cells"]
    index = {(c["task"], c["strategy"], c["attack"], c["k"]): c for c in cells if not c.get("tag")}
    for task in results["tasks"]:
        task_cells = [c for c in cells if c["task"] == task and "main_metric" in c]
        metric = task_cells[0]["main_metric"] if task_cells else "main metric"
        rounds = results["rounds"][task]
        print(
            f"\n### {task}: test {metric} after {rounds} rounds, 10 factories, DP epsilon 8"
            + (f", {' '.join(results['overrides'])}" if results.get("overrides") else "")
        )
        repeats = [
            c["test"] for c in cells if c["task"] == task and c.get("repeat") and "test" in c
        ]
        if len(repeats) > 1:
            print(
                f"\nrun-to-run spread (fedavg, clean, {len(repeats)} runs): "
                f"{' '.join(fmt(v) for v in repeats)}; max - min = "
                f"{100 * (max(repeats) - min(repeats)):.1f} points, "
                f"stdev {100 * statistics.stdev(repeats):.1f} points"
            )
        ks = [k for k in results["ks"] if k > 0]
        for attack in results["attacks"]:
            print(f"\n{task} / {attack}  (value (change in points vs the clean run))\n")
            print("| strategy | clean | " + " | ".join(f"k={k}" for k in ks) + " |")
            print("| --- | ---: | " + " | ".join("---:" for _ in ks) + " |")
            for strategy in results["strategies"]:
                clean_cell = index.get((task, strategy, "none", 0))
                clean = clean_cell.get("test") if clean_cell and "test" in clean_cell else None
                row = [cell_text(index.get((task, strategy, attack, k)), clean) for k in ks]
                clean_text = cell_text(clean_cell, None) if clean_cell else "not run"
                print(f"| {strategy} | {clean_text} | " + " | ".join(row) + " |")
    print(
        "\n`*` more attackers than the configured rule tolerates (Bulyan: f capped at 1 since "
        "n >= 4f + 3; FedTrimmedAvg: beta 0.25 trims 2 per side); `R` updates rejected by "
        "validation; `U<n>` global model left unchanged in n rounds; ERROR: the run failed "
        "(reason in the JSON)."
    )


def main(argv: list[str] | None = None) -> None:
    """Run the grid of (task, strategy, attack, k) federations and print the tables."""
    benchkit.prepare_process()
    parser = benchkit.grid_parser(__doc__.splitlines()[0], TASKS, DEFAULT_ROUNDS)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        choices=STRATEGIES + MORE_STRATEGIES,
    )
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--ks", nargs="+", type=int, default=list(KS))
    parser.add_argument("--repeats", type=int, default=3, help="fedavg clean runs (spread)")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 2 strategies, 2 attacks")
    parser.add_argument(
        "--overrides",
        nargs="+",
        default=[],
        help="Hydra overrides for every run, e.g. partition=dirichlet partition.alpha=10",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = args.rounds or 2
        args.strategies, args.attacks, args.ks, args.repeats = (
            ["fedavg", "bulyan"],
            ["sign_flip", "nan"],
            [0, 2],
            1,
        )
    ks = sorted(set(args.ks) | {0})
    results = benchkit.grid_results(
        args, DEFAULT_ROUNDS, "cells", attacks=args.attacks, ks=ks, overrides=list(args.overrides)
    )

    def plan(task: str) -> list[benchkit.GridRun]:
        rounds = results["rounds"][task]

        def cell(strategy: str, attack: str, k: int, tag: str = "") -> benchkit.GridRun:
            return benchkit.GridRun(
                (task, strategy, attack if k else "none", k, tag),
                f"{strategy:13s} {attack:10s} k={k}{tag}",
                lambda bench: run_cell(
                    bench, task, strategy, attack, k, rounds, args.seed, tag, args.overrides
                ),
            )

        cells = [cell(s, "none", 0) for s in args.strategies]
        cells += [cell(s, a, k) for s in args.strategies for a in args.attacks for k in ks if k]
        if "fedavg" in args.strategies:
            cells += [cell("fedavg", "none", 0, f"-rep{r}") for r in range(1, args.repeats)]
        return cells

    benchkit.run_grid(
        args,
        "bench_robustness",
        results,
        "cells",
        key=lambda c: (c["task"], c["strategy"], c["attack"], c["k"], c.get("tag", "")),
        plan=plan,
        status=lambda c: (
            f"{c['main_metric']}={c['test']:.4f} rejected={c['rejected']} "
            f"unchanged={c['unchanged_rounds']}"
        ),
        report=print_tables,
    )


if __name__ == "__main__":
    main()
