"""Reward statements: what a factory was paid and why, from the ledger, as CSV, JSON and PNG.

A statement (:func:`factory_statement`) lists one factory's ledger entries with per-run and
overall totals, its share of the contributions and of the payouts, and quotes the chain's head
and its verification, so the factory can later check that the ledger still ends where it did.
:func:`export_statement` writes it as CSV (one row per entry, amounts in the currency's major
units with a ``currency`` column), JSON (everything) and a chart a firm's manager reads without
help; each file is written atomically. A statement from a ledger that does not verify says so
in every format: the JSON's ``verified``, the CSV's ``ledger_verified`` column and the chart's
title. Plotting imports matplotlib lazily. :func:`export_statements` writes a run's statements,
drawing them in worker processes when there are many.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_common.storage import atomic_open, atomic_write_json
from fl_server.report import epsilon_left
from fl_server.rewards.ledger import LedgerEntry, VerifyResult

if TYPE_CHECKING:  # matplotlib is imported only when a chart is drawn
    from collections.abc import Callable

    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.backend_bases import RendererBase
    from matplotlib.figure import Figure
    from matplotlib.text import Text

STATEMENT_COLUMNS = (
    "run_id",
    "round",
    "seq",
    "contribution",
    "cumulative_contribution",
    "currency",
    "payout",
    "cumulative_payout",
    "epsilon",
    "ledger_verified",
    "prev_hash",
    "hash",
    "withheld",
    "duplicate_group",
)
#: The currency of a statement whose ledger run did not say (the ``rewards`` config default).
DEFAULT_CURRENCY = "EUR"
#: Minor units (cents) per major unit of the currency.
MINOR_PER_MAJOR = 100


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
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A factory's statement: its entries, per-run and overall totals, and the chain's state.

    ``entries`` is the whole ledger (or at least the factory's part of it) in ``seq`` order;
    ``verification`` the result of verifying the whole chain, whose head the statement quotes.
    ``context`` adds what the ledger does not hold: ``currency`` (default EUR), ``run_name``,
    ``date``, ``privacy_unit``, ``epsilon_budget`` and ``factory_epsilon`` (each factory's
    final spend), and ``factory_privacy`` (what each factory's replies stated: its own
    ``epsilon_budget`` and ``unit``, which take precedence over the federation's); the
    statement then states the epsilon left of the factory's budget.

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
    ctx = dict(context or {})
    currency = str(ctx.get("currency") or DEFAULT_CURRENCY)
    # Shares among every factory of the same run(s): the last cumulative score and payout
    # each factory reached in each run.
    last: dict[tuple[str, str], LedgerEntry] = {}
    for e in entries:
        if e.run_id in per_run:
            last[(e.run_id, e.factory_id)] = e
    positive = math.fsum(max(e.cumulative_score, 0.0) for e in last.values())
    mine_positive = math.fsum(
        max(e.cumulative_score, 0.0) for (_, f), e in last.items() if f == factory_id
    )
    pool = sum(e.cumulative_payout for e in last.values())
    payout = sum(e.payout for e in mine)
    spent = (ctx.get("factory_epsilon") or {}).get(factory_id)
    if spent is None:
        spent = next((e.epsilon for e in reversed(mine) if e.epsilon is not None), None)
    own = (ctx.get("factory_privacy") or {}).get(factory_id) or {}
    budget = own.get("epsilon_budget", ctx.get("epsilon_budget"))
    doc: dict[str, Any] = {
        "factory_id": factory_id,
        "run_ids": list(per_run),
        "run_name": ctx.get("run_name"),
        "date": ctx.get("date"),
        "currency": currency,
        "ledger_head": verification.head,
        "verified": verification.ok,
        "verification": verification.to_dict(),
        "totals": {
            "entries": len(mine),
            "rounds": len(mine),
            "contribution": math.fsum(e.score for e in mine),
            "contribution_share": mine_positive / positive if positive > 0 else 0.0,
            "payout": payout,
            "payout_major": round(payout / MINOR_PER_MAJOR, 2),
            "payout_share": payout / pool if pool > 0 else 0.0,
            "epsilon_spent": _json_number(spent),
            "epsilon_budget": budget,
            "epsilon_left": epsilon_left(spent, budget),
            "privacy_unit": own.get("unit", ctx.get("privacy_unit")),
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
                "withheld": e.withheld,
                "duplicate_group": e.duplicate_group,
            }
            for e in mine
        ],
    }
    doc["paid_less"] = paid_less_notes(doc["entries"])
    return doc


def paid_less_notes(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Why a factory was paid less than its scores alone would give, one sentence per reason.

    ``entries`` are the statement's entries (with ``round``, ``withheld`` and
    ``duplicate_group``); empty when neither guard touched the factory.
    """
    notes = []
    held = [e["round"] for e in entries if e.get("withheld")]
    if held:
        notes.append(
            f"Pay withheld in {len(held)} round(s) ({_rounds_text(held)}): over its rounds so "
            "far, this factory's updates could not be told from random noise (the noise test "
            "of the contribution guards), so it took no part in those rounds' split."
        )
    groups: dict[str, list[int]] = {}
    for e in entries:
        if e.get("duplicate_group"):
            groups.setdefault(e["duplicate_group"], []).append(e["round"])
    for group, rounds in groups.items():
        notes.append(
            f"In {len(rounds)} round(s) ({_rounds_text(rounds)}) "
            f"{group.replace(',', ', ')} were copies of each other (the same records, by "
            "their record sketches, or updates too alike for independent training): the group "
            "was scored as one factory and its credit split equally among its members."
        )
    return notes


def _rounds_text(rounds: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in rounds[:8])
    return f"rounds {shown}" + (f" and {len(rounds) - 8} more" if len(rounds) > 8 else "")


def statement_stem(factory_id: str) -> str:
    """File-name stem for a factory's statement: ``<factory>-statement``, made path-safe."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", factory_id).lstrip(".") or "factory"
    return f"{safe}-statement"


def _major(minor: int) -> str:
    """Minor units as a major-unit amount with two decimals (``64453`` -> ``"644.53"``)."""
    return f"{minor / MINOR_PER_MAJOR:.2f}"


def _rounded(value: Any, digits: int = 6) -> Any:
    """A float to ``digits`` significant digits for people (the JSON keeps full precision)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else repr(value)
    return value


def csv_rows(statement: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The statement's entries as CSV rows (:data:`STATEMENT_COLUMNS`), rounded for people."""
    verified = "true" if statement["verified"] else "false (the ledger does not verify)"
    return [
        {
            "run_id": e["run_id"],
            "round": e["round"],
            "seq": e["seq"],
            "contribution": _rounded(e["contribution"]),
            "cumulative_contribution": _rounded(e["cumulative_contribution"]),
            "currency": statement.get("currency", DEFAULT_CURRENCY),
            "payout": _major(e["payout"]),
            "cumulative_payout": _major(e["cumulative_payout"]),
            "epsilon": _rounded(e["epsilon"], 4),
            "ledger_verified": verified,
            "prev_hash": e["prev_hash"],
            "hash": e["hash"],
            "withheld": "true" if e.get("withheld") else "false",
            "duplicate_group": e.get("duplicate_group", ""),
        }
        for e in statement["entries"]
    ]


def statement_title(statement: Mapping[str, Any]) -> str:
    """The chart's title: who, how much, which run and date, share, privacy, why it was paid
    less (the guards, one short line each); and a warning first when the ledger does not
    verify."""
    currency = statement.get("currency", DEFAULT_CURRENCY)
    totals = statement["totals"]
    verified = "" if statement["verified"] else "LEDGER DOES NOT VERIFY, do not rely on it: "
    run = statement.get("run_name") or ", ".join(statement["run_ids"])
    date = f" ({statement['date']})" if statement.get("date") else ""
    eps = totals.get("epsilon_spent")
    privacy = ""
    if isinstance(eps, float | int):
        unit = f" per {totals['privacy_unit']}" if totals.get("privacy_unit") else ""
        privacy = f"\nprivacy spent: epsilon {eps:.3f}{unit}"
        if totals.get("epsilon_left") is not None:
            privacy += f", {totals['epsilon_left']:.3f} left of {totals['epsilon_budget']:g}"
    return (
        f"{verified}Reward statement for {statement['factory_id']}: {currency} "
        f"{totals['payout'] / MINOR_PER_MAJOR:,.2f} paid\n"
        f"run {run}{date}; {totals['rounds']} rounds scored\n"
        f"{100 * totals.get('contribution_share', 0.0):.1f} % of the contributions, "
        f"{100 * totals.get('payout_share', 0.0):.1f} % of the payouts{privacy}"
        + "".join(f"\n{line}" for line in _short_notes(statement))
    )


def _short_notes(statement: Mapping[str, Any]) -> list[str]:
    """One chart line per guard that touched the factory (the JSON has the full sentences)."""
    entries = statement.get("entries") or []
    out = []
    held = sum(1 for e in entries if e.get("withheld"))
    if held:
        out.append(
            f"paid less: withheld in {held} round(s), updates not distinguishable from noise"
        )
    groups = sorted({e["duplicate_group"] for e in entries if e.get("duplicate_group")})
    for group in groups:
        out.append(f"paid less: scored as one factory with its copies ({group})")
    return out


def export_statement(statement: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``statement`` as CSV (one row per entry), JSON (everything) and a PNG chart.

    The chart (:func:`_chart`) shows per-round contribution bars and the running total paid.

    Returns:
        ``{"csv": path, "json": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = statement_stem(statement["factory_id"])
    paths = {kind: out / f"{stem}.{kind}" for kind in ("csv", "json", "png")}

    with atomic_open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=STATEMENT_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(statement))

    atomic_write_json(paths["json"], statement, indent=2, allow_nan=False, trailing_newline=True)

    with atomic_open(paths["png"], "wb") as handle:
        _chart(statement).savefig(handle, format="png", dpi=CHART_DPI)
    return paths


#: From this many statements on, :func:`export_statements` draws them in worker processes.
PARALLEL_FROM = 16


def export_statements(
    statements: Sequence[Mapping[str, Any]], out_dir: str | Path, workers: int | None = None
) -> list[Path]:
    """:func:`export_statement` for each of ``statements``; the written paths, in order.

    Drawing a chart costs about a fifth of a second on one core, almost all of it matplotlib's
    text rendering, so a 100-factory run spent 23 s on its statements after the last round.
    From :data:`PARALLEL_FROM` statements on they are drawn by ``workers`` processes (default:
    one per CPU, at most 8), each a fresh ``python -m fl_server.rewards.statements`` given its
    share as a JSON file: unlike a multiprocessing pool it re-imports nothing of the caller's
    main module and inherits none of the server's threads. A worker's start-up (about 1.4 s,
    importing matplotlib) is why fewer statements are drawn here, one after another.

    Raises:
        RuntimeError: a worker failed; the message holds its exit code and its last error line.
    """
    count = len(statements)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers < 2 or count < PARALLEL_FROM:
        return [p for doc in statements for p in export_statement(doc, out_dir).values()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The workers import this very copy of the package (a Flower app runs from its own).
    paths = [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    with tempfile.TemporaryDirectory(prefix="statements-") as tmp:
        procs = []
        for k in range(min(workers, count)):
            share = Path(tmp) / f"share-{k}.json"
            share.write_text(json.dumps(list(statements[k::workers]), allow_nan=False))
            command = [sys.executable, "-m", "fl_server.rewards.statements", str(share), str(out)]
            procs.append(
                subprocess.Popen(
                    command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            )
        failures = []
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode != 0:
                lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
                failures.append(f"exit {proc.returncode}: {lines[-1]}")
    if failures:
        raise RuntimeError(f"drawing the statements under {out} failed: {'; '.join(failures)}")
    return [
        out / f"{statement_stem(doc['factory_id'])}.{kind}"
        for doc in statements
        for kind in ("csv", "json", "png")
    ]


#: Resolution of the statement chart (pixels per inch).
CHART_DPI = 100
#: Space around the chart's outermost texts, in points.
_CHART_PAD = 6.0


def _chart(statement: Mapping[str, Any]) -> Figure:
    """The statement's chart: contribution bars per round, the running total paid, the title.

    Drawn on a :class:`~matplotlib.figure.Figure` with the Agg canvas (no GUI backend). The
    margins are measured from the texts themselves (title, axis labels, tick labels) before
    the one and only draw, instead of by a layout engine: a layout engine draws the figure
    twice and searches every artist's extent, which made a 100-factory run spend a minute on
    its statements. The title stays where the axes' title goes (``y=1.0``), without the
    per-draw repositioning that costs as much as the draw.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = statement["entries"]
    currency = statement.get("currency", DEFAULT_CURRENCY)
    several_runs = len(statement["run_ids"]) > 1
    labels = [f"{e['run_id']}:{e['round']}" if several_runs else str(e["round"]) for e in entries]
    positions = list(range(len(entries)))
    running, total = [], 0
    for entry in entries:
        total += entry["payout"]
        running.append(total / MINOR_PER_MAJOR)
    figure = Figure(figsize=(max(8.0, 0.35 * len(entries) + 2.0), 5.5), dpi=CHART_DPI)
    canvas = FigureCanvasAgg(figure)
    bars = figure.add_subplot()
    bars.bar(positions, [e["contribution"] for e in entries], color="tab:blue", alpha=0.7)
    bars.axhline(0.0, color="grey", linewidth=0.8)
    bars.set_xticks(positions, labels, rotation=90 if several_runs else 0, fontsize=8)
    bars.set_xlabel("run:round" if several_runs else "training round")
    bars.set_ylabel("contribution to the model this round (score)", color="tab:blue")
    line = bars.twinx()
    line.plot(positions, running, color="tab:orange", marker="o", markersize=3)
    line.set_ylabel(f"paid so far ({currency})", color="tab:orange")
    line.set_ylim(0, max(running, default=0.0) * 1.15 or 1.0)
    if running:
        line.annotate(f"{currency} {running[-1]:,.2f}", (positions[-1], running[-1]),
                      textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=9,
                      color="tab:orange")  # fmt: skip
    bars.set_title(
        statement_title(statement),
        fontsize=10,
        color="black" if statement["verified"] else "tab:red",
        y=1.0,
    )
    _fit_margins(figure, bars, line, canvas.get_renderer())
    return figure


def _fit_margins(figure: Figure, bars: Axes, line: Axes, renderer: RendererBase) -> None:
    """Place the axes so that the title, labels and tick labels just fit inside the figure."""
    points = figure.dpi / 72.0  # pixels per point

    def height(texts: Sequence[Text]) -> float:
        return max((t.get_window_extent(renderer).height for t in texts if t.get_text()), default=0)

    def width(texts: Sequence[Text]) -> float:
        return max((t.get_window_extent(renderer).width for t in texts if t.get_text()), default=0)

    def side(axis: Axis, ticks: Sequence[Text], extent: Callable[[Sequence[Text]], float]) -> float:
        tick = axis.get_major_ticks()[0]
        return (
            _CHART_PAD * points
            + extent([axis.label])
            + axis.labelpad * points
            + extent(ticks)
            + (tick.get_tick_padding() + tick.get_pad()) * points
        )

    fig_w, fig_h = figure.bbox.width, figure.bbox.height
    left = side(bars.yaxis, bars.get_yticklabels(), width)
    right = side(line.yaxis, line.get_yticklabels(), width)
    bottom = side(bars.xaxis, bars.get_xticklabels(), height)
    top = (_CHART_PAD + 6.0) * points + height([bars.title])
    figure.subplots_adjust(
        left=left / fig_w, right=1 - right / fig_w, bottom=bottom / fig_h, top=1 - top / fig_h
    )


if __name__ == "__main__":  # a worker of export_statements: <share.json> <out_dir>
    for _doc in json.loads(Path(sys.argv[1]).read_text()):
        export_statement(_doc, sys.argv[2])
