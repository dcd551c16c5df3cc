"""The DP cost benchmark: chosen modes, the non-private baseline and the table's ratios."""

from __future__ import annotations

import pytest

from experiments.bench_dp import bench_task, main, rows
from standard_models.registry import get_task


def test_chosen_modes_run_against_the_non_private_baseline() -> None:
    stats, examples = bench_task(
        get_task("molding_quality"), rounds=1, epochs=2, batch_size=256, modes=["bk"]
    )
    assert list(stats) == ["non-private", "bk"]
    assert examples > 0
    for mode in stats.values():
        (measured,) = mode.rounds  # the warm-up round is not kept
        assert len(measured.epoch_s) == 2 and all(t > 0 for t in measured.epoch_s)
        assert measured.wall_s >= sum(measured.epoch_s)
        assert measured.cpu_s > 0
    table = rows({"molding_quality": stats}, {"molding_quality": 256})
    assert [r[1] for r in table] == ["non-private", "bk"]
    assert table[0][4] == "1.00x" and table[0][2] == "256"
    ratio = float(table[1][4].rstrip("x"))
    assert ratio == pytest.approx(stats["bk"].epoch_s / stats["non-private"].epoch_s, abs=0.006)
    cpu_ratio = float(table[1][9].rstrip("x"))
    assert cpu_ratio == pytest.approx(stats["bk"].cpu_s / stats["non-private"].cpu_s, abs=0.006)


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown modes"):
        bench_task(get_task("molding_quality"), rounds=1, epochs=1, batch_size=64, modes=["bq"])
    with pytest.raises(SystemExit):
        main(["--modes", "bq"])


def test_it_trains_on_the_factory_s_training_examples() -> None:
    """One example per privacy unit (non-overlapping RUL windows), as a factory's round does;
    the stride-1 evaluation windows are many times more and would time another workload."""
    from experiments.bench_dp import DATA_SEED, NUM_FACTORIES
    from standard_models.base import PartitionConfig

    task = get_task("rul")
    factory = task.generate(NUM_FACTORIES, DATA_SEED, PartitionConfig()).factories[0]
    _, examples = bench_task(task, rounds=1, epochs=1, batch_size=256, modes=["bk"])
    assert examples == len(task.to_train_dataset(factory))
    assert examples * 10 < len(task.to_dataset(factory))
