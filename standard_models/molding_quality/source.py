"""Synthetic injection-moulding shots with a rare defect label.

Each row is one shot on an injection-moulding machine. The generator follows the usual
process-window reasoning of moulding practice:

* short shot (incomplete fill): melt too cold, injection pressure or speed too low;
* flash (material escaping at the parting line): injection/holding pressure and melt
  temperature too high;
* sink marks: holding pressure, hold time or cooling time too short, hot mould;
* warpage: a temperature difference between the two mould halves and short cooling.

Every failure mode has a risk score, a linear combination of the deviations of the *true*
process values from a common nominal point; a shot is defective with a probability that rises
steeply once a risk passes its threshold, giving a defect rate of a few percent overall.

Factories differ the way real plants do (:class:`FactoryProfile`): their own set-points
(operating window) and process spread, their own part (nominal shot weight) and machine
calibration (offset and gain of each recorded channel relative to the true value), hence
different defect rates. The features recorded per shot are the *measured* values, so a model
must learn through calibration error and measurement noise.

Partition schemes: ``natural`` gives factory ``i`` the shots of profile ``i`` with sizes drawn
by ``quantity_skew``; ``iid`` pools all profiles' shots and deals them out at random;
``dirichlet`` deals the pooled shots out with Dirichlet label skew on ``defect`` (so defect
rates vary wildly across factories). Validation and test shots are drawn in equal numbers from
every profile, i.e. from the federation's overall distribution.
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

LABEL = "defect"
# Recorded channels and the fixed reference (center, half-range) used to standardise them: a
# plausible operating range of a mid-size machine moulding a ~50 g part in a commodity polymer.
REFERENCE: dict[str, tuple[float, float]] = {
    "melt_temp_c": (235.0, 25.0),  # melt temperature at the nozzle, deg C
    "mold_temp_c": (55.0, 20.0),  # mould surface temperature, deg C
    "mold_temp_delta_c": (3.0, 5.0),  # fixed-half minus moving-half temperature, deg C
    "injection_pressure_bar": (1000.0, 300.0),  # peak hydraulic injection pressure, bar
    "holding_pressure_bar": (600.0, 200.0),  # holding (packing) pressure, bar
    "injection_speed_mm_s": (90.0, 40.0),  # screw advance speed, mm/s
    "hold_time_s": (5.0, 2.5),  # holding phase duration, s
    "cooling_time_s": (18.0, 7.0),  # cooling phase duration, s
    "cycle_time_s": (32.0, 10.0),  # full cycle, s
    "cushion_mm": (5.0, 3.0),  # melt cushion left in front of the screw, mm
    "shot_weight_g": (50.0, 8.0),  # weight of the moulded shot, g
}
FEATURES: tuple[str, ...] = tuple(REFERENCE)
SETPOINTS = (
    "melt_temp_c",
    "mold_temp_c",
    "mold_temp_delta_c",
    "injection_pressure_bar",
    "holding_pressure_bar",
    "injection_speed_mm_s",
    "hold_time_s",
    "cooling_time_s",
)
# Common nominal point and the deviation that counts as "one unit" in the risk scores.
NOMINAL = np.array([235.0, 55.0, 2.0, 1000.0, 600.0, 90.0, 5.0, 18.0])
UNIT = np.array([10.0, 8.0, 2.0, 120.0, 80.0, 15.0, 1.0, 3.0])
# Shot-to-shot spread of the true process values, in the same units, at spread factor 1.
SPREAD = np.array([5.0, 3.0, 1.0, 50.0, 35.0, 6.0, 0.4, 1.2])
RISK_THRESHOLD = 2.6
SETPOINT_SPREAD = 0.3  # how far plants set their machines from the nominal point, in UNITs
RISK_SLOPE = 3.0
ROWS_PER_FACTORY = 2500
VALIDATION_ROWS = 4000
TEST_ROWS = 4000


@dataclass(frozen=True)
class FactoryProfile:
    """One plant: set-points, process spread, part weight and channel calibration."""

    setpoint: np.ndarray  # true set-points, order of SETPOINTS
    spread: float  # multiplier of SPREAD (older machines and looser control spread more)
    part_weight_g: float
    cal_offset: np.ndarray  # per recorded channel, in REFERENCE half-range units
    cal_gain: np.ndarray  # per recorded channel


def make_profile(rng: np.random.Generator) -> FactoryProfile:
    """Draw one plausible plant."""
    setpoint = NOMINAL + rng.normal(0.0, SETPOINT_SPREAD, size=len(NOMINAL)) * UNIT
    setpoint[2] = abs(setpoint[2])
    return FactoryProfile(
        setpoint=setpoint,
        spread=float(rng.uniform(0.8, 1.5)),
        part_weight_g=float(rng.uniform(44.0, 56.0)),
        cal_offset=rng.normal(0.0, 0.05, size=len(FEATURES)),
        cal_gain=np.exp(rng.normal(0.0, 0.01, size=len(FEATURES))),
    )


def _risks(z: np.ndarray) -> np.ndarray:
    """Risk scores (n, 4) of short shot, flash, sink marks and warpage from deviations z."""
    melt, mold, delta, inj_p, hold_p, speed, hold_t, cool_t = z.T
    short = -(0.9 * melt + 1.0 * inj_p + 0.6 * speed + 0.3 * mold)
    flash = 0.9 * inj_p + 0.7 * hold_p + 0.6 * melt + 0.2 * mold
    sink = -(1.0 * hold_t + 0.8 * hold_p + 0.6 * cool_t) + 0.4 * mold
    warp = 1.1 * delta - 0.6 * cool_t + 0.3 * mold
    return np.stack([short, flash, sink, warp], axis=1)


def sample_shots(profile: FactoryProfile, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` shots of one plant: recorded channels and the ``defect`` label."""
    true = profile.setpoint + rng.normal(size=(n, len(NOMINAL))) * SPREAD * profile.spread
    true[:, 2] = np.abs(true[:, 2])
    true[:, 5:8] = np.maximum(true[:, 5:8], [10.0, 0.5, 2.0])
    z = (true - NOMINAL) / UNIT
    risks = _risks(z)
    p_ok = np.prod(1.0 / (1.0 + np.exp(RISK_SLOPE * (risks - RISK_THRESHOLD))), axis=1)
    defect = (rng.random(n) > p_ok).astype(np.int64)
    melt, mold, delta, inj_p, hold_p, speed, hold_t, cool_t = true.T
    fill_time = 80.0 / speed
    cycle = fill_time + hold_t + cool_t + 6.0 + rng.gamma(2.0, 0.4, size=n)
    cushion = 5.0 - 0.8 * risks[:, 0] / 2.0 + rng.normal(0.0, 0.6, size=n)
    weight = profile.part_weight_g * (1.0 - 0.01 * np.clip(risks[:, 0], 0, None)
                                      + 0.006 * np.clip(risks[:, 1], 0, None))
    weight = weight + rng.normal(0.0, 0.15, size=n)
    measured = np.column_stack(
        [melt, mold, delta, inj_p, hold_p, speed, hold_t, cool_t, cycle, cushion, weight]
    )
    center = np.array([c for c, _ in REFERENCE.values()])
    half = np.array([h for _, h in REFERENCE.values()])
    measured = center + profile.cal_gain * (measured - center) + profile.cal_offset * half
    measured = measured + rng.normal(size=measured.shape) * 0.01 * half
    df = pd.DataFrame(measured, columns=list(FEATURES))
    df[LABEL] = defect
    return df


def _mixture(profiles: list[FactoryProfile], total: int, seed: int, stream: int) -> pd.DataFrame:
    counts = allocate(total, np.ones(len(profiles)))
    frames = [
        sample_shots(p, int(c), rng_for(seed, stream, i))
        for i, (p, c) in enumerate(zip(profiles, counts, strict=True))
    ]
    return pd.concat(frames, ignore_index=True)


def generate(num_factories: int, seed: int, partition: PartitionConfig) -> FederatedData:
    """Factories' shots and server validation/test shots; deterministic in ``seed``."""
    check_generate_args(num_factories, seed, partition)
    profiles = [make_profile(rng_for(seed, STREAM_PROFILES, i)) for i in range(num_factories)]
    weights = size_weights(num_factories, partition.quantity_skew, rng_for(seed, STREAM_SIZES))
    if partition.scheme == "natural":
        sizes = allocate(num_factories * ROWS_PER_FACTORY, weights, minimum=100)
        frames = [
            sample_shots(p, int(n), rng_for(seed, STREAM_SAMPLES, i))
            for i, (p, n) in enumerate(zip(profiles, sizes, strict=True))
        ]
    else:
        pool = pd.concat(
            [
                sample_shots(p, ROWS_PER_FACTORY, rng_for(seed, STREAM_SAMPLES, i))
                for i, p in enumerate(profiles)
            ],
            ignore_index=True,
        )
        rng = rng_for(seed, STREAM_PARTITION)
        if partition.scheme == "dirichlet":
            parts = dirichlet_split(
                pool[LABEL].to_numpy(), num_factories, partition.alpha, rng, weights, 100
            )
        else:
            parts = iid_split(len(pool), weights, rng)
        frames = [pool.iloc[idx].reset_index(drop=True) for idx in parts]
    center = [c for c, _ in REFERENCE.values()]
    half = [h for _, h in REFERENCE.values()]
    factories = [
        apply_feature_shift(f, FEATURES, center, half, partition.feature_shift, seed, i)
        for i, f in enumerate(frames)
    ]
    validation = _mixture(profiles, VALIDATION_ROWS, seed, STREAM_VALIDATION)
    test = _mixture(profiles, TEST_ROWS, seed, STREAM_TEST)
    info = {
        "defect_rate": [float(f[LABEL].mean()) for f in factories],
        "validation_defect_rate": float(validation[LABEL].mean()),
    }
    return FederatedData(factories=factories, validation=validation, test=test, info=info)
