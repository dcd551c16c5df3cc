"""The privacy audit's draws: members and non-members share no raw record and, for a window
unit, come from the same recordings; the LiRA score; one tiny audit end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.audit_privacy import (
    attack_metrics,
    audit_task,
    draw_split,
    lira_scores,
    pool_units,
    unit_recordings,
)
from standard_models.base import PartitionConfig, UnitDataset
from standard_models.registry import get_task


@pytest.fixture(scope="module")
def rul_data():
    task = get_task("rul")
    return task, task.generate(2, 0, PartitionConfig())


def test_window_units_know_their_machine(rul_data) -> None:
    task, data = rul_data
    frame = data.factories[0]
    recording = unit_recordings(task, frame, None)
    windows = task.to_train_dataset(frame, None)
    assert len(recording) == len(windows)
    # one recording per machine, numbered in order, each machine's windows contiguous
    machines = frame["unit_id"].nunique()
    assert sorted(set(recording.tolist())) == list(range(machines))
    assert (np.diff(recording) >= 0).all()
    # a machine of L cycles gives L // 30 non-overlapping windows
    lengths = frame.groupby("unit_id").size().sort_index().to_numpy()
    assert np.bincount(recording).tolist() == (lengths // task.window).tolist()


def test_whole_machine_units_are_their_own_recording(rul_data) -> None:
    task, data = rul_data
    recording = unit_recordings(task, data.factories[0], "machine")
    assert recording.tolist() == list(range(data.factories[0]["unit_id"].nunique()))


def test_pool_numbers_recordings_across_factories(rul_data) -> None:
    task, data = rul_data
    pool, used, recording = pool_units(task, data.factories, 0, None, 10_000)
    assert used == [0, 1]
    assert len(recording) == len(pool)
    machines = sum(f["unit_id"].nunique() for f in data.factories)
    assert len(np.unique(recording)) == machines


def test_paired_split_draws_neighbours_of_the_same_recording() -> None:
    recording = np.repeat(np.arange(6), [7, 4, 5, 2, 1, 9])
    rng = np.random.default_rng(0)
    inside, outside = draw_split(recording, 100, "paired", rng)
    assert len(inside) == len(outside) == 3 + 2 + 2 + 1 + 0 + 4
    assert not set(inside) & set(outside)
    # every member has its non-member neighbour in the same recording, and vice versa
    partner = {min(a, b): max(a, b) for a, b in zip(inside, outside, strict=False)}
    assert len(partner) == len(inside)
    assert all(abs(int(a) - int(b)) == 1 for a, b in zip(sorted(inside), sorted(outside),
                                                         strict=True))
    assert np.bincount(recording[inside], minlength=6).tolist() == np.bincount(
        recording[outside], minlength=6
    ).tolist()
    # the coin decides which side of a pair is the member: both sides occur
    assert (inside % 2 == 1).any() and (inside % 2 == 0).any()


def test_paired_split_takes_as_many_pairs_as_asked() -> None:
    recording = np.repeat(np.arange(10), 10)
    inside, outside = draw_split(recording, 12, "paired", np.random.default_rng(1))
    assert len(inside) == len(outside) == 12
    assert not set(inside) & set(outside)


def test_whole_units_are_split_at_random() -> None:
    recording = np.arange(50)
    for split in ("paired", "random"):
        inside, outside = draw_split(recording, 30, split, np.random.default_rng(2))
        assert len(inside) == len(outside) == 25
        assert not set(inside) & set(outside)


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="split must be one of paired, random, got 'odd'"):
        draw_split(np.arange(4), 2, "odd", np.random.default_rng(0))


def test_lira_scores_a_loss_far_below_its_out_losses_highest() -> None:
    shadow_losses = np.array([[1.0, 1.0, 0.2], [1.2, 0.8, 0.25], [0.9, 1.1, 0.22]])
    shadow_in = np.zeros_like(shadow_losses, dtype=bool)
    target = np.array([0.1, 1.0, 0.22])
    scores = lira_scores(target, shadow_losses, shadow_in)
    assert scores[0] > scores[2] and scores[0] > scores[1]
    # a unit the target fits no better than its OUT models scores about zero
    assert abs(scores[2]) < 1.0 and abs(scores[1]) < 1.0


def test_attack_metrics_of_separated_and_identical_scores() -> None:
    assert attack_metrics(np.array([2.0, 3.0]), np.array([0.0, 1.0]))[0] == 1.0
    auc, _ = attack_metrics(np.ones(5), np.ones(5))
    assert auc == 0.5


def test_tiny_audit_runs_end_to_end() -> None:
    torch.set_num_threads(1)
    rows = audit_task("rul", [3.0], repeats=1, members=20, epochs=1, shadows=2, unit=None,
                      factory=0, generate=2)
    attacks = {(attack, label) for _, attack, label, _, _ in rows}
    assert attacks == {(a, e) for a in ("loss", "null", "lira") for e in ("no DP", "3")}
    for name, _, _, aucs, tprs in rows:
        assert "window; paired" in name and "20+20" in name
        assert len(aucs) == len(tprs) == 1 and 0.0 <= aucs[0] <= 1.0


def test_machine_unit_pool_is_a_unit_dataset(rul_data) -> None:
    task, data = rul_data
    pool, _, recording = pool_units(task, data.factories, 0, "machine", 5)
    assert isinstance(pool, UnitDataset)
    assert recording.tolist() == list(range(len(pool)))
