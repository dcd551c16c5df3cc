"""Factory statements from the reward ledger: totals, CSV/JSON/PNG export and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from ledger_helpers import RUN, play, record_run, tamper

from fl_server.cli import main
from fl_server.rewards import statements
from fl_server.rewards.allocation import RewardBook
from fl_server.rewards.ledger import RewardLedger, audit_ledger
from fl_server.rewards.statements import factory_statement, statement_stem, statement_title


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, RewardLedger, RewardBook]:
    """A ledger of 3 rounds: seq 1-2 (round 1), 3-5 (round 2), 6-8 (round 3)."""
    return record_run(tmp_path)


def test_cli_statement_exports_csv_json_png(recorded, tmp_path: Path, capsys) -> None:
    path, ledger, book = recorded
    out = tmp_path / "statements"
    assert main(["statement", "--factory", "f2", "--ledger", str(path), "--out", str(out)]) == 0
    assert "ledger verified" in capsys.readouterr().out

    with (out / "f2-statement.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert [int(r["seq"]) for r in rows] == [2, 4, 7]
    assert [float(r["contribution"]) for r in rows] == [-0.5, 1.0, 0.25]
    assert [float(r["epsilon"]) for r in rows] == [0.4, 0.8, 1.2]
    # amounts in major units with their currency, two decimals; no 16-digit floats anywhere
    assert {r["currency"] for r in rows} == {"EUR"}
    assert rows[-1]["cumulative_payout"] == f"{book.cumulative_payout['f2'] / 100:.2f}"
    assert {r["ledger_verified"] for r in rows} == {"true"}
    numbers = [r[k] for r in rows for k in ("contribution", "cumulative_contribution", "epsilon")]
    assert all(len(n.replace("-", "").replace(".", "")) <= 6 for n in numbers)
    stored = ledger.entries(factory_id="f2")
    assert [r["hash"] for r in rows] == [e.hash for e in stored]
    assert [r["prev_hash"] for r in rows] == [e.prev_hash for e in stored]

    doc = json.loads((out / "f2-statement.json").read_text())
    assert doc["factory_id"] == "f2" and doc["run_ids"] == [RUN]
    assert doc["verified"] is True and doc["verification"]["ok"] is True
    assert doc["ledger_head"] == ledger.head()
    assert doc["totals"]["payout"] == book.cumulative_payout["f2"] == sum(e.payout for e in stored)
    assert doc["totals"]["contribution"] == pytest.approx(0.75)
    assert doc["totals"]["per_run"][RUN]["cumulative_contribution"] == 0.75
    assert doc["totals"]["per_run"][RUN]["epsilon"] == 1.2
    assert doc["currency"] == "EUR" and doc["totals"]["rounds"] == 3
    assert doc["totals"]["epsilon_spent"] == 1.2
    assert len(doc["entries"]) == 3
    assert (out / "f2-statement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_statement_unknown_factory_or_run(recorded, tmp_path: Path, capsys) -> None:
    path, _, _ = recorded
    out = tmp_path / "statements"
    assert main(["statement", "--factory", "f7", "--ledger", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unknown factory 'f7'" in err and "f1, f2, f3" in err
    assert not out.exists()
    args = ["statement", "--factory", "f1", "--ledger", str(path), "--out", str(out)]
    assert main([*args, "--run-id", "run-9"]) == 1
    assert f"known runs: {RUN}" in capsys.readouterr().err
    missing = ["statement", "--factory", "f1", "--ledger", str(tmp_path / "x.db"), "--out", "o"]
    assert main(missing) == 2
    assert str(tmp_path / "x.db") in capsys.readouterr().err


def test_cli_statement_of_one_run_among_several(recorded, tmp_path: Path) -> None:
    path, ledger, _ = recorded
    play(ledger, "run-2", [({"f1": 1.0, "f4": 1.0}, {})])
    out = tmp_path / "statements"
    args = ["statement", "--factory", "f1", "--ledger", str(path), "--out", str(out)]
    assert main(args) == 0
    doc = json.loads((out / "f1-statement.json").read_text())
    assert doc["run_ids"] == [RUN, "run-2"] and len(doc["entries"]) == 4
    assert doc["totals"]["payout"] == sum(e.payout for e in ledger.entries(factory_id="f1"))
    assert main([*args, "--run-id", "run-2"]) == 0
    doc = json.loads((out / "f1-statement.json").read_text())
    assert doc["run_ids"] == ["run-2"] and [e["round"] for e in doc["entries"]] == [1]
    assert doc["totals"]["payout"] == 125  # half of round 1's installment of 250


def test_cli_statement_of_a_tampered_ledger_is_marked(recorded, tmp_path: Path, capsys) -> None:
    path, _, _ = recorded
    tamper(path, "DELETE FROM reward_ledger WHERE seq = 3")
    out = tmp_path / "statements"
    assert main(["statement", "--factory", "f2", "--ledger", str(path), "--out", str(out)]) == 1
    assert "TAMPERED: entry seq=3 deleted" in capsys.readouterr().err
    doc = json.loads((out / "f2-statement.json").read_text())
    assert doc["verified"] is False
    assert doc["verification"]["kind"] == "deleted" and doc["verification"]["seq"] == 3
    assert (out / "f2-statement.csv").exists() and (out / "f2-statement.png").exists()
    with (out / "f2-statement.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(r["ledger_verified"].startswith("false") for r in rows)
    assert statement_title(doc).startswith("LEDGER DOES NOT VERIFY")


def test_statement_states_share_epsilon_left_run_and_date(recorded) -> None:
    path, _, book = recorded
    entries, verification = audit_ledger(path)
    context = {
        "currency": "CHF",
        "run_name": "molding-fedavg",
        "date": "2026-11-30",
        "epsilon_budget": 8.0,
        "privacy_unit": "shot",
        "factory_epsilon": {"f2": 1.25},
    }
    doc = factory_statement(entries, "f2", verification, run_id=RUN, context=context)
    totals = doc["totals"]
    positive = sum(max(v, 0.0) for v in book.cumulative_contribution.values())
    assert totals["contribution_share"] == pytest.approx(0.75 / positive)
    assert totals["payout_share"] == pytest.approx(
        book.cumulative_payout["f2"] / sum(book.cumulative_payout.values())
    )
    assert totals["epsilon_spent"] == 1.25 and totals["epsilon_left"] == 6.75
    title = statement_title(doc)
    assert title.startswith(
        f"Reward statement for f2: CHF {book.cumulative_payout['f2'] / 100:,.2f}"
    )
    assert "run molding-fedavg (2026-11-30); 3 rounds scored\n" in title
    assert "epsilon 1.250 per shot, 6.750 left of 8" in title


def test_statement_counts_epsilon_left_against_the_factorys_own_budget(recorded) -> None:
    path, _, _ = recorded
    entries, verification = audit_ledger(path)
    context = {
        "epsilon_budget": 8.0,
        "privacy_unit": "window",
        "factory_epsilon": {"f2": 1.25},
        "factory_privacy": {"f2": {"epsilon_budget": 3.0, "unit": "machine"}},
    }
    doc = factory_statement(entries, "f2", verification, run_id=RUN, context=context)
    totals = doc["totals"]
    assert totals["epsilon_budget"] == 3.0 and totals["epsilon_left"] == 1.75
    assert totals["privacy_unit"] == "machine"
    assert "epsilon 1.250 per machine, 1.750 left of 3" in statement_title(doc)


def test_verify_accepts_a_head_prefix_and_refuses_a_short_one(recorded, capsys) -> None:
    path, ledger, _ = recorded
    head = ledger.head()
    for given in (head, head[:16], head[:40].upper()):
        assert main(["ledger", "verify", str(path), "--head", given]) == 0, given
    capsys.readouterr()
    assert main(["ledger", "verify", str(path), "--head", head[:15]]) == 2
    assert "too short" in capsys.readouterr().err
    assert main(["ledger", "verify", str(path), "--head", "z" * 20]) == 2
    assert "not a hex hash" in capsys.readouterr().err
    earlier = ledger.entries()[-2].hash
    assert main(["ledger", "verify", str(path), "--head", earlier[:16]]) == 1
    assert f"is entry seq={len(ledger.entries()) - 1}" in capsys.readouterr().err


def test_statement_file_names_stay_inside_the_output_folder() -> None:
    assert statement_stem("f1") == "f1-statement"
    assert statement_stem("../../outside/f1") == "_.._outside_f1-statement"
    assert "/" not in statement_stem("a/b") and "\\" not in statement_stem("a\\b")


def test_a_statement_says_why_a_factory_was_paid_less(tmp_path: Path) -> None:
    from fl_server.rewards.allocation import RewardPolicy
    from fl_server.rewards.ledger import round_rows
    from fl_server.rewards.statements import csv_rows

    ledger = RewardLedger(tmp_path / "l.db")
    book = RewardBook(RewardPolicy(1000, "per_round"))
    for r, withheld, groups in ((1, ("f3",), ()), (2, ("f3",), (("f1", "f3"),))):
        scores = {"f1": 1.0, "f2": 1.0, "f3": 1.0}
        payouts = book.settle(r, scores, withheld)
        ledger.record_round(RUN, r, round_rows(book, scores, payouts, None, withheld, groups))
    entries, verification = audit_ledger(ledger.path)
    doc = factory_statement(entries, "f3", verification, run_id=RUN)
    assert [e["withheld"] for e in doc["entries"]] == [True, True]
    assert doc["totals"]["payout"] == 0
    assert len(doc["paid_less"]) == 2
    assert doc["paid_less"][0].startswith("Pay withheld in 2 round(s) (rounds 1, 2)")
    assert "f1, f3 were copies of each other" in doc["paid_less"][1]
    rows = csv_rows(doc)
    assert [(r["withheld"], r["duplicate_group"]) for r in rows] == [
        ("true", ""),
        ("true", "f1,f3"),
    ]
    title = statement_title(doc)
    assert "paid less: withheld in 2 round(s)" in title
    assert "paid less: scored as one factory with its copies (f1,f3)" in title
    clean = factory_statement(entries, "f2", verification, run_id=RUN)
    assert clean["paid_less"] == [] and "paid less" not in statement_title(clean)


def test_statements_drawn_by_workers_match_those_drawn_here(recorded, tmp_path, monkeypatch):
    """Many statements are drawn by worker processes: the same files, byte for byte, as one
    after another here, and the same paths in the same order; a failing worker is reported."""
    path, _, _ = recorded
    entries, verification = audit_ledger(path)
    docs = [factory_statement(entries, f, verification) for f in ("f1", "f2", "f3")]
    here = statements.export_statements(docs, tmp_path / "here", workers=1)
    monkeypatch.setattr(statements, "PARALLEL_FROM", 2)
    drawn = statements.export_statements(docs, tmp_path / "workers", workers=2)
    assert [p.relative_to(tmp_path / "workers") for p in drawn] == [
        p.relative_to(tmp_path / "here") for p in here
    ]
    stem = statement_stem("f1")
    assert [p.name for p in drawn[:3]] == [f"{stem}.{k}" for k in ("csv", "json", "png")]
    for a, b in zip(here, drawn, strict=True):
        assert a.read_bytes() == b.read_bytes(), b.name
    bad = [dict(docs[0], entries=None), docs[1]]  # a worker cannot draw this one
    with pytest.raises(RuntimeError, match="drawing the statements under .* failed: exit 1"):
        statements.export_statements(bad, tmp_path / "bad", workers=2)
