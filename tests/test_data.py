"""Data generation, partitioning, schema checks, data files and the ``factoryfed data`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fl_server import cli
from standard_models import DataValidationError, PartitionConfig, get_task, task_names
from standard_models.datafiles import (
    data_matches,
    factory_path,
    holdout_paths,
    make_federated_data,
    read_manifest,
    sha256_file,
)
from standard_models.partition import (
    allocate,
    contiguous_bounds,
    dirichlet_split,
    iid_split,
    rng_for,
)
from standard_models.tep_fault import source as tep_source

TASKS = ("tep_fault", "molding_quality", "rul")
LABELS = {"tep_fault": "fault", "molding_quality": "defect", "rul": "rul"}


def _gen(task: str, n: int = 4, seed: int = 0, **partition: float | str):
    return get_task(task).generate(n, seed, PartitionConfig(**partition))


def _features(task: str) -> list[str]:
    names = get_task(task).schema.names
    skip = {"run_id", "t", "unit_id", "cycle", "op_1", "op_2", "op_3", LABELS[task]}
    return [c for c in names if c not in skip]


# ------------------------------------------------------------------------------ registry


def test_registry_names_and_unknown_task() -> None:
    assert task_names() == sorted(TASKS)
    for name in TASKS:
        assert get_task(name).name == name
    with pytest.raises(ValueError, match="molding_quality, rul, tep_fault"):
        get_task("no_such_task")


@pytest.mark.parametrize(
    ("n", "seed", "partition", "match"),
    [
        (0, 0, PartitionConfig(), "num_factories"),
        (2, -1, PartitionConfig(), "seed"),
        (2, 0, PartitionConfig(scheme="random"), "scheme"),
        (2, 0, PartitionConfig(scheme="dirichlet", alpha=0.0), "alpha"),
        (2, 0, PartitionConfig(quantity_skew=-1.0), "quantity_skew"),
        (2, 0, PartitionConfig(feature_shift=-0.1), "feature_shift"),
    ],
)
def test_invalid_generate_arguments(n, seed, partition, match) -> None:
    for name in TASKS:
        with pytest.raises(ValueError, match=match):
            get_task(name).generate(n, seed, partition)


# ------------------------------------------------------------------------ partition helpers


def test_allocate_sums_and_respects_minimum() -> None:
    counts = allocate(1000, [0.7, 0.2, 0.1, 0.0], minimum=50)
    assert counts.sum() == 1000 and counts.min() >= 50
    assert list(allocate(10, [1, 1, 1])) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    bounds = contiguous_bounds(500, 6)
    assert bounds[0][0] == 0 and bounds[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def test_dirichlet_and_iid_split_cover_every_item_once() -> None:
    labels = np.repeat(np.arange(10), 30)
    for parts in (
        dirichlet_split(labels, 5, 0.1, rng_for(0, 1)),
        iid_split(len(labels), np.full(5, 0.2), rng_for(0, 1)),
    ):
        merged = np.sort(np.concatenate(parts))
        np.testing.assert_array_equal(merged, np.arange(len(labels)))
        assert min(len(p) for p in parts) >= 1


# ---------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("scheme", ["natural", "dirichlet", "iid"])
def test_same_seed_gives_identical_frames(task: str, scheme: str) -> None:
    kwargs = {"scheme": scheme, "feature_shift": 0.3}
    a, b = _gen(task, 3, 7, **kwargs), _gen(task, 3, 7, **kwargs)
    assert len(a.factories) == len(b.factories) == 3
    for x, y in zip([*a.factories, a.validation, a.test], [*b.factories, b.validation, b.test],
                    strict=True):
        pd.testing.assert_frame_equal(x, y)
    c = _gen(task, 3, 8, **kwargs)
    assert any(
        not x.equals(y) for x, y in zip(a.factories, c.factories, strict=True)
    ), "a different seed should change the factories"


@pytest.mark.parametrize("task", TASKS)
def test_generated_frames_pass_their_schema(task: str) -> None:
    t = get_task(task)
    data = t.generate(4, 0, PartitionConfig())
    for i, df in enumerate(data.factories):
        t.schema.validate(df, f"factory_{i}")
    t.schema.validate(data.validation, "validation")
    t.schema.validate(data.test, "test")


@pytest.mark.parametrize("task", TASKS)
def test_default_sizes_give_1k_to_4k_windows_per_factory(task: str) -> None:
    t = get_task(task)
    data = t.generate(4, 0, PartitionConfig())
    sizes = [len(t.to_dataset(df)) for df in data.factories]
    assert min(sizes) >= 1000, sizes
    assert max(sizes) <= 4500, sizes


# -------------------------------------------------------------------------------- TEP


def test_tep_reads_real_files_with_d00_transposed() -> None:
    runs = tep_source.train_runs()
    assert runs[0].shape == (500, 52)
    assert all(r.shape == (480, 52) for r in runs[1:])
    assert all(r.shape == (960, 52) for r in tep_source.test_runs())
    mean, std = tep_source.reference_stats()
    # XMEAS(7), reactor pressure, runs around 2705 kPa in normal operation.
    assert 2690 < mean[6] < 2720 and (std > 0).all()


@pytest.mark.parametrize("n", [1, 2, 4, 6, 8, 25])
def test_tep_natural_split_gives_normal_data_and_distinct_fault_families(n: int) -> None:
    data = _gen("tep_fault", n)
    faults = [set(df["fault"].unique()) - {0} for df in data.factories]
    for df in data.factories:
        assert 0 in set(df["fault"])  # every plant knows normal operation
    assert set().union(*faults) == set(range(1, 22))
    if n <= 21:
        for i in range(n):
            for j in range(i + 1, n):
                assert not faults[i] & faults[j], "natural factories must not share faults"
    if n == 6:
        families = {frozenset(f) for f in tep_source.FAULT_FAMILIES.values()}
        assert {frozenset(f) for f in faults} == families
    for df in data.factories:  # every run_id is a contiguous recording
        for _, g in df.groupby("run_id"):
            assert (np.diff(g["t"].to_numpy()) == 1).all()


def test_tep_server_sets_are_balanced_and_disjoint() -> None:
    data = _gen("tep_fault")
    for df in (data.validation, data.test):
        counts = df["fault"].value_counts()
        assert len(counts) == 22 and counts.min() == counts.max() == 400
        assert df["t"].min() >= tep_source.FAULT_ONSET_TEST
    val_keys = set(zip(data.validation["run_id"].str[:3], data.validation["t"], strict=True))
    test_keys = set(zip(data.test["run_id"].str[:3], data.test["t"], strict=True))
    assert not val_keys & test_keys


def test_tep_rows_are_the_real_samples_without_shift() -> None:
    data = _gen("tep_fault", 3, 0, scheme="iid", feature_shift=0.0)
    runs = tep_source.train_runs()
    for df in data.factories:
        expected = np.stack(
            [runs[f][t] for f, t in zip(df["fault"], df["t"], strict=True)]
        )
        np.testing.assert_array_equal(df[list(tep_source.FEATURES)].to_numpy(), expected)


def _label_skew(frames: list[pd.DataFrame], label: str) -> float:
    """Mean total-variation distance between each factory's label mix and the pooled mix."""
    k = max(int(df[label].max()) for df in frames) + 1
    pooled = np.bincount(pd.concat(frames)[label].to_numpy(), minlength=k)
    pooled = pooled / pooled.sum()
    dists = []
    for df in frames:
        p = np.bincount(df[label].to_numpy(), minlength=k) / len(df)
        dists.append(0.5 * np.abs(p - pooled).sum())
    return float(np.mean(dists))


@pytest.mark.parametrize("task", ["tep_fault", "molding_quality"])
def test_dirichlet_small_alpha_concentrates_labels(task: str) -> None:
    label = LABELS[task]
    small = [_label_skew(_gen(task, 4, s, scheme="dirichlet", alpha=0.05).factories, label)
             for s in range(3)]
    large = [_label_skew(_gen(task, 4, s, scheme="dirichlet", alpha=100.0).factories, label)
             for s in range(3)]
    assert np.mean(small) > 3 * np.mean(large), (small, large)
    assert np.mean(small) > np.mean(large) + 0.02, (small, large)


def test_rul_dirichlet_skews_operating_clusters() -> None:
    def cluster_skew(alpha: float) -> float:
        data = _gen("rul", 4, 0, scheme="dirichlet", alpha=alpha)
        frames = []
        for df in data.factories:
            units = df.groupby("unit_id")["op_2"].mean().round(1)
            codes = units.map({1.5: 0, 3.0: 1, 2.0: 2, 1.0: 3, 4.0: 4, 2.5: 5})
            assert codes.notna().all()
            frames.append(pd.DataFrame({"c": codes.astype(int)}))
        return _label_skew(frames, "c")

    assert cluster_skew(0.05) > cluster_skew(100.0) + 0.2


# ---------------------------------------------------------------------- quantity and shift


@pytest.mark.parametrize("task", TASKS)
def test_quantity_skew_zero_equal_sizes_positive_unequal(task: str) -> None:
    def sizes(q: float) -> np.ndarray:
        data = _gen(task, 5, 3, scheme="iid", quantity_skew=q)
        if task == "rul":
            return np.array([df["unit_id"].nunique() for df in data.factories])
        return np.array([len(df) for df in data.factories])

    even, skewed = sizes(0.0), sizes(1.0)
    assert even.max() / even.min() < 1.15, even
    assert skewed.max() / skewed.min() > 1.5, skewed


@pytest.mark.parametrize("task", ["molding_quality", "rul"])
def test_natural_quantity_skew(task: str) -> None:
    key = "unit_id" if task == "rul" else None

    def sizes(q: float) -> np.ndarray:
        data = _gen(task, 5, 3, quantity_skew=q)
        return np.array([df[key].nunique() if key else len(df) for df in data.factories])

    assert sizes(0.0).max() == sizes(0.0).min()
    assert sizes(1.0).max() / sizes(1.0).min() > 1.5


def _reference_scale(task: str) -> np.ndarray:
    """The fixed standardisation scale of each shifted column."""
    if task == "tep_fault":
        return tep_source.reference_stats()[1]
    if task == "molding_quality":
        from standard_models.molding_quality.dataset import HALF_RANGE

        return HALF_RANGE
    from standard_models.rul.source import SENSOR_SCALE

    return SENSOR_SCALE


@pytest.mark.parametrize("task", TASKS)
def test_feature_shift_moves_factory_means_and_zero_leaves_them(task: str) -> None:
    cols = _features(task)
    base = _gen(task, 3, 1, feature_shift=0.0)
    same = _gen(task, 3, 1, feature_shift=0.0)
    shifted = _gen(task, 3, 1, feature_shift=0.5)
    for b, s0, s in zip(base.factories, same.factories, shifted.factories, strict=True):
        pd.testing.assert_frame_equal(b, s0)
        # The shift changes calibration only: same rows, same labels.
        np.testing.assert_array_equal(b[LABELS[task]].to_numpy(), s[LABELS[task]].to_numpy())
        moved = np.abs((s[cols].mean() - b[cols].mean()).to_numpy()) / _reference_scale(task)
        # offsets ~ N(0, 0.5) reference units: median |offset| is about 0.34
        assert 0.15 < np.median(moved) < 0.7, moved
    pd.testing.assert_frame_equal(base.validation, shifted.validation)


# --------------------------------------------------------------------- molding and RUL data


def test_molding_defect_rate_is_rare_and_differs_across_factories() -> None:
    overall, spread = [], []
    for seed in range(3):
        data = _gen("molding_quality", 4, seed)
        rates = [df["defect"].mean() for df in data.factories]
        overall.append(pd.concat(data.factories)["defect"].mean())
        spread.append(max(rates) / max(min(rates), 1e-9))
        assert 0.005 < data.validation["defect"].mean() < 0.08
    assert 0.01 < np.mean(overall) < 0.08, overall
    assert np.mean(spread) > 1.5, spread


def test_rul_capped_and_decreasing_within_units() -> None:
    data = _gen("rul")
    for df in [*data.factories, data.validation, data.test]:
        assert df["rul"].max() == 125.0 and df["rul"].min() == 0.0
        for _, g in df.groupby("unit_id"):
            g = g.sort_values("cycle")
            assert (np.diff(g["cycle"].to_numpy()) == 1).all()
            rul = g["rul"].to_numpy()
            assert (np.diff(rul) <= 0).all() and rul[-1] == 0.0
            below = rul < 125
            assert (np.diff(rul[below]) == -1).all()  # piecewise linear below the cap


# ---------------------------------------------------------------------- schema validation


@pytest.fixture(scope="module")
def molding_frame() -> pd.DataFrame:
    return _gen("molding_quality", 2).factories[0].head(200).reset_index(drop=True)


def _set(df: pd.DataFrame, col: str, row: int, value: float) -> pd.DataFrame:
    df = df.copy()
    df.loc[row, col] = value
    return df


@pytest.mark.parametrize(
    ("mutate", "column", "message"),
    [
        (lambda d: d.drop(columns=["melt_temp_c"]), "melt_temp_c", "missing column"),
        (lambda d: d.assign(defect=d["defect"].astype(float)), "defect", "expected dtype int"),
        (lambda d: d.assign(cushion_mm="5.0"), "cushion_mm", "expected dtype float"),
        (lambda d: _set(d, "cooling_time_s", 3, np.nan), "cooling_time_s", "NaN or infinite"),
        (lambda d: _set(d, "shot_weight_g", 5, np.inf), "shot_weight_g", "NaN or infinite"),
        (lambda d: d.assign(defect=d["defect"] + 2), "defect", "above the allowed maximum"),
    ],
)
def test_schema_errors_name_file_and_column(tmp_path, molding_frame, mutate, column, message):
    path = tmp_path / "factory_007.parquet"
    mutate(molding_frame).to_parquet(path, index=False)
    with pytest.raises(DataValidationError) as err:
        get_task("molding_quality").load_frame(path)
    text = str(err.value)
    assert str(path) in text and f"column '{column}'" in text and message in text
    assert err.value.column == column


def test_schema_wrong_string_column_dtype(tmp_path) -> None:
    df = _gen("tep_fault", 4).factories[3].head(50)
    path = tmp_path / "plant.parquet"
    df.assign(run_id=np.arange(len(df))).to_parquet(path, index=False)
    with pytest.raises(DataValidationError, match=r"plant\.parquet, column 'run_id'.*dtype str"):
        get_task("tep_fault").load_frame(path)


def test_schema_empty_corrupt_and_missing_files(tmp_path, molding_frame) -> None:
    task = get_task("molding_quality")
    empty = tmp_path / "empty.parquet"
    molding_frame.iloc[:0].to_parquet(empty, index=False)
    with pytest.raises(DataValidationError, match=r"empty\.parquet: the file holds no rows"):
        task.load_frame(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataValidationError, match=r"corrupt\.parquet: unreadable Parquet"):
        task.load_frame(corrupt)
    missing = tmp_path / "missing.parquet"
    with pytest.raises(DataValidationError, match=r"missing\.parquet: file does not exist"):
        task.load_frame(missing)
    good = tmp_path / "good.parquet"
    molding_frame.to_parquet(good, index=False)
    pd.testing.assert_frame_equal(task.load_frame(good), molding_frame)


# ------------------------------------------------------------------------------ data files


def test_make_federated_data_writes_files_and_manifest(tmp_path) -> None:
    partition = PartitionConfig(scheme="dirichlet", alpha=0.3, quantity_skew=0.2)
    out = make_federated_data("molding_quality", 3, 5, partition, tmp_path / "d")
    manifest = read_manifest(out)
    assert manifest["task"] == "molding_quality" and manifest["seed"] == 5
    assert manifest["num_factories"] == 3 and manifest["format_version"] == 1
    assert manifest["partition"] == {
        "scheme": "dirichlet", "alpha": 0.3, "quantity_skew": 0.2, "feature_shift": 0.0
    }
    names = [f["name"] for f in manifest["files"]]
    assert names == [
        "factory_000.parquet", "factory_001.parquet", "factory_002.parquet",
        "validation.parquet", "test.parquet",
    ]
    task = get_task("molding_quality")
    for entry in manifest["files"]:
        path = out / entry["name"]
        assert sha256_file(path) == entry["sha256"]
        assert len(task.load_frame(path)) == entry["rows"]
    assert factory_path(out, 2) == out / "factory_002.parquet"
    assert holdout_paths(out) == (out / "validation.parquet", out / "test.parquet")
    fresh = task.generate(3, 5, partition)
    pd.testing.assert_frame_equal(pd.read_parquet(factory_path(out, 1)), fresh.factories[1])


def test_data_matches(tmp_path) -> None:
    p = PartitionConfig(scheme="iid", quantity_skew=0.0)
    out = tmp_path / "d"
    assert not data_matches(out, "rul", 2, 1, p)
    make_federated_data("rul", 2, 1, p, out)
    assert data_matches(out, "rul", 2, 1, p)
    assert data_matches(out, "rul", 2, 1, p, verify_hashes=True)
    assert not data_matches(out, "rul", 2, 2, p)
    assert not data_matches(out, "rul", 3, 1, p)
    assert not data_matches(out, "molding_quality", 2, 1, p)
    assert not data_matches(out, "rul", 2, 1, PartitionConfig(scheme="iid", quantity_skew=0.1))
    with open(factory_path(out, 0), "ab") as fh:
        fh.write(b"tampered")
    assert data_matches(out, "rul", 2, 1, p)
    assert not data_matches(out, "rul", 2, 1, p, verify_hashes=True)
    factory_path(out, 1).unlink()
    assert not data_matches(out, "rul", 2, 1, p)
    (out / "manifest.json").write_text("{not json")
    assert not data_matches(out, "rul", 2, 1, p)
    with pytest.raises(DataValidationError, match="manifest"):
        read_manifest(out)
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nowhere")


def test_regenerating_fewer_factories_removes_stale_files(tmp_path) -> None:
    p = PartitionConfig()
    make_federated_data("molding_quality", 4, 0, p, tmp_path)
    make_federated_data("molding_quality", 2, 0, p, tmp_path)
    assert sorted(x.name for x in tmp_path.glob("factory_*")) == [
        "factory_000.parquet", "factory_001.parquet"
    ]
    assert data_matches(tmp_path, "molding_quality", 2, 0, p)


# ------------------------------------------------------------------------------------ CLI


def test_cli_data_make(tmp_path, capsys) -> None:
    out = tmp_path / "tep"
    argv = ["data", "make", "--task", "tep_fault", "--num-factories", "6", "--seed", "3",
            "--out", str(out), "--feature-shift", "0.2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        assert (out / entry["name"]).is_file()
        assert entry["name"] in printed and str(entry["rows"]) in printed
    assert "written" in printed
    partition = PartitionConfig(feature_shift=0.2)
    assert data_matches(out, "tep_fault", 6, 3, partition)
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main([*argv, "--force"]) == 0
    assert "written" in capsys.readouterr().out


def test_cli_errors_and_defaults(tmp_path, capsys) -> None:
    argv = ["data", "make", "--task", "nope", "--num-factories", "2", "--seed", "0",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "valid names" in capsys.readouterr().err
    assert cli.main(["data"]) == 2
    args = cli.build_parser().parse_args(argv)
    default = PartitionConfig()
    assert (args.scheme, args.alpha, args.quantity_skew, args.feature_shift) == (
        default.scheme, default.alpha, default.quantity_skew, default.feature_shift
    )
    with pytest.raises(SystemExit):
        cli.main(["data", "make", "--task", "rul"])


def test_an_operator_data_dir_needs_only_the_holdout_files(tmp_path):
    """Deployment: the operator holds validation and test files, never a factory's data."""
    from fl_server.config import load_from_run_config
    from fl_server.data import ensure_data

    run_config = {"overrides": "task=molding_quality", "data-dir": str(tmp_path)}
    cfg = load_from_run_config({**run_config, "output-dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="validation.parquet"):
        ensure_data(cfg)
    for name in ("validation.parquet", "test.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert ensure_data(cfg) == (tmp_path.resolve(), False)
    assert not list(tmp_path.glob("factory_*.parquet"))
