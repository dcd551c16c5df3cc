"""The run's description and plots, drawn from summary data alone (no MLflow, no Flower)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_server.report import (
    PLOTS,
    TOP_N,
    factory_rows,
    figures,
    money,
    outcome_counts,
    run_description,
    save_plots,
    synthetic_summary,
    top_n,
)


def _summary() -> dict:
    """Four factories over two rounds: one declines in round 2, one fails, one is rejected."""
    return {
        "run_name": "tep-fedavg-eps8-s0",
        "task": "tep_fault",
        "strategy": "fedavg",
        "contribution": "gtg",
        "main_metric": "macro_f1",
        "rounds": [
            {"round": 0, "macro_f1": 0.03, "loss": 3.0},
            {"round": 1, "macro_f1": 0.31, "loss": 2.0},
            {"round": 2, "macro_f1": 0.48, "loss": 1.5},
        ],
        "test": {"macro_f1": 0.4567, "loss": 1.6},
        "privacy": {
            "enabled": True,
            "epsilon": 8.0,
            "delta": 1e-5,
            "unit": "window",
            "min_run_epsilon": 0.1,
        },
        "reward_currency": "EUR",
        "contribution_cumulative": {"f0": 0.6, "f1": 0.2, "f2": -0.1, "f3": 0.2},
        "payout_cumulative": {"f0": 64453, "f1": 21484, "f2": 0, "f3": 14063},
        "factory_epsilon": {"f0": 7.95, "f1": 4.0, "f2": 4.0, "f3": 2.0},
        "failures": [
            {"round": 2, "factory": "f3", "status": "declined", "reason": "budget | low"},
            {"round": 2, "factory": "f2", "status": "data-error", "reason": "bad file"},
        ],
        "factory_rounds": [
            {
                "round": 1,
                "status": dict.fromkeys(("f0", "f1", "f2", "f3"), "accepted"),
                "epsilon": {"f0": 4.0, "f1": 2.0, "f2": 2.0, "f3": 2.0},
                "contribution": {"f0": 0.3, "f1": 0.1, "f2": -0.1, "f3": 0.2},
            },
            {
                "round": 2,
                "status": {
                    "f0": "accepted",
                    "f1": "rejected",
                    "f2": "data-error",
                    "f3": "declined",
                },  # fmt: skip
                "epsilon": {"f0": 7.95, "f1": 4.0, "f2": 4.0, "f3": 2.0},
                "contribution": {"f0": 0.3},
            },
        ],
    }


def test_money_is_major_units_with_the_currency() -> None:
    assert money(64453, "EUR") == "EUR 644.53"
    assert money(123456789, "CHF") == "CHF 1,234,567.89"
    assert money(0, "EUR") == "EUR 0.00"


def test_factory_rows_share_budget_and_problems() -> None:
    rows = {r.factory_id: r for r in factory_rows(_summary())}
    assert [r.factory_id for r in factory_rows(_summary())] == ["f0", "f1", "f3", "f2"]
    assert rows["f0"].share == pytest.approx(0.6)  # of the positive total 1.0
    assert rows["f2"].share == 0.0  # a negative contribution earns no share
    assert rows["f0"].epsilon_left == pytest.approx(0.05)
    assert rows["f0"].below_minimum and not rows["f1"].below_minimum
    assert rows["f0"].rounds == 2 and rows["f1"].rounds == 1 and rows["f3"].rounds == 1
    assert rows["f2"].problems == ("round 2 data-error: bad file",)


def test_outcome_counts_per_round() -> None:
    assert outcome_counts(_summary()) == [
        {"round": 1, "accepted": 4, "rejected": 0, "declined": 0, "failed": 0},
        {"round": 2, "accepted": 1, "rejected": 1, "declined": 1, "failed": 1},
    ]


def test_description_answers_the_operators_questions() -> None:
    text = run_description(_summary())
    lines = text.splitlines()
    # what MLflow shows before "Show more": the outcome line, then the table at once
    assert lines[0] == (
        "**final macro_f1** validation 0.4800, test 0.4567 · **rounds** 2 · "
        "**accepted updates** 5 · **paid** EUR 1,000.00"
    )
    assert lines[2].startswith("| factory | contribution share | payout |")
    assert "epsilon 8 per window, delta 1e-05" in text
    assert "**accepted updates** 5" in text
    assert "validation 0.4800, test 0.4567" in text
    assert "1 of 4 factories have less epsilon left than privacy.min_run_epsilon (0.1)" in text
    table = [line for line in text.splitlines() if line.startswith("| f") and "share" not in line]
    assert table[0] == (
        "| f0 | 60.0 % | EUR 644.53 | 7.950 | 0.050 (declines next run) | 2 | none |"
    )
    assert table[2].startswith("| f3 | 20.0 % | EUR 140.63 |")
    assert "budget \\| low" in table[2]  # a pipe in a reason cannot break the table
    assert "| epsilon left of 8 |" in text
    assert "FAILED" not in text


def test_description_of_a_failed_run_and_without_dp_or_rewards() -> None:
    summary = {
        "run_name": "r",
        "main_metric": "rmse",
        "privacy": {"enabled": False},
        "failures": [{"round": 1, "factory": "f0", "status": "declined", "reason": "x"}],
        "factory_rounds": [{"round": 1, "status": {"f0": "declined"}}],
    }
    text = run_description(summary, failure="NothingTrained: no round accepted an update")
    assert text.startswith("**FAILED: NothingTrained: no round accepted an update**")
    assert "no sample-level DP" in text and "**accepted updates** 0" in text
    assert "| f0 | - | - | - | - | 0 | round 1 declined: x |" in text


def test_long_tables_stop_and_say_how_many_more() -> None:
    text = run_description(synthetic_summary(100), max_factories=20)
    assert sum(line.startswith("| factory_") for line in text.splitlines()) == 20
    assert "... and 80 more factories" in text


def test_top_n_sums_the_rest_as_others() -> None:
    values = {f"f{i:02d}": float(i) for i in range(30)}
    ranked = top_n(values, 5)
    assert [k for k, _ in ranked] == ["f29", "f28", "f27", "f26", "f25", "others (25)"]
    assert ranked[-1][1] == sum(range(25))
    assert top_n({"a": 1.0, "b": 2.0}, 5) == [("b", 2.0), ("a", 1.0)]


@pytest.mark.parametrize("num_factories", [4, 100])
def test_plots_stay_legible_with_few_and_many_factories(num_factories: int, tmp_path: Path):
    summary = _summary() if num_factories == 4 else synthetic_summary(num_factories)
    drawn = figures(summary)
    assert set(drawn) == set(PLOTS)
    share_axes = drawn["contribution_share"].axes[0]
    labels = [t.get_text() for t in share_axes.get_yticklabels()]
    assert len(labels) == min(num_factories, TOP_N + 1)  # top-N plus one "others" bar
    if num_factories > TOP_N:
        assert labels[0] == f"others ({num_factories - TOP_N})"
    payout_labels = [t.get_text() for t in drawn["payouts"].axes[0].texts]
    assert all(label.strip().startswith("EUR ") for label in payout_labels)
    epsilon = drawn["epsilon"].axes[0]
    assert any(line.get_label().startswith("budget 8") for line in epsilon.get_lines())
    assert len(epsilon.get_legend().get_texts()) <= TOP_N + 3
    paths = save_plots(summary, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{name}.png" for name in PLOTS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_the_description_says_who_was_paid_less_and_why() -> None:
    summary = _summary()
    summary["factory_rounds"] = [
        {**r, "withheld": ["factory_003"], "duplicate_groups": [["factory_000", "factory_002"]]}
        for r in summary["factory_rounds"]
    ]
    text = run_description(summary)
    assert "**Pay withheld** from factory_003" in text
    assert "**Scored as one factory**: factory_000, factory_002 sent copies" in text
    assert "Pay withheld" not in run_description(_summary())
    for r in summary["factory_rounds"]:
        r["record_groups"] = [["factory_000", "factory_002"]]
    assert "factory_000, factory_002 train on the same records" in run_description(summary)
    assert "Paid apart" not in run_description(summary)
    for r in summary["factory_rounds"]:
        r["cleared_pairs"] = [["factory_003", "factory_001"]]
    assert (
        f"**Paid apart**: factory_001 and factory_003 sent updates as alike as copies' in "
        f"{len(summary['factory_rounds'])} round"
    ) in run_description(summary)


def test_a_long_list_of_withheld_factories_is_cut_short() -> None:
    summary = _summary()
    held = [f"factory_{i:03d}" for i in range(100)]
    summary["factory_rounds"] = [{**summary["factory_rounds"][-1], "withheld": held}]
    text = run_description(summary)
    assert "factory_009 and 90 more: over their rounds" in text and "factory_010" not in text
