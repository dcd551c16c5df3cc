"""Resuming an interrupted benchmark grid keeps exactly the finished runs of the same grid."""

import json
from types import SimpleNamespace

from experiments.benchkit import finished_runs


def _key(run):
    return (run["task"], run["k"])


def test_finished_runs_of_the_same_grid_are_kept_and_failed_ones_rerun(tmp_path):
    out = tmp_path / "bench.json"
    assert finished_runs(out, "cells", _key, {"rounds": {"tep": 3}}) == ({}, {})
    out.write_text(
        json.dumps(
            {
                "rounds": {"tep": 3},
                "cells": [
                    {"task": "tep", "k": 0, "test": 0.5},
                    {"task": "tep", "k": 1, "error": "RuntimeError: boom"},
                ],
                "seconds": {"tep": 12.5},
            }
        )
    )
    done, seconds = finished_runs(out, "cells", _key, {"rounds": {"tep": 3}, "overrides": []})
    # An older file (no overrides) counts; a step is kept with all of its entries.
    assert done == {("tep", 0): [{"task": "tep", "k": 0, "test": 0.5}]}
    assert seconds == {"tep": 12.5}
    # A step with several entries (a set of baselines) is run again if any of them failed.
    steps = json.loads(out.read_text())
    steps["cells"] += [{"task": "tep", "k": 2, "test": 0.1}, {"task": "tep", "k": 2, "test": 0.2}]
    steps["cells"] += [{"task": "tep", "k": 3, "test": 0.1}, {"task": "tep", "k": 3, "error": "x"}]
    out.write_text(json.dumps(steps))
    done, _ = finished_runs(out, "cells", _key, {"rounds": {"tep": 3}})
    assert sorted(done) == [("tep", 0), ("tep", 2)]
    assert [e["test"] for e in done[("tep", 2)]] == [0.1, 0.2]
    # Another grid (rounds or overrides differ) starts from scratch.
    assert finished_runs(out, "cells", _key, {"rounds": {"tep": 4}}) == ({}, {})
    other_split = {"rounds": {"tep": 3}, "overrides": ["partition=dirichlet"]}
    assert finished_runs(out, "cells", _key, other_split) == ({}, {})


class _Runner:
    """Stands in for BenchRunner.run: returns a summary, or raises like a failed federation."""

    def __init__(self, summary=None):
        self.summary = summary
        self.calls = []

    def run(self, overrides, name):
        self.calls.append((overrides, name))
        if self.summary is None:
            raise RuntimeError("Krum needs more replies")
        return self.summary, {"name": name}


def test_a_grid_cell_records_the_common_fields_or_its_error(monkeypatch):
    import experiments.benchkit as benchkit
    from experiments.benchkit import run_recorded

    summary = {
        "main_metric": "f1",
        "test": {"f1": 0.4, "loss": 1.2},
        "rounds": [{"round": 0, "f1": 0.1}, {"round": 1, "f1": 0.3}],
        "wall_seconds": 7.5,
    }
    record = {"task": "tep"}
    runner = _Runner(summary)
    assert run_recorded(runner, ["task=tep"], "cell", record) == (summary, {"name": "cell"})
    assert runner.calls == [(["task=tep"], "cell")]
    assert record["test"] == 0.4 and record["val_curve"] == [0.1, 0.3]
    assert record["test_all"] == summary["test"] and record["seconds"] == 7.5
    assert record["unchanged_rounds"] == []  # round 1 moved the model
    assert record["guards"] == {"withheld": [], "groups": [], "cleared": []}
    assert "error" not in record

    # A failed cell is timed from its start to the failure (the clock is read twice).
    clock = iter([100.0, 103.25])
    monkeypatch.setattr(benchkit, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    failed = {"task": "tep"}
    assert run_recorded(_Runner(), ["task=tep"], "cell", failed) is None
    assert failed == {
        "task": "tep",
        "error": "RuntimeError: Krum needs more replies",
        "seconds": 3.25,
    }


def test_guard_findings_collect_groups_and_cleared_pairs_over_the_rounds():
    from experiments.benchkit import guard_findings

    rounds = [
        {"round": 1, "status": {}},  # not scored
        {"round": 2, "withheld": ["c"], "duplicate_groups": [["b", "a"]], "cleared_pairs": []},
        {"round": 3, "withheld": [], "duplicate_groups": [], "cleared_pairs": [["d", "c"]]},
    ]
    assert guard_findings({"factory_rounds": rounds}) == {
        "withheld": [],
        "groups": [["a", "b"]],
        "cleared": [["c", "d"]],
    }
    assert guard_findings({}) == {"withheld": [], "groups": [], "cleared": []}


def test_benchmark_runs_keep_the_products_scoring_and_rewards(tmp_path):
    """A benchmark measures the federation a user runs: default scoring and rewards stay on."""
    from experiments.benchkit import BenchRunner
    from fl_server.config import compose_config

    product = compose_config([])
    cfg = BenchRunner(tmp_path, tmp_path / "data").config(["strategy=fedmedian"], "cell")
    assert cfg.contribution == product.contribution and cfg.contribution.method == "auto"
    assert cfg.rewards == product.rewards
    assert cfg.strategy.name == "fedmedian" and cfg.output_dir == str(tmp_path / "runs" / "cell")
    off = BenchRunner(tmp_path, tmp_path / "data").config(["contribution=none"], "off")
    assert off.contribution.method == "none"  # a benchmark about turning it off can


def test_a_grid_keeps_its_finished_runs_and_saves_after_every_run(tmp_path, capsys):
    from experiments.benchkit import GridRun, grid_results, run_grid

    args = SimpleNamespace(
        tasks=["tep"],
        strategies=["fedavg"],
        rounds=2,
        seed=0,
        data_root=tmp_path / "data",
        keep_runs=False,
        out=tmp_path / "grid.json",
        resume=True,
        quick=False,
    )
    interrupted = grid_results(args, {"tep": 5}, "runs")
    interrupted["runs"] = [
        {"task": "tep", "name": "a", "test": 0.5, "seconds": 1.0},
        {"task": "tep", "name": "b", "error": "RuntimeError: boom", "seconds": 1.0},
    ]
    interrupted["seconds"] = {"tep": 10.0}
    args.out.write_text(json.dumps(interrupted))
    saved_before: dict[str, list[str]] = {}

    def run(name):
        def one(bench):
            saved = json.loads(args.out.read_text())["runs"]
            saved_before[name] = [e["name"] for e in saved]
            return {"task": "tep", "name": name, "test": 0.7, "seconds": 2.0}

        return one

    reported = []
    run_grid(
        args,
        "grid",
        grid_results(args, {"tep": 5}, "runs"),
        "runs",
        key=lambda e: (e["task"], e["name"]),
        plan=lambda task: [GridRun((task, n), f"run {n}", run(n)) for n in ("a", "b", "c")],
        status=lambda e: f"test={e['test']}",
        report=lambda results: reported.append([e["name"] for e in results["runs"]]),
    )
    # "a" finished before and is kept; the failed "b" runs again, then "c".
    assert saved_before == {"b": ["a"], "c": ["a", "b"]}
    assert reported == [["a", "b", "c"]]
    saved = json.loads(args.out.read_text())
    assert [(e["name"], e["test"]) for e in saved["runs"]] == [("a", 0.5), ("b", 0.7), ("c", 0.7)]
    assert saved["seconds"]["tep"] >= 10.0 and "total" in saved["seconds"]
    assert saved["num_factories"] == 10 and saved["rounds"] == {"tep": 2}
    printed = capsys.readouterr().out
    assert "[tep 3/3] run c: test=0.7  (2.0 s)" in printed
    assert "tep: 3 runs, 2 rounds each" in printed
