"""What every in-process benchmark shares: process set-up, common options, resuming, scratch space.

A benchmark runs many whole federations one after another in one process through
:class:`BenchRunner` (on :func:`experiments.inprocess.run_inprocess`, with each factory's noise
plan computed once, :func:`memoized_noise_planning`). The grid benchmarks
(:mod:`experiments.bench_robustness`, :mod:`experiments.bench_strategies`) write every
finished run to a JSON file as they go, and can pick up an interrupted grid from that file. A
grid module says what its runs are (:class:`GridRun`) and how to print them; :func:`run_grid`
does the rest the same way for every grid: resuming, timing, saving and progress lines.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from experiments.inprocess import APP_DIR, run_inprocess
from fl_common.env import set_quiet
from fl_server.config import compose_config, finalize

#: Factories in every federation of a grid benchmark.
NUM_FACTORIES = 10
#: The privacy every grid runs with, as its results file records it.
PRIVACY = "dp epsilon 8 (conf default)"


@contextmanager
def memoized_noise_planning() -> Iterator[dict[str, int]]:
    """Reuse each factory's DP noise plan across the runs of a benchmark (same values, exactly).

    A factory plans its run's noise multiplier once, before its first round, with Opacus's
    ``get_noise_multiplier`` (from :func:`fl_client.privacy.plan_noise_multiplier`): a search
    over sigma that evaluates the RDP curve at fractional orders in pure Python. Measured here:
    0.5-2 s per factory for ``molding_quality`` and about 9 s for ``tep_fault`` (sample rate
    near 0.1); 90 of a 3-round 10-factory ``tep_fault`` run's 110 s. The search is a pure
    function of (epsilon, delta, sample rate, steps, accountant, tolerance), and a benchmark
    repeats it with the same arguments in every run on the same data, so inside this context
    ``fl_client.privacy`` calls a memoized copy: the first run pays, later runs get the same
    float back. Nothing else changes (the ledger, the accountant and the spend are untouched).
    The yielded dict counts ``hits`` and ``misses``. Benchmarks only; a deployed factory plans
    once per run anyway.
    """
    import fl_client.privacy as privacy

    original = privacy.get_noise_multiplier
    stats = {"hits": 0, "misses": 0}
    cache: dict[tuple, float] = {}

    def memoized(**kwargs: object) -> float:
        key = tuple(sorted(kwargs.items()))
        if key in cache:
            stats["hits"] += 1
        else:
            stats["misses"] += 1
            cache[key] = original(**kwargs)
        return cache[key]

    privacy.get_noise_multiplier = memoized
    try:
        yield stats
    finally:
        privacy.get_noise_multiplier = original


def guard_findings(summary: dict) -> dict[str, list]:
    """What the contribution guards decided in a run: ``withheld`` (after its last scored
    round), ``groups`` (every duplicate group scored as one factory in some round) and
    ``cleared`` (pairs whose updates were flagged but whose record sketches share no hash), each
    sorted; empty lists when the guards were off or nothing was scored. In a benchmark of
    honest factories every group is a false positive of the copy guard."""
    scored = [r for r in summary.get("factory_rounds") or [] if "withheld" in r]
    groups = {tuple(sorted(g)) for r in scored for g in r.get("duplicate_groups") or []}
    cleared = {tuple(sorted(p)) for r in scored for p in r.get("cleared_pairs") or []}
    return {
        "withheld": sorted(scored[-1].get("withheld") or []) if scored else [],
        "groups": [list(g) for g in sorted(groups)],
        "cleared": [list(p) for p in sorted(cleared)],
    }


def unchanged_rounds(summary: dict) -> list[int]:
    """Rounds after which the global model was left as it was (no aggregation happened).

    Read from the summary's per-round central evaluation: a round whose validation metrics
    (loss included) equal the previous round's to the last bit kept the previous model, which
    happens when too few updates were accepted or the strategy declined to aggregate (Bulyan
    with fewer than 4f + 3 replies). Any real aggregation moves the loss.
    """
    rounds = summary.get("rounds") or []
    return [
        int(cur["round"])
        for prev, cur in zip(rounds, rounds[1:], strict=False)
        if {k: v for k, v in cur.items() if k != "round"}
        == {k: v for k, v in prev.items() if k != "round"}
    ]


class BenchRunner:
    """Many in-process federations for a benchmark, sharing one scratch MLflow store.

    Every run composes ``conf/`` with the benchmark's overrides on the product's defaults:
    contribution scoring and rewards stay on (a benchmark about turning them off says so in
    its overrides, e.g. ``contribution=none``), so a benchmark measures the federation a user
    runs. Only what a benchmark never looks at is changed: ``tracking.register_model=false``,
    MLflow in ``<workdir>/mlflow.db`` (artifacts beside it) and the run's folder in
    ``<workdir>/runs/<name>``. Data lives in ``data_root`` and is
    reused between benchmarks (its folders are named by their parameters). Noise plans are
    memoized across runs (:func:`memoized_noise_planning`) unless ``memoize_noise`` is false.
    Use it as a context manager.
    """

    def __init__(
        self, workdir: Path, data_root: Path, quiet: bool = True, memoize_noise: bool = True
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.data_root = Path(data_root).resolve()
        self.quiet = quiet
        self.memoize_noise = memoize_noise
        self.noise_plans: dict[str, int] = {"hits": 0, "misses": 0}
        self._memo: contextlib.AbstractContextManager[dict[str, int]] | None = None

    def __enter__(self) -> BenchRunner:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.memoize_noise:
            self._memo = memoized_noise_planning()
            self.noise_plans = self._memo.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._memo is not None:
            self._memo.__exit__(None, None, None)
            self._memo = None
        gc.unfreeze()

    def config(self, overrides: list[str], name: str) -> DictConfig:
        """The finalised config of run ``name`` (``overrides`` come last and win)."""
        cfg = compose_config(
            [
                "tracking.register_model=false",
                f"tracking.uri=sqlite:///{self.workdir / 'mlflow.db'}",
                f"tracking.artifact_root={self.workdir / 'mlartifacts'}",
                f"data_root={self.data_root}",
                f"run_name={name}",
                *overrides,
            ]
        )
        return finalize(cfg, base=APP_DIR, output_dir=self.workdir / "runs" / name)

    def run(self, overrides: list[str], name: str) -> tuple[dict, DictConfig]:
        """Run one federation; returns its summary and config.

        Before the run, everything alive is moved out of the garbage collector's sight
        (``gc.freeze``). Flower's Bulyan converts every reply with
        ``ArrayRecord.to_numpy_ndarrays(keep_input=False)``, which calls ``gc.collect()`` each
        time: a full collection over this process's ~700k objects (torch, MLflow, Flower) took
        0.3-0.8 s, i.e. several seconds per Bulyan round. Frozen objects are skipped, so that
        cost drops to the run's own objects; results are unchanged.
        """
        cfg = self.config(overrides, name)
        gc.collect()
        gc.freeze()
        return run_inprocess(cfg, quiet=self.quiet), cfg


def prepare_process() -> None:
    """One torch thread (runs are sequential; timings stay comparable) and no telemetry."""
    import torch

    torch.set_num_threads(1)
    set_quiet()


def add_common_arguments(parser: argparse.ArgumentParser, default_rounds: dict[str, int]) -> None:
    """``--rounds --seed --data-root --keep-runs --out --resume``."""
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"rounds for every task (default {default_rounds})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=APP_DIR / "data")
    parser.add_argument("--keep-runs", action="store_true", help="keep MLflow store and run dirs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--resume", action="store_true", help="keep the finished runs in --out, run the rest"
    )


def grid_parser(
    description: str, tasks: Sequence[str], default_rounds: dict[str, int]
) -> argparse.ArgumentParser:
    """A grid benchmark's parser: ``--tasks`` and the common options; the grid adds its axes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", nargs="+", default=list(tasks), choices=tasks)
    add_common_arguments(parser, default_rounds)
    return parser


def grid_results(
    args: argparse.Namespace, default_rounds: dict[str, int], entries: str, **fields: object
) -> dict:
    """A grid's results file before its first run: what every grid records, ``fields`` (the
    grid's own axes and settings) and an empty ``entries`` list."""
    return {
        "tasks": args.tasks,
        "strategies": args.strategies,
        **fields,
        "rounds": {t: args.rounds or default_rounds[t] for t in args.tasks},
        "num_factories": NUM_FACTORIES,
        "seed": args.seed,
        "privacy": PRIVACY,
        entries: [],
        "seconds": {},
    }


def grid_overrides(task: str, strategy: str, rounds: int, seed: int) -> list[str]:
    """The overrides every federation of a grid starts with: task, strategy and size."""
    return [
        f"task={task}",
        f"strategy={strategy}",
        f"federation.num_factories={NUM_FACTORIES}",
        f"federation.num_rounds={rounds}",
        f"seed={seed}",
    ]


@dataclass(frozen=True)
class GridRun:
    """One step of a grid: its key among the finished entries of an interrupted grid (the key
    :func:`run_grid` is given computes the same from each of its entries), the label of its
    progress line, and ``run``, which runs it on the grid's runner and returns its entry (one
    federation) or entries (a step that trains several models, such as a set of baselines)."""

    key: tuple
    label: str
    run: Callable[[BenchRunner], dict | list[dict]]


def run_grid(
    args: argparse.Namespace,
    name: str,
    results: dict,
    entries: str,
    key: Callable[[dict], tuple],
    plan: Callable[[str], list[GridRun]],
    status: Callable[[dict], str],
    report: Callable[[dict], None],
) -> None:
    """Run every task's ``plan`` in one scratch runner, saving ``results`` after every run.

    With ``--resume`` the entries an interrupted run of the same grid left in ``--out`` (same
    rounds and, where the grid has them, ``overrides``) are kept and not run again. A task's
    time counts on from the interrupted run's. After every run the file is written and a
    progress line printed (``status`` of a finished entry, or its error); at the end
    ``report`` prints the tables (and may add a summary to ``results``), the file is written a
    last time and every task's run count and time are printed.
    """
    out = output_path(args.out, name, args.quick)
    rounds = results["rounds"]
    same = {k: results[k] for k in ("rounds", "overrides") if k in results}
    done, prior = finished_runs(out, entries, key, same) if args.resume else ({}, {})
    t_all = time.monotonic()
    with scratch_runner(name.replace("_", "-"), args.data_root, args.keep_runs) as bench:
        for task in args.tasks:
            t_task = time.monotonic()
            runs = plan(task)
            for i, run in enumerate(runs, 1):
                made = done.get(run.key)
                if made is None:
                    made = run.run(bench)
                made = [made] if isinstance(made, dict) else made
                results[entries].extend(made)
                results["seconds"][task] = prior.get(task, 0.0) + time.monotonic() - t_task
                results["noise_plans"] = dict(bench.noise_plans)
                out.write_text(json.dumps(results, indent=1))
                for entry in made:
                    print(
                        f"[{task} {i}/{len(runs)}] {run.label}: "
                        f"{entry.get('error') or status(entry)}  ({entry['seconds']:.1f} s)",
                        flush=True,
                    )
            print(f"{task}: {len(runs)} runs in {results['seconds'][task] / 60:.1f} min")
    results["seconds"]["total"] = time.monotonic() - t_all
    report(results)
    out.write_text(json.dumps(results, indent=1))
    for task in args.tasks:
        n = sum(1 for e in results[entries] if e["task"] == task)
        seconds = results["seconds"][task]
        print(
            f"{task}: {n} runs, {rounds[task]} rounds each, "
            f"{seconds / 60:.1f} min ({seconds / n:.1f} s/run)"
        )
    print(f"results: {out}")


def summary_report(
    summarise: Callable[[dict], list[dict]], print_tables: Callable[[dict, list[dict]], None]
) -> Callable[[dict], None]:
    """A grid's ``report`` for :func:`run_grid`: ``summarise`` the results into
    ``results["summary"]`` and print them with ``print_tables``."""

    def report(results: dict) -> None:
        results["summary"] = summarise(results)
        print_tables(results, results["summary"])

    return report


def output_path(out: Path | None, name: str, quick: bool) -> Path:
    """``--out`` or ``outputs/<name>.json`` (``<name>_quick.json`` for a smoke run)."""
    path = out or APP_DIR / "outputs" / (f"{name}_quick.json" if quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def finished_runs(
    out: Path, entries: str, key: Callable[[dict], tuple], same: dict
) -> tuple[dict[tuple, list[dict]], dict[str, float]]:
    """The finished entries of an interrupted benchmark in ``out``, grouped by ``key``, and
    its time.

    Only a file whose fields in ``same`` (rounds, overrides...) match this run counts, and a
    step with a failed entry is run again.
    """
    if not out.exists():
        return {}, {}
    previous = json.loads(out.read_text())
    if any(previous.get(field, _missing(value)) != value for field, value in same.items()):
        return {}, {}
    done: dict[tuple, list[dict]] = {}
    for e in previous.get(entries, []):
        done.setdefault(key(e), []).append(e)
    done = {k: made for k, made in done.items() if not any("error" in e for e in made)}
    return done, dict(previous.get("seconds", {}))


def _missing(value: object) -> object:
    """What an older results file without a field counts as: the field's empty value."""
    return type(value)() if isinstance(value, list | dict) else None


@contextmanager
def scratch_runner(name: str, data_root: Path, keep: bool) -> Iterator[BenchRunner]:
    """A :class:`BenchRunner` on a fresh scratch folder (MLflow store, run folders), removed
    afterwards unless ``keep``."""
    workdir = Path(tempfile.mkdtemp(prefix=f"factoryfed-{name}-"))
    print(f"scratch MLflow store and run folders: {workdir}")
    try:
        with BenchRunner(workdir, data_root) as bench:
            yield bench
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run_recorded(
    bench: BenchRunner, overrides: Sequence[str], name: str, record: dict
) -> tuple[dict, object] | None:
    """Run one federation of a grid and fill ``record`` with what every grid reports.

    On success ``record`` gets ``main_metric``, ``test`` (the main metric on the test set),
    ``test_all``, ``val_curve`` (the main metric per round), ``unchanged_rounds``, ``guards``
    (:func:`guard_findings`) and ``seconds``, and the run's summary and config are returned for
    the grid's own fields. A run that fails is a result, not a crash: ``record`` gets ``error``
    and ``seconds``, and None is returned.
    """
    t0 = time.monotonic()
    try:
        summary, cfg = bench.run(list(overrides), name)
    except Exception as exc:
        record.update(error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - t0)
        return None
    main = summary["main_metric"]
    record.update(
        main_metric=main,
        test=summary["test"][main],
        test_all=summary["test"],
        val_curve=[r[main] for r in summary["rounds"]],
        unchanged_rounds=unchanged_rounds(summary),
        guards=guard_findings(summary),
        seconds=summary["wall_seconds"],
    )
    return summary, cfg


def scratch_run_overrides(
    workdir: Path, task: str, factories: int, rounds: int, seed: int
) -> list[str]:
    """Overrides of a benchmark's federation: its size and seed, an MLflow store in the
    scratch folder ``workdir`` and no model registration (benchmarks compare, they don't ship)."""
    return [
        f"task={task}",
        f"federation.num_factories={factories}",
        f"federation.num_rounds={rounds}",
        f"seed={seed}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.artifact_root={workdir / 'artifacts'}",
        "tracking.register_model=false",
    ]
