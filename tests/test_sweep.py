"""The sweep runs each named override set per seed through the product path and summarises."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from experiments.sweep import main, parse_set, summarise


def test_a_set_is_a_name_and_its_overrides_and_a_bad_one_is_named():
    assert parse_set("adam=strategy=fedadam strategy.flower.eta=0.3") == (
        "adam",
        ["strategy=fedadam", "strategy.flower.eta=0.3"],
    )
    for bad in ("strategy", "=strategy=fedadam", "adam="):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--set '{bad}': expected NAME="):
            parse_set(bad)


def test_the_summary_keeps_the_sets_order_and_leaves_failures_out_of_the_mean():
    runs = {
        "b|0": {"main_metric": "f1", "test": 0.5},
        "b|1": {"main_metric": "f1", "test": 0.7},
        "a|0": {"main_metric": "f1", "test": 0.2},
        "a|1": {"error": "ValueError: broken"},
    }
    rows = summarise(runs, ["b", "a"])
    assert [r["name"] for r in rows] == ["b", "a"]
    assert rows[0]["mean"] == pytest.approx(0.6) and rows[0]["sd"] == pytest.approx(0.1414, 1e-3)
    assert (rows[1]["runs"], rows[1]["failed"], rows[1]["mean"]) == (2, 1, 0.2)
    assert math.isnan(rows[1]["sd"]) and rows[1]["by_seed"] == {0: 0.2}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_two_sets_run_through_the_product_path_and_resume(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    small = "task=molding_quality federation.num_factories=3 federation.num_rounds=1"
    argv = [
        "--seeds", "0",
        "--set", f"avg={small} strategy=fedavg",
        "--set", f"adam={small} strategy=fedadam",
        "--data-root", str(tmp_path / "data"),
        "--out", str(out),
    ]  # fmt: skip
    first = main(argv)
    assert [r["name"] for r in first["summary"]] == ["avg", "adam"]
    assert all(r["runs"] == 1 and r["failed"] == 0 for r in first["summary"])
    assert all(0.0 <= r["mean"] <= 1.0 and r["main_metric"] == "pr_auc" for r in first["summary"])
    assert first["runs"]["adam|0"]["overrides"][-1] == "strategy=fedadam"
    capsys.readouterr()
    again = main([*argv, "--resume"])  # nothing left to run
    assert "seed 0:" not in capsys.readouterr().out
    assert again["runs"] == json.loads(out.read_text())["runs"] == first["runs"]
