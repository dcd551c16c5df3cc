"""Synthetic run-to-failure histories of rotating machines (spindles, pumps) for RUL regression.

Modelled on NASA's C-MAPSS turbofan benchmark (A. Saxena, K. Goebel, D. Simon and N. Eklund,
"Damage propagation modeling for aircraft engine run-to-failure simulation", PHM 2008), whose
files cannot be installed offline: every unit starts with some initial wear, accumulates
damage ``d(t) = d0 + (1 - d0) * (t / L) ** p`` over its life of ``L`` cycles and fails when
``d = 1``. Each cycle records three operating settings and 14 sensors; 11 sensors drift with
the damage (each with its own gain and curvature), all depend on the operating condition, and
3 carry no degradation information at all, as in C-MAPSS.

Operating settings: ``op_1`` load (% of rated), ``op_2`` speed (krpm), ``op_3`` ambient
temperature (deg C). Six operating-condition clusters exist (:data:`OP_CLUSTERS`); harsher
clusters shorten life. A unit runs in one cluster for its whole life (a machine dedicated to
one product).

Target: ``rul = min(L - cycle, 125)``, the piecewise-linear cap used with C-MAPSS, because
early-life degradation is not observable and an uncapped target only adds noise.

Factories (:class:`FactoryProfile`): each plant runs its machines in two of the six clusters,
has its own typical life (maintenance practice, duty) and its own sensor calibration and noise.
Partition schemes: ``natural`` gives factory ``i`` the units of profile ``i`` (unit counts drawn
by ``quantity_skew``); ``iid`` pools the units of all profiles and deals them out at random;
``dirichlet`` deals the pooled units out with Dirichlet skew over their operating-condition
cluster (the regression analogue of label skew). Validation and test units are drawn in equal
numbers from every profile and are complete run-to-failure histories; every window is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..base import FederatedData, PartitionConfig
from ..partition import (
    STREAM_PARTITION,
    STREAM_PROFILES,
    STREAM_SAMPLES,
    STREAM_SIZES,
    STREAM_TEST,
    STREAM_VALIDATION,
    allocate,
    apply_feature_shift,
    check_generate_args,
    dirichlet_split,
    iid_split,
    rng_for,
    size_weights,
)

RUL_CAP = 125.0
UNIT = "unit_id"
CYCLE = "cycle"
LABEL = "rul"
OPS: tuple[str, ...] = ("op_1", "op_2", "op_3")
NUM_SENSORS = 14
SENSORS: tuple[str, ...] = tuple(f"s_{i:02d}" for i in range(1, NUM_SENSORS + 1))
FEATURES: tuple[str, ...] = OPS + SENSORS

OP_CLUSTERS = np.array(
    [
        [40.0, 1.5, 20.0],
        [60.0, 3.0, 25.0],
        [80.0, 2.0, 30.0],
        [100.0, 1.0, 20.0],
        [60.0, 4.0, 35.0],
        [90.0, 2.5, 25.0],
    ]
)
CLUSTER_LIFE_FACTOR = np.array([1.15, 1.0, 0.9, 0.85, 0.9, 0.8])
OP_CENTER = np.array([70.0, 2.5, 27.5])
OP_SCALE = np.array([30.0, 1.5, 7.5])

# Per sensor: base value, effect of each standardised op setting, damage gain at d = 1,
# damage curvature, noise standard deviation.
SENSOR_TABLE = np.array(
    [
        # base,  op_1,  op_2,  op_3,  gain,  curv, noise
        [60.0, 8.0, 4.0, 5.0, 18.0, 1.5, 1.0],  # s_01 bearing temperature, deg C
        [25.0, 6.0, 2.0, 0.0, 3.0, 2.0, 0.4],  # s_02 motor current, A
        [2.0, 0.3, 0.6, 0.0, 4.0, 2.5, 0.25],  # s_03 vibration RMS, mm/s
        [11.0, 4.0, 2.0, 0.0, 1.5, 1.5, 0.3],  # s_04 spindle power, kW
        [30.0, 2.0, 1.0, 6.0, 3.0, 1.2, 0.5],  # s_05 coolant return temperature, deg C
        [4.5, 0.1, 0.3, -0.1, -1.0, 1.5, 0.08],  # s_06 lubricating oil pressure, bar
        [70.0, 3.0, 4.0, 0.0, 8.0, 2.0, 1.0],  # s_07 acoustic emission, dB
        [75.0, 10.0, 3.0, 5.0, 6.0, 1.5, 1.2],  # s_08 motor winding temperature, deg C
        [5.0, 1.0, 2.0, 0.0, 6.0, 3.0, 1.0],  # s_09 speed tracking error, rpm
        [1.5, 0.3, 0.2, 0.0, 2.0, 2.0, 0.2],  # s_10 torque ripple, %
        [14.0, 0.3, 0.2, 0.0, 4.0, 1.8, 0.5],  # s_11 oil particle count, ISO code
        [400.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0],  # s_12 supply voltage, V
        [45.0, 0.0, 0.0, -3.0, 0.0, 1.0, 3.0],  # s_13 cabinet humidity, %
        [120.0, 5.0, 0.0, 0.0, 0.0, 1.0, 1.5],  # s_14 clamping hydraulic pressure, bar
    ]
)
# Fixed standardisation reference (not fitted to any data): typical level and spread of each
# sensor over a life, from the table above.
SENSOR_CENTER = SENSOR_TABLE[:, 0] + 0.3 * SENSOR_TABLE[:, 4]
SENSOR_SCALE = np.sqrt(
    (SENSOR_TABLE[:, 1:4] ** 2).sum(axis=1)
    + (0.35 * SENSOR_TABLE[:, 4]) ** 2
    + SENSOR_TABLE[:, 6] ** 2
)
FEATURE_CENTER = np.concatenate([OP_CENTER, SENSOR_CENTER])
FEATURE_SCALE = np.concatenate([OP_SCALE, SENSOR_SCALE])

UNITS_PER_FACTORY = 12
VALIDATION_UNITS = 24
TEST_UNITS = 24
MIN_LIFE = 80
MAX_LIFE = 450


@dataclass(frozen=True)
class FactoryProfile:
    """One plant: its operating clusters, typical life, sensor calibration and noise level."""

    clusters: tuple[int, ...]
    life_mean: float
    cal_offset: np.ndarray  # per sensor, in SENSOR_SCALE units
    noise: float  # multiplier of the table's noise


def make_profile(index: int, rng: np.random.Generator) -> FactoryProfile:
    """Plant ``index``: clusters ``index`` and ``index + 3`` (mod 6), so plants overlap partly."""
    n = len(OP_CLUSTERS)
    return FactoryProfile(
        clusters=(index % n, (index + 3) % n),
        life_mean=float(rng.uniform(170.0, 260.0)),
        cal_offset=rng.normal(0.0, 0.05, size=NUM_SENSORS),
        noise=float(rng.uniform(0.8, 1.3)),
    )


def simulate_unit(
    profile: FactoryProfile, unit_id: str, rng: np.random.Generator
) -> tuple[pd.DataFrame, int]:
    """One unit's run-to-failure history and its operating-condition cluster."""
    cluster = int(rng.choice(profile.clusters))
    life = profile.life_mean * CLUSTER_LIFE_FACTOR[cluster] * rng.lognormal(0.0, 0.2)
    life = int(np.clip(round(life), MIN_LIFE, MAX_LIFE))
    curvature = rng.uniform(1.6, 2.6)
    d0 = rng.uniform(0.0, 0.08)
    cycle = np.arange(1, life + 1)
    damage = d0 + (1.0 - d0) * (cycle / life) ** curvature
    ops = OP_CLUSTERS[cluster] + rng.normal(size=(life, 3)) * OP_SCALE * 0.01
    op_std = (ops - OP_CENTER) / OP_SCALE
    base, op_eff = SENSOR_TABLE[:, 0], SENSOR_TABLE[:, 1:4]
    gain, curv, noise = SENSOR_TABLE[:, 4], SENSOR_TABLE[:, 5], SENSOR_TABLE[:, 6]
    unit_offset = rng.normal(size=NUM_SENSORS) * noise * 0.5
    sensors = (
        base
        + op_std @ op_eff.T
        + gain * damage[:, None] ** curv
        + unit_offset
        + rng.normal(size=(life, NUM_SENSORS)) * noise * profile.noise
        + profile.cal_offset * SENSOR_SCALE
    )
    df = pd.DataFrame(np.column_stack([ops, sensors]), columns=list(FEATURES))
    df.insert(0, CYCLE, cycle.astype(np.int64))
    df.insert(0, UNIT, unit_id)
    df[LABEL] = np.minimum(life - cycle, RUL_CAP).astype(np.float64)
    return df, cluster


def _units(
    profile: FactoryProfile, count: int, prefix: str, seed: int, stream: tuple[int, ...]
) -> tuple[list[pd.DataFrame], list[int]]:
    rng = rng_for(seed, *stream)
    frames, clusters = [], []
    for k in range(count):
        df, c = simulate_unit(profile, f"{prefix}_u{k:03d}", rng)
        frames.append(df)
        clusters.append(c)
    return frames, clusters


def _server_set(
    profiles: list[FactoryProfile], total: int, name: str, seed: int, stream: int
) -> pd.DataFrame:
    counts = allocate(total, np.ones(len(profiles)))
    frames = []
    for i, (p, c) in enumerate(zip(profiles, counts, strict=True)):
        frames.extend(_units(p, int(c), f"{name}_p{i:03d}", seed, (stream, i))[0])
    return pd.concat(frames, ignore_index=True)


def generate(num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
    """Factories' unit histories and server validation/test units; deterministic in ``seed``."""
    check_generate_args(num_factories, seed, partition)
    profiles = [make_profile(i, rng_for(seed, STREAM_PROFILES, i)) for i in range(num_factories)]
    weights = size_weights(num_factories, partition.quantity_skew, rng_for(seed, STREAM_SIZES))
    if partition.scheme == "natural":
        counts = allocate(num_factories * UNITS_PER_FACTORY, weights, minimum=2)
        frames, unit_clusters = [], []
        for i, (p, c) in enumerate(zip(profiles, counts, strict=True)):
            f, cl = _units(p, int(c), f"p{i:03d}", seed, (STREAM_SAMPLES, i))
            frames.append(pd.concat(f, ignore_index=True))
            unit_clusters.append(cl)
    else:
        pool: list[pd.DataFrame] = []
        clusters: list[int] = []
        for i, p in enumerate(profiles):
            f, c = _units(p, UNITS_PER_FACTORY, f"p{i:03d}", seed, (STREAM_SAMPLES, i))
            pool.extend(f)
            clusters.extend(c)
        rng = rng_for(seed, STREAM_PARTITION)
        if partition.scheme == "dirichlet":
            parts = dirichlet_split(np.array(clusters), num_factories, partition.alpha, rng,
                                    weights)
        else:
            parts = iid_split(len(pool), weights, rng)
        frames = [pd.concat([pool[k] for k in part], ignore_index=True) for part in parts]
        unit_clusters = [[clusters[k] for k in part] for part in parts]
    factories = [
        apply_feature_shift(
            f, SENSORS, SENSOR_CENTER, SENSOR_SCALE, partition.feature_shift, seed, i
        )
        for i, f in enumerate(frames)
    ]
    validation = _server_set(profiles, VALIDATION_UNITS, "val", seed, STREAM_VALIDATION)
    test = _server_set(profiles, TEST_UNITS, "test", seed, STREAM_TEST)
    info = {
        "units": [int(f[UNIT].nunique()) for f in factories],
        "units_per_cluster": [
            np.bincount(c, minlength=len(OP_CLUSTERS)).tolist() for c in unit_clusters
        ],
        "profile_clusters": [list(p.clusters) for p in profiles],
    }
    return FederatedData(factories=factories, validation=validation, test=test, info=info)
