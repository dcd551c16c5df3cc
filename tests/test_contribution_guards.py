"""The noise and duplicate guards of contribution pay, on synthetic updates and scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fl_common.sketch import fingerprint_similarity, record_fingerprint
from strategies.contribution.guards import (
    NoiseVerdict,
    alignment_statistic,
    disjoint_sketches,
    duplicate_groups,
    duplicate_pairs,
    excess_cosines,
    fingerprint_groups,
    flat_deltas,
    merge_groups,
    noise_test,
    pairwise_cosines,
    split_group_credit,
    withhold_unproven,
)

DIM = 4000


def honest_round(rng, n_honest=5, signal=1.0, noise=8.0, extra=()):
    """Updates sharing a population direction under heavy isotropic (DP-like) noise."""
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    rows = [
        signal * np.sqrt(DIM) * direction / 4 + noise * rng.normal(size=DIM) / 4
        for _ in range(n_honest)
    ]
    return np.stack(rows + [e(rows, rng) for e in extra])


def pure_noise(rows, rng):
    return rng.normal(size=DIM) * np.linalg.norm(rows[0]) / np.sqrt(DIM)


def test_flat_deltas_uses_float_arrays_only():
    ref = {"w": np.zeros((2, 2), np.float32), "b": np.ones(3), "steps": np.array([5])}
    upd = {"w": np.ones((2, 2), np.float32), "b": np.ones(3) * 2, "steps": np.array([9])}
    deltas = flat_deltas([upd, ref], ref)
    assert deltas.shape == (2, 7)
    np.testing.assert_allclose(deltas[0], [1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(deltas[1], 0.0)


def test_alignment_of_pure_noise_is_standard_normal():
    rng = np.random.default_rng(0)
    zs = []
    for _ in range(300):
        deltas = honest_round(rng, extra=(pure_noise,))
        zs.append(alignment_statistic(deltas, [1.0] * len(deltas))[-1])
    zs = np.array(zs)
    assert abs(zs.mean()) < 0.2
    assert 0.8 < zs.std() < 1.2


def test_alignment_of_honest_updates_is_large():
    rng = np.random.default_rng(1)
    deltas = honest_round(rng, noise=2.0)
    z = alignment_statistic(deltas, [100, 200, 300, 100, 50])
    assert np.all(z > 5)


def test_alignment_edge_cases():
    assert alignment_statistic(np.ones((1, 10)), [1.0]).tolist() == [0.0]
    z = alignment_statistic(np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), [1.0, 1.0])
    assert z.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="weights"):
        alignment_statistic(np.ones((2, 3)), [1.0, 0.0])


def test_noise_test_on_synthetic_round_statistics():
    verdicts = noise_test(
        {"noise": [0.5, -1.0, 1.2, 0.3], "honest": [3.0, 2.5, 4.0, 2.0], "absent": []},
        alpha=1e-3,
    )
    assert verdicts["noise"] == NoiseVerdict(z=pytest.approx(0.5), rounds=4, paid=False)
    assert verdicts["honest"].z == pytest.approx(11.5 / 2)
    assert verdicts["honest"].paid
    assert verdicts["absent"] == NoiseVerdict(0.0, 0, False)
    # At the threshold: z = 3.2905 (alpha 1e-3, half of it per test) is not enough, a little
    # more is.
    assert not noise_test({"f": [3.2905]})["f"].paid
    assert noise_test({"f": [3.2906]})["f"].paid
    # A strong first round is proof enough however many noise-like rounds follow ...
    assert noise_test({"f": [8.0] + [0.0] * 30})["f"].paid
    assert not noise_test({"f": [3.5] + [0.0] * 30})["f"].paid  # ... a borderline one is not
    with pytest.raises(ValueError, match="alpha"):
        noise_test({}, alpha=0.0)


def test_noise_sender_false_pay_rate_is_alpha():
    rng = np.random.default_rng(2)
    paid = sum(noise_test({"f": rng.normal(size=6)}, alpha=0.05)["f"].paid for _ in range(4000))
    assert 0.035 < paid / 4000 < 0.065


def test_withhold_unproven():
    verdicts = {"a": NoiseVerdict(5.0, 3, True), "b": NoiseVerdict(0.1, 3, False)}
    out = withhold_unproven({"a": 2.0, "b": 1.5, "c": 0.7, "d": -1.0}, verdicts)
    assert out == {"a": 2.0, "b": 0.0, "c": 0.0, "d": -1.0}


def test_duplicates_are_found_and_iid_siblings_are_not():
    rng = np.random.default_rng(3)
    population = rng.normal(size=DIM)
    own = [rng.normal(size=DIM) for _ in range(6)]
    # Same-population factories: shared part + own data part + independent DP noise.
    rows = [population + 0.8 * own[i] + 2.0 * rng.normal(size=DIM) for i in range(6)]
    rows.append(population + 0.8 * own[0] + 2.0 * rng.normal(size=DIM))  # factory 0's records
    deltas = np.stack(rows)
    assert duplicate_pairs(deltas) == [(0, 6)]
    excess = excess_cosines(deltas)
    assert excess[0, 6] > 0.05
    assert np.abs(np.delete(excess[1], [1])).max() < 0.05
    cos = pairwise_cosines(deltas)
    np.testing.assert_allclose(np.diag(cos), 1.0)
    assert duplicate_pairs(deltas[:2]) == []


def test_pure_noise_updates_are_never_duplicates():
    rng = np.random.default_rng(4)
    flagged = sum(len(duplicate_pairs(rng.normal(size=(8, DIM)))) for _ in range(50))
    assert flagged == 0


def test_fingerprints_find_shared_records_only():
    rng = np.random.default_rng(5)
    a = pd.DataFrame(rng.normal(size=(2000, 4)), columns=list("wxyz"))
    b = pd.DataFrame(rng.normal(size=(2000, 4)), columns=list("wxyz"))
    key = "0123456789abcdef"
    fa, fb = record_fingerprint(a, key), record_fingerprint(b, key)
    copy = record_fingerprint(a.sample(frac=1.0, random_state=1).reset_index(drop=True), key)
    half = record_fingerprint(pd.concat([a.head(1000), b.head(1000)]), key)
    assert fa.size == 256
    assert fingerprint_similarity(fa, copy) == 1.0
    assert fingerprint_similarity(fa, fb) == 0.0
    assert 0.2 < fingerprint_similarity(fa, half) < 0.5  # Jaccard of the sets: 1/3
    other_key = record_fingerprint(a, "fedcba9876543210")
    assert fingerprint_similarity(fa, other_key) == 0.0
    groups = fingerprint_groups({"a": fa, "b": fb, "copy": copy, "half": half})
    assert groups == [frozenset({"a", "copy"})]
    with pytest.raises(ValueError, match="16 to 64 bytes"):
        record_fingerprint(a, "short")


def test_merge_groups_joins_pairs_and_groups():
    assert merge_groups([("a", "b"), ("c", "d")], [frozenset({"b", "c"})]) == [
        frozenset({"a", "b", "c", "d"})
    ]
    assert merge_groups([]) == []


def test_duplicate_groups_need_repeated_flags_and_merge_transitively():
    ids = ["a", "b", "c", "d"]
    rounds = [
        (ids, [(0, 1), (1, 2)]),
        (ids, [(0, 1)]),
        (ids, [(1, 2), (0, 3)]),
        (["a", "b", "c"], [(0, 1)]),
    ]
    # a-b flagged 3/4 rounds together, b-c 2/4, a-d 1/3.
    assert duplicate_groups(rounds, min_fraction=0.5) == [frozenset({"a", "b", "c"})]
    assert duplicate_groups(rounds, min_fraction=0.75) == [frozenset({"a", "b"})]
    assert duplicate_groups([(ids, [])]) == []
    with pytest.raises(ValueError, match="min_fraction"):
        duplicate_groups(rounds, min_fraction=0.0)


def test_split_group_credit_pays_a_group_as_one_factory():
    scores = {"a": 0.4, "copy": 0.3, "b": 0.2, "x": 0.1, "y": -0.1}
    out = split_group_credit(scores, [frozenset({"a", "copy"}), frozenset({"x", "y", "gone"})])
    assert out["a"] == pytest.approx(0.35 / 2)
    assert out["copy"] == pytest.approx(0.35 / 2)
    assert out["a"] + out["copy"] == pytest.approx((0.4 + 0.3) / 2)
    assert out["x"] + out["y"] == pytest.approx(0.0)
    assert out["b"] == 0.2
    assert split_group_credit(scores, []) == scores
    with pytest.raises(ValueError, match="overlap"):
        split_group_credit(scores, [frozenset({"a", "b"}), frozenset({"b", "x"})])


# -- the guards on the product path ------------------------------------------------------------
from strategies.contribution.coalitions import (  # noqa: E402
    GroupedAggregator,
    WeightedMeanAggregator,
    merge_players,
    round_updates,
)
from strategies.contribution.guards import ContributionGuard, GuardConfig  # noqa: E402
from strategies.contribution.scorer import ContributionScorer  # noqa: E402

#: The noise test on update directions (the placebo rule needs a validation evaluator).
ALIGNMENT = GuardConfig(noise_test=True, noise_rule="alignment")


def copy_of_first(rows, rng):
    return rows[0].copy()


def test_guard_config_reads_the_block_and_names_bad_values():
    assert GuardConfig.from_options(None) == GuardConfig()
    cfg = GuardConfig.from_options(
        {"noise_test": True, "noise_alpha": 0.01, "merge_duplicates": False}
    )
    assert cfg.noise_alpha == 0.01 and not cfg.merge_duplicates and cfg.active
    assert not GuardConfig(noise_test=False, merge_duplicates=False).active
    with pytest.raises(ValueError, match="contribution.guards.noise_alpha must be in"):
        GuardConfig(noise_alpha=1.0)
    with pytest.raises(ValueError, match="duplicate_min_fraction"):
        GuardConfig(duplicate_min_fraction=0)
    with pytest.raises(ValueError, match="no key 'alpha'"):
        GuardConfig.from_options({"alpha": 0.1})


def test_guard_withholds_a_noise_sender_and_groups_copies_over_rounds():
    rng = np.random.default_rng(5)
    ids = [f"f{i}" for i in range(7)]  # f0..f4 honest, f5 noise, f6 a copy of f0
    guard = ContributionGuard(ALIGNMENT)
    records = []
    for _ in range(3):
        deltas = honest_round(rng, noise=2.0, extra=(pure_noise, copy_of_first))
        found = guard.observe(ids, deltas, [100.0] * 7)
        records.append({"alignment": found.alignment, "duplicate_pairs": found.pairs})
    assert found.withheld == ("f5",)
    assert found.groups == (("f0", "f6"),)
    assert all(v.paid for f, v in found.verdicts.items() if f != "f5")
    # A restarted server rebuilds the same state from the recorded rounds.
    again = ContributionGuard(ALIGNMENT)
    again.restore(records)
    deltas = honest_round(rng, noise=2.0, extra=(pure_noise, copy_of_first))
    assert (
        again.observe(ids, deltas, [100.0] * 7).groups
        == guard.observe(ids, deltas, [100.0] * 7).groups
    )
    # Switched off, nothing is withheld or grouped.
    off = ContributionGuard(GuardConfig(noise_test=False, merge_duplicates=False))
    found = off.observe(ids, deltas, [100.0] * 7)
    assert found.withheld == () and found.groups == () and found.pairs == ()


def test_disjoint_record_sketches_keep_alike_updates_apart():
    """Two factories whose updates the update test flags every round (f6 sends f0's data
    direction) but whose record sketches share nothing are paid apart, and the round says which
    pair it cleared; a sketch sharing records, a missing sketch or the option off groups them."""
    rng = np.random.default_rng(5)
    ids = [f"f{i}" for i in range(7)]
    key = "0123456789abcdef"
    frames = [pd.DataFrame(rng.normal(size=(400, 3)), columns=list("xyz")) for _ in ids]
    disjoint = {f: record_fingerprint(frame, key) for f, frame in zip(ids, frames, strict=True)}
    rounds = [honest_round(rng, noise=2.0, extra=(pure_noise, copy_of_first)) for _ in range(3)]

    def last_round(config, sketches):
        guard = ContributionGuard(config)
        for deltas in rounds:
            guard.observe_sketches(sketches)
            found = guard.observe(ids, deltas, [100.0] * 7)
        return found

    cfg = GuardConfig(noise_test=False)
    found = last_round(cfg, disjoint)
    assert found.pairs == (("f0", "f6"),) and found.groups == ()
    assert found.cleared == (("f0", "f6"),)
    # f6 holds a tenth of f0's records beside its own: the sketches share hashes.
    partial = dict(disjoint)
    mixed = pd.concat([frames[6].head(360), frames[0].head(40)])
    partial["f6"] = record_fingerprint(mixed, key)
    assert not disjoint_sketches(partial["f0"], partial["f6"])
    grouped = last_round(cfg, partial)
    assert grouped.groups == (("f0", "f6"),) and grouped.cleared == ()
    # No sketch from f6, or the rule off: the updates decide.
    unsketched = {f: v for f, v in disjoint.items() if f != "f6"}
    assert last_round(cfg, unsketched).groups == (("f0", "f6"),)
    off = GuardConfig(noise_test=False, disjoint_sketches_clear=False)
    assert last_round(off, disjoint).groups == (("f0", "f6"),)
    assert last_round(GuardConfig(noise_test=False, record_sketches=False), disjoint).groups == (
        ("f0", "f6"),
    )
    assert disjoint_sketches(disjoint["f0"], disjoint["f1"])
    assert not disjoint_sketches(disjoint["f0"], None)
    assert not disjoint_sketches(disjoint["f0"], np.zeros(0, np.uint64))


def test_a_factory_alone_in_its_rounds_has_no_evidence_and_is_withheld():
    guard = ContributionGuard(ALIGNMENT)
    found = guard.observe(["only"], np.ones((1, 50)), [10.0])
    assert found.withheld == ("only",) and found.verdicts["only"].rounds == 1


def test_merged_players_enter_as_one_member_with_the_smallest_weight():
    states = [{"w": np.array([1.0, 0.0])}, {"w": np.array([0.0, 4.0])}, {"w": np.array([3.0, 3.0])}]
    agg = WeightedMeanAggregator(states, [1.0, 3.0, 2.0])
    merged = merge_players(agg, [[0, 2], [1]])
    assert isinstance(merged, WeightedMeanAggregator)
    updates, weights = round_updates(merged)
    np.testing.assert_allclose(updates[0]["w"], [1.0, 0.0])  # the first member's update
    assert weights == [1.0, 3.0]
    assert merge_players(agg, [[0], [1], [2]]) is agg
    grouped = GroupedAggregator(agg, [[0, 2], [1]])
    np.testing.assert_allclose(
        grouped.aggregate([frozenset({0})])[0]["w"], agg.aggregate([frozenset({0, 2})])[0]["w"]
    )


def _quadratic_round(rng, n_honest, extra=()):
    """Honest updates near a target, each factory's own data direction, DP-like noise."""
    target = rng.normal(size=DIM)
    rows = [
        0.5 * target + 0.5 * rng.normal(size=DIM) + 0.3 * rng.normal(size=DIM)
        for _ in range(n_honest)
    ]
    rows += [e(rows, rng) for e in extra]
    score = lambda states: [-float(np.mean((s["w"] - target) ** 2)) for s in states]  # noqa: E731
    return [{"w": r} for r in rows], score


def test_the_scorer_pays_a_copy_nothing_extra_and_withholds_noise():
    rng = np.random.default_rng(11)
    updates, score = _quadratic_round(rng, 4, extra=(pure_noise, copy_of_first))
    states = [{"w": u["w"]} for u in updates]
    reference = {"w": np.zeros(DIM)}
    ids = ["a", "b", "c", "d", "noise", "z_copy"]
    sizes = [100.0] * 6
    guarded = ContributionScorer("exact", score, guards=ALIGNMENT)
    got = guarded.score_round(1, ids, WeightedMeanAggregator(states, sizes), reference)
    assert got.groups == (("a", "z_copy"),)
    assert got.withheld == ("noise",)
    assert got.scores["a"] == pytest.approx(got.scores["z_copy"])
    assert set(got.alignment) == set(ids) and set(got.noise_z) == set(ids)
    # The pair together earns what the original earns in the same round without its copy.
    alone = ContributionScorer("exact", score).score_round(
        1, ids[:5], WeightedMeanAggregator(states[:5], sizes[:5]), reference
    )
    assert got.scores["a"] + got.scores["z_copy"] == pytest.approx(alone.scores["a"])
    for fid in ("b", "c", "d", "noise"):
        assert got.scores[fid] == pytest.approx(alone.scores[fid])
    # Without the guards the copy doubles the pair's credit.
    plain = ContributionScorer("exact", score).score_round(
        1, ids, WeightedMeanAggregator(states, sizes), reference
    )
    assert plain.withheld == () and plain.groups == ()
    assert plain.scores["a"] + plain.scores["z_copy"] > 1.3 * alone.scores["a"]
    # A restarted scorer continues from the recorded rounds.
    resumed = ContributionScorer("exact", score, guards=ALIGNMENT)
    resumed.resume([{"alignment": got.alignment, "duplicate_pairs": got.pairs}])
    assert resumed.guard is not None and resumed.guard._rounds == guarded.guard._rounds


def test_record_sketches_group_a_copy_the_updates_cannot_see():
    """Updates of pure noise (no pair stands out) and a copy known only by its record sketch:
    the sketch groups it, the newest sketch of a factory counts, and switched off it does not."""
    rng = np.random.default_rng(8)
    frames = [pd.DataFrame(rng.normal(size=(500, 3)), columns=list("xyz")) for _ in range(4)]
    key = "0123456789abcdef"
    sketches = {f"f{i}": record_fingerprint(f, key) for i, f in enumerate(frames)}
    sketches["f3"] = sketches["f0"].copy()  # f3 trains on f0's records
    ids = list(sketches)
    guard = ContributionGuard(GuardConfig(noise_test=False))
    assert guard.observe_sketches(sketches) == [frozenset({"f0", "f3"})]
    found = guard.observe(ids, rng.normal(size=(4, DIM)), [100.0] * 4)
    assert found.pairs == () and found.groups == (("f0", "f3"),)
    assert found.record_groups == (("f0", "f3"),)
    # A group needs both members in the round.
    assert guard.observe(ids[:3], rng.normal(size=(3, DIM)), [100.0] * 3).groups == ()
    # f3 now reports other records: the group dissolves; f1's earlier sketch is kept.
    guard.observe_sketches({"f3": record_fingerprint(frames[3], key)})
    assert guard.observe(ids, rng.normal(size=(4, DIM)), [100.0] * 4).groups == ()
    assert set(guard.sketches) == set(ids)
    off = ContributionGuard(GuardConfig(noise_test=False, record_sketches=False))
    assert off.observe_sketches(sketches) == []
    assert off.observe(ids, rng.normal(size=(4, DIM)), [100.0] * 4).groups == ()
    with pytest.raises(ValueError, match="sketch_min_similarity must be in"):
        GuardConfig(sketch_min_similarity=0)


def test_sketch_groups_match_the_pair_by_pair_comparison():
    """Only pairs sharing a hash are compared; the groups are those of every pair compared."""
    rng = np.random.default_rng(11)
    pool = rng.integers(0, 2**63, 4000, dtype=np.uint64)
    sketches = {}
    for i in range(24):
        shared = int(rng.uniform(0, 1) * 4000) if i % 2 else 0
        own = rng.integers(0, 2**63, 4000, dtype=np.uint64)
        sketches[f"f{i:02d}"] = np.unique(np.concatenate([pool[:shared], own[shared:]]))[:256]
    ids = sorted(sketches)
    for level in (0.05, 0.3, 0.5, 0.9):
        pairwise = merge_groups(
            [
                (a, b)
                for i, a in enumerate(ids)
                for b in ids[i + 1 :]
                if fingerprint_similarity(sketches[a], sketches[b]) >= level
            ]
        )
        assert fingerprint_groups(sketches, level) == pairwise
    assert fingerprint_groups(sketches, 0.05)  # the planted overlaps are found
    assert fingerprint_groups({"only": sketches["f00"]}) == []
