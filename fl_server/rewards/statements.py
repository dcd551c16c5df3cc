"""Reward statements: what a factory was paid and why, from the ledger, as CSV, JSON and PNG.

A statement (:func:`factory_statement`) lists one factory's ledger entries with per-run and
overall totals and quotes the chain's head and its verification, so the factory can later
check that the ledger still ends where it did. :func:`export_statement` writes it as CSV (one
row per entry), JSON (everything) and a chart; each file is written atomically. Plotting
imports matplotlib lazily.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fl_common.storage import atomic_open, atomic_write_json
from fl_server.rewards.ledger import LedgerEntry, VerifyResult

STATEMENT_COLUMNS = (
    "run_id",
    "round",
    "seq",
    "contribution",
    "cumulative_contribution",
    "payout",
    "cumulative_payout",
    "epsilon",
    "prev_hash",
    "hash",
)


def known_factories(entries: Sequence[LedgerEntry], run_id: str | None = None) -> list[str]:
    """Sorted ids of the factories with entries (in ``run_id`` if given)."""
    return sorted({e.factory_id for e in entries if run_id is None or e.run_id == run_id})


def _json_number(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else repr(value)


def factory_statement(
    entries: Sequence[LedgerEntry],
    factory_id: str,
    verification: VerifyResult,
    run_id: str | None = None,
) -> dict[str, Any]:
    """A factory's statement: its entries, per-run and overall totals, and the chain's state.

    ``entries`` is the whole ledger (or at least the factory's part of it) in ``seq`` order;
    ``verification`` the result of verifying the whole chain, whose head the statement quotes.

    Raises:
        ValueError: ``factory_id`` has no entries (in ``run_id``); the message lists the known
            factory ids (or run ids, when the run is unknown).
    """
    if run_id is not None and all(e.run_id != run_id for e in entries):
        runs = sorted({e.run_id for e in entries})
        raise ValueError(f"unknown run {run_id!r}; known runs: {', '.join(runs) or '(none)'}")
    mine = [
        e for e in entries if e.factory_id == factory_id and (run_id is None or e.run_id == run_id)
    ]
    if not mine:
        known = known_factories(entries, run_id)
        raise ValueError(
            f"unknown factory {factory_id!r}; known factories: {', '.join(known) or '(none)'}"
        )
    per_run: dict[str, dict[str, Any]] = {}
    for entry in mine:
        run = per_run.setdefault(entry.run_id, {"rounds": 0, "contribution": [], "payout": 0})
        run["rounds"] += 1
        run["contribution"].append(entry.score)
        run["payout"] += entry.payout
        run["cumulative_contribution"] = entry.cumulative_score
        run["cumulative_payout"] = entry.cumulative_payout
        if entry.epsilon is not None:
            run["epsilon"] = _json_number(entry.epsilon)
        run.setdefault("epsilon", None)
    for run in per_run.values():
        run["contribution"] = math.fsum(run["contribution"])
    return {
        "factory_id": factory_id,
        "run_ids": list(per_run),
        "ledger_head": verification.head,
        "verified": verification.ok,
        "verification": verification.to_dict(),
        "totals": {
            "entries": len(mine),
            "contribution": math.fsum(e.score for e in mine),
            "payout": sum(e.payout for e in mine),
            "per_run": per_run,
        },
        "entries": [
            {
                "run_id": e.run_id,
                "round": e.round,
                "seq": e.seq,
                "contribution": e.score,
                "cumulative_contribution": e.cumulative_score,
                "payout": e.payout,
                "cumulative_payout": e.cumulative_payout,
                "epsilon": _json_number(e.epsilon),
                "prev_hash": e.prev_hash,
                "hash": e.hash,
            }
            for e in mine
        ],
    }


def statement_stem(factory_id: str) -> str:
    """File-name stem for a factory's statement: ``<factory>-statement``, made path-safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", factory_id).lstrip(".") or "factory"
    return f"{safe}-statement"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def export_statement(statement: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``statement`` as CSV (one row per entry), JSON (everything) and a PNG chart.

    The chart shows per-round contribution bars and the running total paid. It is drawn on a
    :class:`~matplotlib.figure.Figure` with the Agg canvas, so no GUI backend is touched.

    Returns:
        ``{"csv": path, "json": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = statement_stem(statement["factory_id"])
    paths = {kind: out / f"{stem}.{kind}" for kind in ("csv", "json", "png")}
    entries = statement["entries"]

    with atomic_open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STATEMENT_COLUMNS)
        writer.writeheader()
        for entry in entries:
            writer.writerow({key: _csv_value(entry[key]) for key in STATEMENT_COLUMNS})

    atomic_write_json(paths["json"], statement, indent=2, allow_nan=False, trailing_newline=True)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    several_runs = len(statement["run_ids"]) > 1
    labels = [f"{e['run_id']}:{e['round']}" if several_runs else str(e["round"]) for e in entries]
    positions = list(range(len(entries)))
    running, total = [], 0
    for entry in entries:
        total += entry["payout"]
        running.append(total)
    figure = Figure(figsize=(max(6.0, 0.35 * len(entries) + 2.0), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    bars = figure.add_subplot()
    bars.bar(positions, [e["contribution"] for e in entries], color="tab:blue", alpha=0.7)
    bars.axhline(0.0, color="grey", linewidth=0.8)
    bars.set_xticks(positions, labels, rotation=90 if several_runs else 0, fontsize=8)
    bars.set_xlabel("run:round" if several_runs else "round")
    bars.set_ylabel("contribution (per round)", color="tab:blue")
    line = bars.twinx()
    line.plot(positions, running, color="tab:orange", marker="o", markersize=3)
    line.set_ylabel("cumulative payout (minor units)", color="tab:orange")
    line.set_ylim(bottom=0)
    verified = "" if statement["verified"] else "  [ledger NOT verified]"
    bars.set_title(f"Reward statement: {statement['factory_id']}{verified}")
    with atomic_open(paths["png"], "wb") as handle:
        figure.savefig(handle, format="png", dpi=100)
    return paths
