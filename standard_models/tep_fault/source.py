"""Tennessee Eastman Process data: the real benchmark files and their split into factories.

Data: the Tennessee Eastman Process simulation runs distributed by Braatz's group and
described in L.H. Chiang, E.L. Russell and R.D. Braatz, *Fault Detection and Diagnosis in
Industrial Systems*, Springer, 2001 (also E.L. Russell, L.H. Chiang and R.D. Braatz, *Data-driven
Techniques for Fault Detection and Diagnosis in Chemical Processes*, Springer, 2000). The
simulator itself is J.J. Downs and E.F. Vogel, "A plant-wide industrial process control problem",
Computers & Chemical Engineering 17(3), 1993. The files ship inside the PyPI package
``bibmon==1.2.0`` (folder ``tennessee_eastman``), so they install offline; they are read here
with numpy directly because the package's own loader maps file ids wrongly.

Files: ``dXX.dat`` are the training runs of fault XX (``d00`` = normal operation, 500 samples,
stored transposed; faults 480 samples, recorded with the fault already active);
``dXX_te.dat`` are the test runs (960 samples, fault introduced after sample 160). Each sample
holds 52 variables: XMEAS(1..41) then XMV(1..11), one sample every 3 minutes.

Factories (``scheme="natural"``): every plant has seen normal operation (a contiguous share of
``d00``) plus one family of faults, because plants with different equipment suffer different
failure modes. Families by disturbance type: step (1-7), random variation (8-12), slow drift
(13), sticking valves (14-15), unknown (16-20), constant valve position (21). With fewer than
six factories, families are merged greedily (largest family to the currently smallest factory);
with more, the family with most classes is halved until there are enough groups; beyond 21
factories a fault is shared by several plants, each getting a contiguous piece of its run.
Sizes follow the families (7 step faults outweigh the single drift fault), so ``quantity_skew``
is not applied on top in this scheme.

``scheme="dirichlet"`` and ``"iid"`` cut every training run into contiguous segments of
:data:`SEGMENT_ROWS` samples and deal the segments out (by class with Dirichlet shares, or at
random), sized by ``quantity_skew``.

Server sets come from the test runs. Only samples 160..959 are used (the first 160 samples of
every test run are normal operation before the fault and would make normal 5x more frequent
than any fault). Those 800 samples per run are cut into four blocks of 200; blocks 0 and 2 form
the validation set and blocks 1 and 3 the test set, so both sets hold every class with equal
weight and both see early (transient) and developed fault behaviour.

Known difficulty: faults 3, 9 and 15 are nearly undetectable from these variables; a
centralised random forest on single samples reaches macro-F1 about 0.64 over all 22 classes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..base import FederatedData, PartitionConfig
from ..common import package_folder
from ..partition import (
    STREAM_PARTITION,
    STREAM_SIZES,
    apply_feature_shift,
    check_generate_args,
    contiguous_bounds,
    dirichlet_split,
    iid_split,
    rng_for,
    size_weights,
)

NUM_CLASSES = 22
NUM_VARIABLES = 52
FEATURES: tuple[str, ...] = tuple(
    [f"xmeas_{i:02d}" for i in range(1, 42)] + [f"xmv_{i:02d}" for i in range(1, 12)]
)
LABEL = "fault"
RUN = "run_id"
TIME = "t"

FAULT_FAMILIES: dict[str, tuple[int, ...]] = {
    "step": (1, 2, 3, 4, 5, 6, 7),
    "random_variation": (8, 9, 10, 11, 12),
    "slow_drift": (13,),
    "sticking_valves": (14, 15),
    "unknown": (16, 17, 18, 19, 20),
    "valve_constant": (21,),
}
SEGMENT_ROWS = 60
FAULT_ONSET_TEST = 160
TEST_BLOCKS = 4
CITATION = (
    "Tennessee Eastman Process data of E.L. Russell, L.H. Chiang and R.D. Braatz "
    "(Springer 2000/2001), simulator of Downs and Vogel (1993), as shipped in bibmon 1.2.0"
)


def data_dir() -> Path:
    """Folder holding the ``dXX.dat`` files inside the installed ``bibmon`` package."""
    folder = package_folder(
        "bibmon",
        "the Tennessee Eastman data needs the package bibmon==1.2.0 "
        "(pip install --no-deps bibmon==1.2.0)",
    ) / "tennessee_eastman"
    if not folder.is_dir():
        raise RuntimeError(f"bibmon is installed but has no tennessee_eastman folder at {folder}")
    return folder


def _read(name: str) -> np.ndarray:
    path = data_dir() / name
    values = np.loadtxt(path, dtype=np.float64)
    if values.shape[1] != NUM_VARIABLES and values.shape[0] == NUM_VARIABLES:
        values = values.T  # d00.dat is stored variables x samples
    if values.shape[1] != NUM_VARIABLES:
        raise RuntimeError(f"{path}: expected {NUM_VARIABLES} variables, found {values.shape}")
    values.setflags(write=False)
    return values


@lru_cache(maxsize=1)
def train_runs() -> tuple[np.ndarray, ...]:
    """The 22 training runs, indexed by fault number (read once per process)."""
    return tuple(_read(f"d{k:02d}.dat") for k in range(NUM_CLASSES))


@lru_cache(maxsize=1)
def test_runs() -> tuple[np.ndarray, ...]:
    """The 22 test runs (960 samples each, fault from sample 160), indexed by fault number."""
    return tuple(_read(f"d{k:02d}_te.dat") for k in range(NUM_CLASSES))


@lru_cache(maxsize=1)
def reference_stats() -> tuple[np.ndarray, np.ndarray]:
    """Per-variable mean and standard deviation of normal operation (training run ``d00``).

    Fixed reference statistics for standardisation: every factory and the server scale the
    same way without sharing any data-dependent statistic.
    """
    normal = train_runs()[0]
    mean = normal.mean(axis=0)
    std = np.maximum(normal.std(axis=0), 1e-6)
    mean.setflags(write=False)
    std.setflags(write=False)
    return mean, std


def _frame(pieces: list[tuple[int, int, int, str]], runs: tuple[np.ndarray, ...]) -> pd.DataFrame:
    """Rows of ``(fault, start, stop, run_id)`` pieces as a frame in schema column order."""
    if not pieces:
        raise ValueError("a factory received no data")
    blocks, faults, times, ids = [], [], [], []
    for fault, start, stop, run_id in pieces:
        blocks.append(runs[fault][start:stop])
        faults.append(np.full(stop - start, fault, dtype=np.int64))
        times.append(np.arange(start, stop, dtype=np.int64))
        ids.extend([run_id] * (stop - start))
    values = np.concatenate(blocks)
    df = pd.DataFrame(values, columns=list(FEATURES))
    df.insert(0, TIME, np.concatenate(times))
    df.insert(0, RUN, pd.Series(ids, dtype=object).astype(str))
    df[LABEL] = np.concatenate(faults)
    return df


def natural_groups(num_factories: int) -> list[list[int]]:
    """Fault classes (excluding normal) held by each factory under the natural split.

    A fault listed for several factories is shared: each gets a contiguous piece of its run.
    """
    groups = [list(f) for f in FAULT_FAMILIES.values()]
    while len(groups) < num_factories and any(len(g) > 1 for g in groups):
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups.pop(i)
        half = (len(g) + 1) // 2
        groups[i:i] = [g[:half], g[half:]]
    if len(groups) > num_factories:
        bins: list[list[int]] = [[] for _ in range(num_factories)]
        load = [0] * num_factories
        for g in sorted(groups, key=len, reverse=True):
            b = min(range(num_factories), key=lambda j: load[j])
            bins[b].extend(g)
            load[b] += len(g)
        return [sorted(b) for b in bins]
    while len(groups) < num_factories:
        groups.append(list(groups[len(groups) % 21]))
    return groups


def _natural_pieces(num_factories: int, runs: tuple[np.ndarray, ...]) -> list[list[tuple]]:
    groups = natural_groups(num_factories)
    holders: dict[int, list[int]] = {}
    for f, group in enumerate(groups):
        for fault in group:
            holders.setdefault(fault, []).append(f)
    pieces: list[list[tuple]] = [[] for _ in range(num_factories)]
    for f, (start, stop) in enumerate(contiguous_bounds(len(runs[0]), num_factories)):
        pieces[f].append((0, start, stop, f"d00_p{f:03d}"))
    for fault in sorted(holders):
        owners = holders[fault]
        bounds = contiguous_bounds(len(runs[fault]), len(owners))
        for j, (f, (start, stop)) in enumerate(zip(owners, bounds, strict=True)):
            run_id = f"d{fault:02d}" if len(owners) == 1 else f"d{fault:02d}_p{j:03d}"
            pieces[f].append((fault, start, stop, run_id))
    return pieces


def _segments(runs: tuple[np.ndarray, ...]) -> list[tuple[int, int, int, str]]:
    segs = []
    for fault, run in enumerate(runs):
        n_seg = max(1, round(len(run) / SEGMENT_ROWS))
        for j, (start, stop) in enumerate(contiguous_bounds(len(run), n_seg)):
            segs.append((fault, start, stop, f"d{fault:02d}_s{j:02d}"))
    return segs


def _server_sets() -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = test_runs()
    val, test = [], []
    for fault, run in enumerate(runs):
        bounds = contiguous_bounds(len(run) - FAULT_ONSET_TEST, TEST_BLOCKS)
        for b, (start, stop) in enumerate(bounds):
            piece = (fault, FAULT_ONSET_TEST + start, FAULT_ONSET_TEST + stop,
                     f"d{fault:02d}_te_b{b}")
            (val if b % 2 == 0 else test).append(piece)
    return _frame(val, runs), _frame(test, runs)


def generate(num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
    """Factories' frames from the training runs, server validation/test frames from test runs.

    Deterministic in ``seed``; ``natural`` does not use randomness apart from feature shift.
    """
    check_generate_args(num_factories, seed, partition)
    runs = train_runs()
    if partition.scheme == "natural":
        pieces = _natural_pieces(num_factories, runs)
        groups = natural_groups(num_factories)
    else:
        segs = _segments(runs)
        weights = size_weights(
            num_factories, partition.quantity_skew, rng_for(seed, STREAM_SIZES)
        )
        rng = rng_for(seed, STREAM_PARTITION)
        if partition.scheme == "dirichlet":
            labels = np.array([s[0] for s in segs])
            parts = dirichlet_split(labels, num_factories, partition.alpha, rng, weights)
        else:
            parts = iid_split(len(segs), weights, rng)
        pieces = [[segs[i] for i in part] for part in parts]
        groups = [sorted({segs[i][0] for i in part} - {0}) for part in parts]
    mean, std = reference_stats()
    factories = [
        apply_feature_shift(
            _frame(p, runs), FEATURES, mean, std, partition.feature_shift, seed, i
        )
        for i, p in enumerate(pieces)
    ]
    validation, test = _server_sets()
    info = {
        "source": CITATION,
        "factory_faults": [[int(k) for k in g] for g in groups],
        "split": "validation: test-run samples 160-359 and 560-759; "
        "test: samples 360-559 and 760-959",
    }
    return FederatedData(factories=factories, validation=validation, test=test, info=info)
