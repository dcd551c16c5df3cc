"""The contribution benchmark's copy experiment compares like with like."""

from __future__ import annotations

import pandas as pd
import pytest

from experiments.bench_contribution import ESTIMATORS, federated_run, planted_factories
from standard_models.registry import get_task


def test_the_federation_without_the_copy_keeps_everyone_else_as_they_were(tmp_path) -> None:
    task = get_task("molding_quality")
    full, _ = planted_factories(task, 0, tmp_path / "full")
    solo, _ = planted_factories(task, 0, tmp_path / "solo", absent=("duplicate",))
    assert [f.fid for f in solo] == [f.fid for f in full if f.kind != "duplicate"]
    mine = {f.fid: f for f in full}
    for f in solo:
        if f.path is None:
            continue
        pd.testing.assert_frame_equal(pd.read_parquet(f.path), pd.read_parquet(mine[f.fid].path))


def test_a_merged_copy_earns_the_pair_exactly_what_the_original_earns_alone() -> None:
    """Same data, ids and DP noise for everyone else: with the copy merged into its original
    (by the record sketches the factories' rounds made, as the server gets them) the round is
    nearly the same game, so the pair's scores sum to about the original's in the federation
    without the copy, and nobody else's moves by more than a rounding of the total. Not
    exactly: the copy trains with its own DP noise, so the merged player is the mean of two
    noisy updates of the same records (a copy paid twice would earn about 2x)."""
    task = get_task("molding_quality")
    label = "linearised"
    est = {"linearised": ESTIMATORS["linearised"]}
    run = federated_run(task, 0, 1, est, 8.0, product_guards=(label,))
    alone = federated_run(task, 0, 1, est, 8.0, product_guards=(label,), absent=("duplicate",))
    with_copy = run["rounds"][0]["guarded"][label]["scores"]
    without = alone["rounds"][0]["guarded"][label]["scores"]
    assert run["rounds"][0]["guarded"][label]["groups"] == [["f0-clean_a", "f6-duplicate"]]
    pair = with_copy["f0-clean_a"] + with_copy["f6-duplicate"]
    assert pair == pytest.approx(without["f0-clean_a"], rel=0.01)
    total = sum(abs(v) for v in without.values())
    for fid, value in without.items():
        if fid != "f0-clean_a":
            assert with_copy[fid] == pytest.approx(value, abs=0.003 * total)


def _run(flip_scores: list[float], flip_last: bool) -> dict:
    """A synthetic 2-round run: four factories that trained and a zero free-rider; the flipped
    factory's reference score per round is ``flip_scores``, and it ranks last among those that
    trained when ``flip_last``."""
    ids = ["s-clean_a", "s-clean_b", "s-label_flip", "s-feature_noise", "s-free_rider_zero"]
    rounds = []
    for value in flip_scores:
        scores = {
            "s-clean_a": 0.3,
            "s-clean_b": 0.2 if flip_last else value - 0.1,
            "s-label_flip": value,
            "s-feature_noise": value + 0.5 if flip_last else value - 0.05,
            "s-free_rider_zero": -1.0,
        }
        scored = {"exact": {"scores": scores, "evaluations": 31, "seconds": 0.1}}
        guarded = {"exact": {"scores": scores, "withheld": []}}
        rounds.append({"scored": scored, "guarded": guarded})
    return {"ids": ids, "rounds": rounds}


def test_the_flipped_factorys_rank_is_judged_where_the_flip_hurt():
    from experiments.bench_contribution import summarise

    runs = [
        _run([-0.1, -0.1], flip_last=True),  # hurt, last two: counts
        _run([-0.2, 0.1], flip_last=False),  # hurt, not last two: a miss
        _run([0.1, 0.1], flip_last=True),  # did not hurt: not judged
    ]
    row = summarise(runs, [None] * 3)["exact"]
    assert row["flip_hurts"] == 2
    assert row["flip_bottom2_where_hurts"] == 0.5
    assert row["flip_bottom2_trained"] == pytest.approx(2 / 3)
