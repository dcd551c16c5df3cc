"""Resuming an interrupted benchmark grid keeps exactly the finished runs of the same grid."""

import json

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
    assert done == {("tep", 0): {"task": "tep", "k": 0, "test": 0.5}}  # an older file: no overrides
    assert seconds == {"tep": 12.5}
    # Another grid (rounds or overrides differ) starts from scratch.
    assert finished_runs(out, "cells", _key, {"rounds": {"tep": 4}}) == ({}, {})
    other_split = {"rounds": {"tep": 3}, "overrides": ["partition=dirichlet"]}
    assert finished_runs(out, "cells", _key, other_split) == ({}, {})
