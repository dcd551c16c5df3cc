"""Cost of DP-SGD per standard model: epoch time and peak memory, DP vs non-private.

Usage::

    python -m experiments.bench_dp [--epochs N] [--tasks tep_fault rul ...]

For each standard model, one factory's generated data (fixed small seed, in memory) is
trained for one warm-up epoch and ``--epochs`` measured epochs in each mode: non-private SGD,
DP-SGD with Opacus ghost clipping, and DP-SGD with Opacus hooks (per-sample gradients). The
modes take turns epoch by epoch, so drift of the machine affects them alike, and all numbers
of a table come from the same process.

* epoch time: median wall time of the training loop over the measured epochs (the one-off
  ``make_private`` wrapping is left out);
* peak memory: the process's peak resident set size during an epoch above its size just
  before it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with free
  heap memory handed back to the OS first), max over the measured epochs. PyTorch's CPU
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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fl_client.training import LocalTrainConfig, train_local
from standard_models.base import PartitionConfig, StandardTask
from standard_models.registry import get_task, task_names

MODES = ("non-private", "ghost", "hooks")
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


def measure_epoch(run: Callable[[], float]) -> tuple[float, float | None]:
    """Run one epoch; return its training seconds and peak RSS growth in MiB (or ``None``)."""
    _trim_heap()
    before = _status_kib("VmRSS")
    can_reset = before is not None and _reset_peak_rss()
    seconds = run()
    peak = _status_kib("VmHWM") if can_reset else None
    if peak is None or before is None:
        return seconds, None
    return seconds, max(peak - before, 0) / 1024


@dataclass
class ModeStats:
    """Measurements of one training mode on one task."""

    seconds: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)

    @property
    def epoch_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mem_mib(self) -> float | None:
        return max(self.peak_mib) if self.peak_mib else None


def bench_task(
    task: StandardTask, epochs: int, batch_size: int
) -> tuple[dict[str, ModeStats], int]:
    """Time and measure every mode on the first generated factory of ``task``.

    Returns the statistics per mode and the number of training examples.
    """
    data = task.generate(NUM_FACTORIES, DATA_SEED, PartitionConfig())
    dataset = task.to_dataset(data.factories[0])
    stats = {mode: ModeStats() for mode in MODES}

    def one_epoch(mode: str, seed: int) -> Callable[[], float]:
        def run() -> float:
            cfg = LocalTrainConfig(
                local_epochs=1,
                batch_size=batch_size,
                dp=mode != "non-private",
                grad_sample_mode="ghost" if mode == "non-private" else mode,
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
            return result.train_seconds

        return run

    for epoch in range(epochs + 1):
        for mode in MODES:
            seconds, peak = measure_epoch(one_epoch(mode, epoch))
            if epoch == 0:  # warm-up
                continue
            stats[mode].seconds.append(seconds)
            if peak is not None:
                stats[mode].peak_mib.append(peak)
    return stats, len(dataset)  # type: ignore[arg-type]


def _fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}x"


def rows(results: dict[str, dict[str, ModeStats]]) -> list[list[str]]:
    """Table rows: task, mode, epoch time, peak memory and both ratios to non-private."""
    out = []
    for name, stats in results.items():
        base = stats["non-private"]
        for mode in MODES:
            s = stats[mode]
            out.append(
                [
                    name,
                    mode,
                    f"{s.epoch_s * 1000:.0f}",
                    _ratio(s.epoch_s, base.epoch_s),
                    _fmt_mem(s.mem_mib),
                    _ratio(s.mem_mib, base.mem_mib),
                ]
            )
    return out


HEADERS = ["task", "mode", "ms/epoch", "x time", "peak MiB", "x memory"]


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
    t = Table(title=title, caption="x time, x memory: mode / non-private on the same task")
    for h in HEADERS:
        t.add_column(h, justify="left" if h in ("task", "mode") else "right", no_wrap=True)
    for r in table:
        t.add_row(*r)
    Console().print(t)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs per mode")
    parser.add_argument("--tasks", nargs="+", default=None, help=f"of {task_names()}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: small models gain nothing from more, and on a busy "
        "machine extra threads contend for the cores and distort the timings)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
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
    for name in names:
        task = get_task(name)
        results[name], sizes[name] = bench_task(task, args.epochs, args.batch_size)
    title = (
        f"DP-SGD cost per epoch (batch {args.batch_size}, median of {args.epochs} epochs, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs; examples: "
        + ", ".join(f"{k}={v}" for k, v in sizes.items())
        + ")"
    )
    print_table(rows(results), title)


if __name__ == "__main__":
    main()
