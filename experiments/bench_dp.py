"""Cost of DP-SGD per standard model: epoch time, per-round cost and peak memory.

Usage::

    python -m experiments.bench_dp [--rounds R] [--epochs E] [--tasks tep_fault rul ...]
                                   [--batch-size B] [--modes non-private bk ...]

For each standard model, one factory's generated data (fixed small seed, in memory) is trained
the way a factory trains in a federated round, on the same examples (``to_train_dataset``: one
per declared privacy unit): one ``train_local`` call of ``--epochs`` local epochs (a
*round*), at the task's DP-SGD batch size (``conf/task/<task>.yaml``: ``dp_batch_size`` where
set, else ``batch_size``; or ``--batch-size``) for every mode. Modes: non-private SGD and DP-SGD
with each clipping implementation (``bk``: one-pass book-keeping clipping, the default;
``ghost``: Opacus ghost clipping; ``hooks``: Opacus per-sample gradients; ``--modes`` picks
some, non-private always runs as the baseline of the ratios). Each mode runs one warm-up
round and ``--rounds`` measured rounds; the modes take turns round by round, so drift of the
machine affects them alike, and all numbers of a table come from the same process.

* ms/epoch: median wall time of one epoch's training loop, over the epochs of the measured
  rounds after each round's first (the steady state of a multi-epoch round);
* setup ms: median per-round cost outside the steady epochs: the round's wall time (the
  whole ``train_local`` call: loaders, DP wrapping, every epoch, unwrapping, copying the
  weights) minus ``E`` steady epochs. It is paid once per round, whatever ``E``;
* ms/round: median wall time of the whole call, so nothing is left out of the comparison;
* CPU ms/round: median CPU time this process spent in the call (``time.process_time``; with
  one torch thread, the training's own work). Wall times count every pause the scheduler
  imposes, so on a machine shared with other jobs they can swing by several times from one
  round to the next; CPU time hardly moves, and its ratio is the one to trust there;
* peak memory: the process's peak resident set size during a round above its size just
  before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with free
  heap memory handed back to the OS first), max over the measured rounds. PyTorch's CPU
  tensors bypass Python's allocator, so ``tracemalloc`` would not see them; RSS does. Where
  the reset is unavailable the column reads ``n/a``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fl_client.training import LocalTrainConfig, train_local
from fl_server.config import compose_config, train_recipe
from standard_models.base import PartitionConfig, StandardTask
from standard_models.registry import get_task, task_names

MODES = ("non-private", "bk", "ghost", "hooks")
NOISE_MULTIPLIER = 1.0
DATA_SEED = 7
NUM_FACTORIES = 4


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class RoundTiming:
    """What one measured round (one ``train_local`` call) took."""

    wall_s: float
    epoch_s: tuple[float, ...]
    peak_mib: float | None
    cpu_s: float = 0.0


def measure_round(run: Callable[[], tuple[float, ...]]) -> RoundTiming:
    """Run one round; return its wall time, epoch times, peak RSS growth (MiB) and CPU time."""
    _trim_heap()
    before = _status_kib("VmRSS")
    can_reset = before is not None and _reset_peak_rss()
    cpu_started = time.process_time()
    started = time.perf_counter()
    epochs = run()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    peak = _status_kib("VmHWM") if can_reset else None
    if peak is None or before is None:
        return RoundTiming(wall, epochs, None, cpu)
    return RoundTiming(wall, epochs, max(peak - before, 0) / 1024, cpu)


@dataclass
class ModeStats:
    """Measurements of one training mode on one task."""

    rounds: list[RoundTiming] = field(default_factory=list)

    @property
    def epoch_s(self) -> float:
        """Median steady epoch: every epoch of every measured round except the round's first."""
        steady = [t for r in self.rounds for t in r.epoch_s[1:]]
        return statistics.median(steady or [t for r in self.rounds for t in r.epoch_s])

    @property
    def round_s(self) -> float:
        return statistics.median(r.wall_s for r in self.rounds)

    @property
    def cpu_s(self) -> float:
        """Median CPU time of a whole round."""
        return statistics.median(r.cpu_s for r in self.rounds)

    @property
    def setup_s(self) -> float:
        """Median per-round cost beyond the steady epochs (setup, first-epoch extra, teardown)."""
        steady = self.epoch_s
        return statistics.median(r.wall_s - len(r.epoch_s) * steady for r in self.rounds)

    @property
    def mem_mib(self) -> float | None:
        peaks = [r.peak_mib for r in self.rounds if r.peak_mib is not None]
        return max(peaks) if peaks else None


def bench_task(
    task: StandardTask,
    rounds: int,
    epochs: int,
    batch_size: int,
    modes: Sequence[str] = MODES,
) -> tuple[dict[str, ModeStats], int]:
    """Time and measure ``modes`` on the first generated factory of ``task``.

    ``"non-private"`` is always measured (first), as the baseline of every ratio. Returns the
    statistics per mode and the number of training examples.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {list(MODES)}")
    modes = ["non-private", *[m for m in MODES if m in modes and m != "non-private"]]
    data = task.generate(NUM_FACTORIES, DATA_SEED, PartitionConfig())
    # What the factory trains on: one example per privacy unit (non-overlapping TEP and RUL
    # windows), not the stride-1 windows of the evaluation sets.
    dataset = task.to_train_dataset(data.factories[0])
    stats = {mode: ModeStats() for mode in modes}

    def one_round(mode: str, seed: int) -> Callable[[], tuple[float, ...]]:
        def run() -> tuple[float, ...]:
            cfg = LocalTrainConfig(
                local_epochs=epochs,
                batch_size=batch_size,
                dp=mode != "non-private",
                grad_sample_mode="bk" if mode == "non-private" else mode,
                seed=seed,
                reproducible_dp=True,
            )
            torch.manual_seed(seed)
            model = task.build_model()
            result = train_local(
                model,
                dataset,
                task.loss_fn(),
                cfg,
                noise_multiplier=NOISE_MULTIPLIER if cfg.dp else None,
                supports_ghost=task.supports_ghost,
            )
            return result.epoch_seconds

        return run

    for rnd in range(rounds + 1):
        for mode in modes:
            timing = measure_round(one_round(mode, rnd))
            if rnd > 0:  # round 0 is the warm-up
                stats[mode].rounds.append(timing)
    return stats, len(dataset)  # type: ignore[arg-type]


def _fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def rows(results: dict[str, dict[str, ModeStats]], batch_sizes: dict[str, int]) -> list[list[str]]:
    """Table rows: task, mode, batch, epoch/setup/round/CPU times, memory, ratios to non-private."""
    out = []
    for name, stats in results.items():
        base = stats["non-private"]
        for mode, s in stats.items():
            out.append(
                [
                    name,
                    mode,
                    str(batch_sizes[name]),
                    f"{s.epoch_s * 1000:.1f}",
                    _ratio(s.epoch_s, base.epoch_s),
                    f"{s.setup_s * 1000:.1f}",
                    f"{s.round_s * 1000:.0f}",
                    _ratio(s.round_s, base.round_s),
                    f"{s.cpu_s * 1000:.0f}",
                    _ratio(s.cpu_s, base.cpu_s),
                    _fmt_mem(s.mem_mib),
                    _ratio(s.mem_mib, base.mem_mib),
                ]
            )
    return out


HEADERS = [
    "task",
    "mode",
    "batch",
    "ms/epoch",
    "x epoch",
    "setup ms",
    "ms/round",
    "x round",
    "CPU ms/round",
    "x CPU",
    "peak MiB",
    "x memory",
]


def print_table(table: list[list[str]], title: str) -> None:
    """Print with rich when it is installed, else as aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in [HEADERS, *table]) for i in range(len(HEADERS))]
        print(title)
        for r in [HEADERS, *table]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return
    t = Table(
        title=title,
        caption="x epoch, x round, x CPU, x memory: mode / non-private on the same task; "
        "setup ms: per-round cost beyond the steady epochs; CPU: this process's CPU time",
    )
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("task", "mode") else "right", no_wrap=True)
    for r in table:
        t.add_row(*r)
    # Wide enough for every column when the output is piped (rich then assumes 80).
    Console(width=max(Console().width, 180)).print(t)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per mode")
    parser.add_argument(
        "--epochs", type=int, default=4, help="local epochs per round (steady epochs: 2..E)"
    )
    parser.add_argument("--tasks", nargs="+", default=None, help=f"of {task_names()}")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size for every task (default: each task's DP-SGD batch in conf/, "
        "train.dp_batch_size where set, else train.batch_size)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: small models gain nothing from more, and on a busy "
        "machine extra threads contend for the cores and distort the timings)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="modes to measure (non-private always runs: it is the baseline of the ratios)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be >= 1")
    names = args.tasks or task_names()
    unknown = sorted(set(names) - set(task_names()))
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {task_names()}")

    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    results: dict[str, dict[str, ModeStats]] = {}
    sizes = {}
    batch_sizes = {}
    for name in names:
        task = get_task(name)
        # One batch size for both modes, so the ratio is the cost of privacy at equal work:
        # the task's DP-SGD batch (conf/task/<task>.yaml dp_batch_size, else batch_size).
        batch_sizes[name] = args.batch_size or train_recipe(
            compose_config([f"task={name}"]).task.train, dp=True
        )[0]
        results[name], sizes[name] = bench_task(
            task, args.rounds, args.epochs, batch_sizes[name], args.modes
        )
    title = (
        f"DP-SGD cost ({args.rounds} measured rounds of {args.epochs} local epochs per mode, "
        f"medians; {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; examples: "
        + ", ".join(f"{k}={v}" for k, v in sizes.items())
        + ")"
    )
    print_table(rows(results, batch_sizes), title)


if __name__ == "__main__":
    main()
