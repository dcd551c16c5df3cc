"""Named sets of config overrides, each run over several seeds, through the product path.

A setting chosen by measurement (a server optimiser's rate, a task's DP-SGD recipe) needs the
same federation run with each candidate and several seeds, because one run's DP noise moves the
test metric by points. This runs each ``--set NAME=OVERRIDES`` (Hydra overrides of the main
job, separated by spaces) once per seed through the in-process runner (the same ServerApp and
ClientApp code as ``python -m experiments.run``, defaults otherwise: scoring, guards and
rewards on) and prints, per set, the test main metric's mean, standard deviation and each
seed's value, in the order the sets were given.

    python -m experiments.sweep --seeds 0 1 2 \\
        --set "fedavg=strategy=fedavg" \\
        --set "adam-0.01=strategy=fedadam strategy.flower.eta=0.01 strategy.flower.tau=0.01" \\
        --set "adam=strategy=fedadam"

Results go to ``--out`` (default ``outputs/sweep.json``); with ``--resume`` runs already in it
are kept. A failed run is recorded with its error and left out of the mean.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.benchkit import APP_DIR, prepare_process, run_recorded, scratch_runner


def parse_set(text: str) -> tuple[str, list[str]]:
    """``NAME=OVERRIDES`` as the name and the list of overrides.

    Raises:
        argparse.ArgumentTypeError: no ``=``, an empty name or no overrides; names the text.
    """
    name, sep, rest = text.partition("=")
    overrides = rest.split()
    if not sep or not name.strip() or not overrides:
        raise argparse.ArgumentTypeError(
            f"--set {text!r}: expected NAME=OVERRIDES, e.g. 'adam=strategy=fedadam'"
        )
    return name.strip(), overrides


def summarise(runs: dict[str, dict], names: Sequence[str]) -> list[dict]:
    """Per set name (in ``names`` order): its main metric, runs, failures, and the test main
    metric's mean, sample standard deviation and values by seed (``runs`` keyed ``name|seed``)."""
    rows = []
    for name in names:
        mine = {
            int(key.rsplit("|", 1)[1]): rec
            for key, rec in runs.items()
            if key.rsplit("|", 1)[0] == name
        }
        values = {seed: rec["test"] for seed, rec in sorted(mine.items()) if "test" in rec}
        tests = list(values.values())
        rows.append(
            {
                "name": name,
                "main_metric": next((r["main_metric"] for r in mine.values() if "test" in r), ""),
                "runs": len(mine),
                "failed": sum("error" in r for r in mine.values()),
                "mean": float(np.mean(tests)) if tests else math.nan,
                "sd": float(np.std(tests, ddof=1)) if len(tests) > 1 else math.nan,
                "by_seed": values,
            }
        )
    return rows


def print_summary(rows: Sequence[dict]) -> None:
    """One line per set: mean, sd and each seed's test value."""
    for row in rows:
        seeds = ", ".join(f"{s}: {v:.4f}" for s, v in row["by_seed"].items())
        failed = f", {row['failed']} failed" if row["failed"] else ""
        print(
            f"{row['name']:<24} test {row['main_metric']} mean {row['mean']:.4f} "
            f"sd {row['sd']:.4f} over {row['runs'] - row['failed']} run(s){failed}  [{seeds}]",
            flush=True,
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=parse_set,
        required=True,
        metavar="NAME=OVERRIDES",
        help="a named set of Hydra overrides (space-separated); give one --set per candidate",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", type=Path, default=APP_DIR / "data")
    parser.add_argument("--keep-runs", action="store_true", help="keep MLflow store and run dirs")
    parser.add_argument("--out", type=Path, default=APP_DIR / "outputs" / "sweep.json")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.sets]
    if len(set(names)) != len(names):
        parser.error(f"--set names must differ, got {names}")
    prepare_process()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    if args.resume and args.out.exists():
        runs = json.loads(args.out.read_text()).get("runs", {})
    with scratch_runner("sweep", args.data_root, args.keep_runs) as bench:
        for seed in args.seeds:
            for name, overrides in args.sets:
                key = f"{name}|{seed}"
                if key in runs and "error" not in runs[key]:
                    continue
                record: dict = {"overrides": overrides}
                run_recorded(bench, [*overrides, f"seed={seed}"], f"{name}-s{seed}", record)
                runs[key] = record
                args.out.write_text(json.dumps({"runs": runs}, indent=1))
                shown = record.get("error") or f"test {record['test']:.4f}"
                groups = (record.get("guards") or {}).get("groups")
                shown += f", scored as one: {groups}" if groups else ""
                print(f"{name} seed {seed}: {shown} ({record['seconds']:.0f} s)", flush=True)
    rows = summarise(runs, names)
    args.out.write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    print()
    print_summary(rows)
    print(f"results: {args.out}")
    return {"runs": runs, "summary": rows}


if __name__ == "__main__":
    main()
