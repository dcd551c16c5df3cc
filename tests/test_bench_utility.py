"""The utility benchmark: pooled data for the centralised runs, gaps in the task's direction,
and one whole grid through the product path."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from experiments.bench_utility import guard_lines, main, pool_factory_files, summarise
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from standard_models.datafiles import factory_path
from standard_models.registry import get_task


def _data(tmp_path, task: str, *overrides: str):
    cfg = finalize(
        compose_config([f"task={task}", "federation.num_factories=3", *overrides]),
        base=tmp_path,
        output_dir=tmp_path / "run",
    )
    data_dir, _ = ensure_data(cfg)
    return data_dir


def test_pooled_file_holds_every_factory_row_and_splits_of_the_same_rows_share_a_digest(tmp_path):
    task = get_task("tep_fault")
    natural = _data(tmp_path, "tep_fault")
    skewed = _data(tmp_path, "tep_fault", "partition=dirichlet", "partition.alpha=0.1")
    mixed = _data(tmp_path, "tep_fault", "partition=dirichlet", "partition.alpha=10")
    a = pool_factory_files(task, natural, 3, tmp_path / "pool_a")
    b = pool_factory_files(task, skewed, 3, tmp_path / "pool_b")
    c = pool_factory_files(task, mixed, 3, tmp_path / "pool_c")
    pooled = pd.read_parquet(factory_path(tmp_path / "pool_a", 0))
    parts = [pd.read_parquet(factory_path(natural, i)) for i in range(3)]
    assert len(pooled) == sum(len(p) for p in parts)
    assert sorted(p.name for p in (tmp_path / "pool_a").iterdir()) == [
        "factory_000.parquet",
        "test.parquet",
        "validation.parquet",
    ]
    # TEP's Dirichlet splits deal out the same segments of the same runs: one pooled data set,
    # one digest, whatever the alpha; the natural split cuts the runs elsewhere.
    assert b == c
    assert a != b
    # Other rows, another digest.
    task_m = get_task("molding_quality")
    m = pool_factory_files(task_m, _data(tmp_path, "molding_quality"), 3, tmp_path / "pool_m")
    m1 = pool_factory_files(
        task_m, _data(tmp_path, "molding_quality", "seed=1"), 3, tmp_path / "pool_m1"
    )
    assert m != m1


def _entry(kind, test, seed=0, split="natural", task="rul", **extra):
    return {"task": task, "split": split, "seed": seed, "kind": kind, "test": test, **extra}


def test_gaps_are_measured_in_the_tasks_direction():
    results = {
        "tasks": ["rul", "tep_fault"],
        "splits": ["natural"],
        "epsilons": [8.0],
        "strategies": ["fedavg", "fedavgm"],
        "runs": [
            # RMSE: lower is better, so DP costing 4 cycles is a positive gap of 4.
            _entry("federated_dp", 24.0, epsilon=8.0),
            _entry("federated", 20.0),
            _entry("central_dp", 23.0, epsilon=8.0),
            _entry("central", 16.0),
            _entry("alone", 30.0, factory=0),
            _entry("alone", 26.0, factory=1),
            _entry("federated_dp", 0.40, task="tep_fault", epsilon=8.0),
            _entry("federated_dp", 0.50, task="tep_fault", epsilon=8.0, seed=1),
            _entry("central", 0.70, task="tep_fault"),
            _entry("central", 0.68, task="tep_fault", seed=1),
            _entry("federated_dp", 0.45, task="tep_fault", epsilon=8.0, strategy="fedavgm"),
            # A failed run has no score and counts nowhere.
            {"task": "tep_fault", "split": "natural", "seed": 0, "kind": "federated", "error": "x"},
        ],
    }
    rul, tep = summarise(results)
    assert rul["gaps"]["cost of DP (eps=8)"] == [4.0]
    assert rul["gaps"]["cost of federation under DP (eps=8)"] == [1.0]
    assert rul["gaps"]["gap to pooled data (eps=8)"] == [8.0]
    assert rul["scores"]["factory alone, no DP (worst)"] == [30.0]
    assert rul["scores"]["factory alone, no DP (best)"] == [26.0]
    assert rul["scores"]["factory alone, no DP (mean)"] == [28.0]
    # Higher is better; gaps per seed, only where both rows ran.
    assert tep["gaps"]["gap to pooled data (eps=8)"] == pytest.approx([0.30, 0.18])
    assert "cost of DP (eps=8)" not in tep["gaps"]
    # Another strategy's rows are labelled with it and get gaps of their own.
    assert tep["scores"]["federated fedavgm, DP eps=8"] == [0.45]
    assert tep["gaps"]["gap to pooled data (fedavgm, eps=8)"] == pytest.approx([0.25])
    assert tep["seeds"] == [0, 1]


def test_guard_lines_count_copy_guard_false_positives_on_honest_federations():
    none = {"withheld": [], "groups": [], "cleared": []}
    results = {
        "tasks": ["molding_quality"],
        "runs": [
            {**_entry("federated", 0.1, task="molding_quality"), "guards": none},
            {
                **_entry("federated", 0.2, task="molding_quality", seed=1),
                "guards": {**none, "cleared": [["factory_001", "factory_002"]]},
            },
            {
                **_entry("federated_dp", 0.1, task="molding_quality", epsilon=8.0),
                "guards": {**none, "groups": [["factory_000", "factory_003"]]},
            },
            {**_entry("central", 0.3, task="molding_quality"), "guards": none},
        ],
    }
    assert guard_lines(results) == [
        "molding_quality: honest factories scored as one (copy-guard false positives) in 1 of 3 "
        "federated runs (federated, DP eps=8, natural, seed 0: factory_000+factory_003); a pair "
        "flagged by its updates paid apart by its record sketches in 1."
    ]


@pytest.mark.slow
def test_quick_grid_runs_every_row_through_the_product_path(tmp_path, capsys):
    out = tmp_path / "utility.json"
    main(
        [
            "--quick",
            "--central-dp-lr-factors",
            "1",
            "0.5",
            "--tasks",
            "molding_quality",
            "--factories",
            "3",
            "--data-root",
            str(tmp_path / "data"),
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert not [r for r in runs if "error" in r]
    kinds = sorted(r["kind"] for r in runs)
    assert kinds == ["alone"] * 3 + ["central", "central_dp", "federated", "federated_dp"]
    by_kind = {r["kind"]: r for r in runs}
    # DP runs spent their factory's budget; the centralised DP run is one factory's federation.
    assert by_kind["federated_dp"]["epsilon_spent"] == pytest.approx(8.0, abs=0.05)
    assert by_kind["central_dp"]["epsilon_spent"] == pytest.approx(8.0, abs=0.05)
    # the centralised DP row is the better, by final validation score, of its two rates
    central = by_kind["central_dp"]
    candidates = central["candidates"]
    assert [c["lr"] for c in candidates] == [
        candidates[0]["lr"],
        candidates[0]["lr"] * 0.5,
    ]
    best = max(candidates, key=lambda c: c["validation"])
    assert (central["lr"], central["test"]) == (best["lr"], best["test"])
    assert central["val_curve"][-1] == best["validation"]
    assert by_kind["federated"]["epsilon_spent"] is None
    assert all(0.0 <= r["test"] <= 1.0 for r in runs)
    printed = capsys.readouterr().out
    assert "| centralised, DP eps=8 |" in printed
    assert "cost of federation under DP (eps=8), worse by (points)" in printed
