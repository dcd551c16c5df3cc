"""The operator's view of a run: its description (markdown) and its plots, from the summary.

Pure functions from a run's summary (what :func:`fl_server.server_app.finish` writes to
``summary.json``) to text and matplotlib figures, so they are tested without MLflow and the same
code draws a 4-factory run and a synthetic 100-factory one. The summary keys read here:

* ``task``, ``strategy``, ``run_name``, ``main_metric``, ``rounds`` (central validation per
  round), ``test`` (the final model's test scores), ``rounds_run``;
* ``privacy``: ``enabled``, ``epsilon`` (the budget), ``delta``, ``unit``, ``min_run_epsilon``;
* ``reward_currency``, ``payout_cumulative`` (minor units), ``contribution_cumulative``;
* ``factory_epsilon`` (each factory's last reported cumulative spend), ``failures``;
* ``factory_privacy`` (optional): per factory the facts its replies carried, ``unit``,
  ``choice`` (``declared`` or ``coarser``) and ``epsilon_budget`` (its own budget, which its
  epsilon left is counted against instead of the federation's);
* ``factory_rounds``: one entry per training round, ``{"round", "status": {factory: status},
  "epsilon": {factory: spent}, "contribution": {factory: score}}``.

Missing keys read as empty, so a run with scoring or DP off still gets its description.
The plots use matplotlib's object API on the Agg canvas (no GUI backend, no global state).

One job, the run's report from its summary; its length is the five plots and the description.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The plots logged under ``plots/``, file stem -> what it answers.
PLOTS = {
    "global_metric": "Is the shared model getting better, and how does it do on the test set?",
    "contribution_share": "Who contributed how much of the model's improvement?",
    "payouts": "Who was paid how much, in the run's currency?",
    "epsilon": "How much privacy budget has each factory spent, and who is near its budget?",
    "outcomes": "How many factories were accepted, rejected, declined or failed each round?",
}
#: Factories drawn one by one before the rest are summed up as "others".
TOP_N = 12
#: Outcome statuses in plot order; data-error and error both count as failed.
OUTCOMES = ("accepted", "rejected", "declined", "failed")
_FAILED = {"data-error", "error", "failed"}


def money(minor: float, currency: str, digits: int = 2) -> str:
    """An amount of minor units (cents) as ``"EUR 644.53"``, with thousands separators."""
    return f"{currency} {minor / 10**digits:,.{digits}f}"


def outcome_of(status: str) -> str:
    """A reply status as one of :data:`OUTCOMES` (``absent`` stays ``absent``)."""
    return "failed" if status in _FAILED else status


@dataclass(frozen=True)
class FactoryRow:
    """One factory's line of the run description."""

    factory_id: str
    share: float | None  # fraction of the positive cumulative contribution (the payout key)
    contribution: float | None
    payout_minor: int | None
    epsilon_spent: float | None
    epsilon_left: float | None
    below_minimum: bool  # less left than privacy.min_run_epsilon: it declines the next run
    rounds: int  # rounds whose update was accepted
    problems: tuple[str, ...]  # "round 3 declined: <reason>"
    privacy_unit: str | None = None  # the unit its epsilon counts, as the factory reported it
    epsilon_budget: float | None = None  # the budget its epsilon left is counted against
    own_budget: bool = False  # the factory reported its own budget (else: the federation's)


def epsilon_left(spent: float | None, budget: float | None) -> float | None:
    """The epsilon a factory has left of ``budget`` after ``spent``, never below 0.

    ``None`` when either is unknown. The operator's metrics (:mod:`fl_server.recorder`), the
    run description and the statements all state "epsilon left" through this one rule, against
    the budget the factory reported as its own where it did, else the federation's.
    """
    if spent is None or budget is None:
        return None
    return max(float(budget) - float(spent), 0.0)


def factory_rows(summary: Mapping[str, Any]) -> list[FactoryRow]:
    """Every factory of the run, sorted by payout, then share, then id."""
    privacy = summary.get("privacy") or {}
    budget = privacy.get("epsilon") if privacy.get("enabled") else None
    minimum = float(privacy.get("min_run_epsilon") or 0.0)
    contrib = summary.get("contribution_cumulative") or {}
    paid = summary.get("payout_cumulative") or {}
    spent = summary.get("factory_epsilon") or {}
    facts = summary.get("factory_privacy") or {}
    per_round = summary.get("factory_rounds") or []
    failures = summary.get("failures") or []
    ids = set(contrib) | set(paid) | set(spent) | {f["factory"] for f in failures}
    for r in per_round:
        ids |= set(r.get("status") or {})
    positive = math.fsum(max(float(v), 0.0) for v in contrib.values())
    rows = []
    for fid in ids:
        eps = spent.get(fid)
        own = (facts.get(fid) or {}).get("epsilon_budget")
        limit = own if own is not None and budget is not None else budget
        left = epsilon_left(eps, limit)
        c = contrib.get(fid)
        rows.append(
            FactoryRow(
                factory_id=fid,
                share=(max(float(c), 0.0) / positive if positive > 0 else 0.0)
                if c is not None
                else None,
                contribution=None if c is None else float(c),
                payout_minor=None if fid not in paid else int(paid[fid]),
                epsilon_spent=None if eps is None else float(eps),
                epsilon_left=left,
                below_minimum=left is not None and left < minimum,
                rounds=sum(1 for r in per_round if (r.get("status") or {}).get(fid) == "accepted"),
                problems=tuple(
                    f"round {f['round']} {f['status']}: {f['reason']}"
                    for f in failures
                    if f["factory"] == fid
                ),
                privacy_unit=(facts.get(fid) or {}).get("unit") or privacy.get("unit"),
                epsilon_budget=None if limit is None else float(limit),
                own_budget=own is not None and budget is not None,
            )
        )
    return sorted(rows, key=lambda r: (-(r.payout_minor or 0), -(r.share or 0.0), r.factory_id))


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def outcome_counts(summary: Mapping[str, Any]) -> list[dict[str, int]]:
    """Per training round: ``{"round", "accepted", "rejected", "declined", "failed"}``."""
    out = []
    for r in summary.get("factory_rounds") or []:
        counts = dict.fromkeys(OUTCOMES, 0)
        for status in (r.get("status") or {}).values():
            kind = outcome_of(status)
            if kind in counts:
                counts[kind] += 1
        out.append({"round": int(r["round"]), **counts})
    return out


def guard_lines(summary: Mapping[str, Any]) -> list[str]:
    """Why factories were paid less (the contribution guards), as description lines.

    From the per-round records: the factories withheld after the last scored round (their
    updates cannot be told from noise), every duplicate group scored as one factory, and every
    pair whose updates looked like copies but whose record sketches share no records (paid
    apart). Empty when the guards found nothing or were off.
    """
    scored = [r for r in summary.get("factory_rounds") or [] if "withheld" in r]
    if not scored:
        return []
    held = list(scored[-1].get("withheld") or [])
    groups = sorted({tuple(g) for r in scored for g in r.get("duplicate_groups") or []})
    by_records = {tuple(g) for r in scored for g in r.get("record_groups") or []}
    lines = []
    if held:
        names = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10 else "")
        lines.append(
            f"**Pay withheld** from {names}: over their rounds their updates could not "
            "be told from random noise (noise test of `contribution.guards`)."
        )
    for group in groups:
        why = (
            "train on the same records (their record sketches overlap)"
            if group in by_records
            else "sent copies of each other's updates"
        )
        lines.append(
            f"**Scored as one factory**: {', '.join(group)} {why}; the group's credit is split "
            "equally."
        )
    cleared: dict[tuple[str, ...], int] = {}
    for r in scored:
        for pair in r.get("cleared_pairs") or []:
            key = tuple(sorted(pair))
            cleared[key] = cleared.get(key, 0) + 1
    for pair, rounds in sorted(cleared.items()):
        lines.append(
            f"**Paid apart**: {' and '.join(pair)} sent updates as alike as copies' in {rounds} "
            f"round{'s' if rounds != 1 else ''}, but their record sketches share no records "
            "(alike data, not a copy)."
        )
    return [*lines, ""] if lines else []


def training_line(training: Mapping[str, Any] | None) -> list[str]:
    """What the factories trained with, naming the recipe when the DP one replaced the plain
    settings (the params list both ``task.train.batch_size`` and ``dp_batch_size``)."""
    if not training:
        return []
    recipe = (
        "the task's DP-SGD recipe, `task.train.dp_batch_size` / `dp_lr`"
        if training.get("recipe") == "dp"
        else "`task.train.batch_size` / `lr`"
    )
    epochs = int(training.get("local_epochs", 1))
    return [
        f"**Factories trained** with batch {training['batch_size']} at learning rate "
        f"{training['lr']:g} ({recipe}), {epochs} local epoch{'s' if epochs != 1 else ''} a "
        "round.",
        "",
    ]


def run_description(
    summary: Mapping[str, Any], failure: str | None = None, max_factories: int = 50
) -> str:
    """The run's description (MLflow's ``mlflow.note.content``), as markdown.

    Leads with what an operator asks first: did it train and how good is it (one line), then
    who was paid what and who is out of privacy budget (the per-factory table, before
    anything else, since MLflow shows only the description's first lines until "Show more"),
    then the run's settings. ``failure`` says why a run that
    did not finish failed. Past ``max_factories`` rows the table stops and says how many more
    there are (``summary.json`` has them all).
    """
    metric = summary.get("main_metric", "metric")
    rounds = summary.get("rounds") or []
    counts = outcome_counts(summary)
    accepted = sum(c["accepted"] for c in counts)
    privacy = summary.get("privacy") or {}
    currency = str(summary.get("reward_currency") or "")
    rows = factory_rows(summary)
    lines: list[str] = []
    if failure:
        lines += [f"**FAILED: {failure}**", ""]
    if privacy.get("enabled"):
        unit = privacy.get("unit") or "record"
        dp = (
            f"DP-SGD, epsilon {privacy['epsilon']:g} per {unit}, delta {privacy['delta']:g}; "
            f"a factory with less than {privacy.get('min_run_epsilon', 0):g} left declines a run"
        )
    else:
        dp = "no sample-level DP"
    val = rounds[-1].get(metric) if rounds else None
    test = (summary.get("test") or {}).get(metric)
    paid = sum((summary.get("payout_cumulative") or {}).values())
    lines += [
        f"**final {metric}** validation {_num(val, '.4f')}, test {_num(test, '.4f')} · "
        f"**rounds** {len(counts)} · **accepted updates** {accepted}"
        + (f" · **paid** {money(paid, currency)}" if currency and paid else ""),
        "",
    ]
    budget = privacy.get("epsilon") if privacy.get("enabled") else None
    if rows:
        lines += [
            f"| factory | contribution share | payout | epsilon spent | epsilon left"
            f"{f' of {budget:g}' if budget is not None else ''} | rounds | rejected / failed |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
    declared = privacy.get("unit")
    for r in rows[:max_factories]:
        left = _num(r.epsilon_left, ".3f")
        if r.own_budget and r.epsilon_budget is not None and r.epsilon_budget != budget:
            left += f" of its own {r.epsilon_budget:g}"
        if r.below_minimum:
            left += " (declines next run)"
        spent = _num(r.epsilon_spent, ".3f")
        if r.epsilon_spent is not None and r.privacy_unit and r.privacy_unit != declared:
            spent += f" per {r.privacy_unit}"
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(r.factory_id),
                    "-" if r.share is None else f"{100 * r.share:.1f} %",
                    "-" if r.payout_minor is None else money(r.payout_minor, currency),
                    _cell(spent),
                    left,
                    str(r.rounds),
                    _cell("; ".join(r.problems)) or "none",
                ]
            )
            + " |"
        )
    if len(rows) > max_factories:
        lines.append(f"\n... and {len(rows) - max_factories} more factories (see summary.json)")
    low = [r.factory_id for r in rows if r.below_minimum]
    lines.append("")
    lines += guard_lines(summary)
    if low:
        lines += [
            f"**{len(low)} of {len(rows)} factories have less epsilon left than "
            f"privacy.min_run_epsilon ({privacy.get('min_run_epsilon', 0):g}): they will "
            "decline the next run.**",
            "",
        ]
    problems = sum(len(r.problems) for r in rows)
    lines += [
        f"**Task** {summary.get('task')} · **strategy** {summary.get('strategy')} · "
        f"**contribution** {summary.get('contribution', '-')} · **privacy** {dp}",
        "",
        *training_line(summary.get("training")),
        f"Rejected, declined or failed replies: {problems or 'none'} "
        "(details in `failures.json`). Plots in `plots/`, statements in "
        "`rewards/statements/`.",
    ]
    return "\n".join(lines)


# -- plots -------------------------------------------------------------------------------------
def _integer_rounds(ax: Any) -> None:
    """Round numbers on the x axis: whole numbers only."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def top_n(values: Mapping[str, float], n: int = TOP_N) -> list[tuple[str, float]]:
    """The ``n`` largest values by name, then one ``"others (k)"`` entry summing the rest."""
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) <= n + 1:
        return ranked
    rest = ranked[n:]
    return [*ranked[:n], (f"others ({len(rest)})", math.fsum(v for _, v in rest))]


def plot_global_metric(summary: Mapping[str, Any]) -> Figure:
    """The main metric on the validation set by round, with the final test score."""
    metric = summary.get("main_metric", "metric")
    rounds = summary.get("rounds") or []
    figure = _figure()
    ax = figure.add_subplot()
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r.get(metric) for r in rounds], marker="o", label=f"validation {metric}")
    test = (summary.get("test") or {}).get(metric)
    if test is not None and xs:
        ax.scatter([xs[-1]], [test], marker="*", s=200, color="tab:red", zorder=3,
                   label=f"test {metric} = {test:.4f}")  # fmt: skip
    ax.set_xlabel("round (0 = initial model)")
    _integer_rounds(ax)
    ax.set_ylabel(metric)
    ax.set_title(f"Global model: {metric} by round ({summary.get('task')})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return figure


def plot_contribution_share(summary: Mapping[str, Any]) -> Figure:
    """Each factory's share of the positive cumulative contribution (left) and its score per
    round as a heat map (right; the top factories by share, the rest summed as "others")."""
    rows = [r for r in factory_rows(summary) if r.share is not None]
    shares = {r.factory_id: 100 * r.share for r in rows}
    ranked = top_n(shares)
    figure = _figure(12.0, max(4.5, 0.32 * len(ranked) + 1.5))
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.4])
    labels = [k for k, _ in ranked][::-1]
    left.barh(labels, [v for _, v in ranked][::-1], color="tab:blue")
    for y, (_, v) in enumerate(reversed(ranked)):
        left.text(v, y, f" {v:.1f} %", va="center", fontsize=8)
    left.set_xlabel("share of the run's positive contribution (%)")
    left.set_title("Contribution share (cumulative)")
    left.set_xlim(0, max([v for _, v in ranked] + [1.0]) * 1.2)
    per_round = summary.get("factory_rounds") or []
    named = [k for k, _ in ranked if k in shares]
    others = [f for f in shares if f not in named]
    grid = []
    for fid in named:
        grid.append([float((r.get("contribution") or {}).get(fid, 0.0)) for r in per_round])
    if others:
        grid.append(  # the mean, so one row stays comparable with the named ones
            [
                math.fsum(float((r.get("contribution") or {}).get(f, 0.0)) for f in others)
                / len(others)
                for r in per_round
            ]
        )
    if grid and per_round:
        bound = max(abs(v) for row in grid for v in row) or 1.0
        image = right.imshow(grid, aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound,
                             interpolation="nearest")  # fmt: skip
        right.set_yticks(
            range(len(grid)), named + ([f"others ({len(others)}), mean"] if others else [])
        )
        rounds = [r["round"] for r in per_round]
        step = max(1, len(rounds) // 15)
        right.set_xticks(range(0, len(rounds), step), rounds[::step])
        right.set_xlabel("round")
        figure.colorbar(image, ax=right, label="contribution score (this round)")
    right.set_title("Contribution per round")
    figure.suptitle(f"Who contributed: {summary.get('contribution', '')} scores")
    return figure


def plot_payouts(summary: Mapping[str, Any]) -> Figure:
    """What each factory was paid over the run, in the run's currency (top-N plus others)."""
    currency = str(summary.get("reward_currency") or "")
    paid = {k: float(v) / 100 for k, v in (summary.get("payout_cumulative") or {}).items()}
    ranked = top_n(paid)
    figure = _figure(8.0, max(4.0, 0.32 * len(ranked) + 1.5))
    ax = figure.add_subplot()
    ax.barh([k for k, _ in ranked][::-1], [v for _, v in ranked][::-1], color="tab:green")
    for y, (_, v) in enumerate(reversed(ranked)):
        ax.text(v, y, f" {currency} {v:,.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max([v for _, v in ranked] + [1.0]) * 1.3)
    ax.set_xlabel(f"paid ({currency})")
    total = math.fsum(paid.values())
    ax.set_title(f"Payouts per factory: {currency} {total:,.2f} paid to {len(paid)} factories")
    return figure


def plot_epsilon(summary: Mapping[str, Any]) -> Figure:
    """Each factory's cumulative epsilon by round against the budget and the decline line.

    With more than :data:`TOP_N` factories, the spread over all factories is a band (min to
    max) and the top factories by spend are drawn as lines.
    """
    privacy = summary.get("privacy") or {}
    per_round = summary.get("factory_rounds") or []
    series: dict[str, list[tuple[int, float]]] = {}
    for r in per_round:
        for fid, eps in (r.get("epsilon") or {}).items():
            series.setdefault(fid, []).append((int(r["round"]), float(eps)))
    figure = _figure()
    ax = figure.add_subplot()
    last = {fid: pts[-1][1] for fid, pts in series.items()}
    drawn = [k for k, _ in top_n(last)] if len(series) <= TOP_N + 1 else [
        k for k, _ in sorted(last.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    ]  # fmt: skip
    if len(series) > TOP_N + 1:
        rounds = sorted({x for pts in series.values() for x, _ in pts})
        lo = [min(dict(p).get(x, math.inf) for p in series.values()) for x in rounds]
        hi = [max(dict(p).get(x, -math.inf) for p in series.values()) for x in rounds]
        ax.fill_between(rounds, lo, hi, color="tab:blue", alpha=0.2,
                        label=f"all {len(series)} factories (min to max)")  # fmt: skip
    for fid in drawn:
        if fid in series:
            xs, ys = zip(*series[fid], strict=True)
            ax.plot(xs, ys, marker=".", label=fid)
    budget = privacy.get("epsilon") if privacy.get("enabled") else None
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", label=f"budget {budget:g}")
        minimum = float(privacy.get("min_run_epsilon") or 0.0)
        if minimum > 0:
            ax.axhline(budget - minimum, color="tab:orange", linestyle=":",
                       label=f"declines next run above {budget - minimum:g}")  # fmt: skip
    unit = privacy.get("unit") or "record"
    ax.set_xlabel("round")
    _integer_rounds(ax)
    ax.set_ylabel(f"epsilon spent (per {unit}, cumulative)")
    ax.set_title("Privacy spent per factory")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    return figure


def plot_outcomes(summary: Mapping[str, Any]) -> Figure:
    """Accepted, rejected, declined and failed replies per round, stacked."""
    counts = outcome_counts(summary)
    figure = _figure()
    ax = figure.add_subplot()
    xs = [c["round"] for c in counts]
    bottom = [0] * len(xs)
    colors = {"accepted": "tab:green", "rejected": "tab:red", "declined": "tab:orange",
              "failed": "tab:gray"}  # fmt: skip
    for kind in OUTCOMES:
        ys = [c[kind] for c in counts]
        ax.bar(xs, ys, bottom=bottom, color=colors[kind], label=kind)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xlabel("round")
    _integer_rounds(ax)
    ax.set_ylabel("factories")
    ax.set_title("Replies per round")
    ax.legend(loc="lower right", fontsize=8)
    return figure


def figures(summary: Mapping[str, Any]) -> dict[str, Figure]:
    """Every plot of :data:`PLOTS` for ``summary``, by file stem."""
    return {
        "global_metric": plot_global_metric(summary),
        "contribution_share": plot_contribution_share(summary),
        "payouts": plot_payouts(summary),
        "epsilon": plot_epsilon(summary),
        "outcomes": plot_outcomes(summary),
    }


def save_plots(summary: Mapping[str, Any], folder: str | Path, dpi: int = 100) -> list[Path]:
    """Draw every plot as ``<folder>/<name>.png``; returns the paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, figure in figures(summary).items():
        path = out / f"{name}.png"
        figure.savefig(path, format="png", dpi=dpi)
        paths.append(path)
    return paths


def synthetic_summary(num_factories: int, num_rounds: int = 10, seed: int = 0) -> dict:
    """A made-up summary of ``num_factories`` (for docs and tests of the plots' legibility)."""
    import random

    rng = random.Random(seed)
    ids = [f"factory_{i:03d}" for i in range(num_factories)]
    rate = {f: rng.uniform(0.1, 0.795) for f in ids}
    quality = {f: rng.gauss(0.01, 0.02) for f in ids}
    per_round, failures, cumulative = [], [], dict.fromkeys(ids, 0.0)
    for r in range(1, num_rounds + 1):
        status = {}
        for f in ids:
            roll = rng.random()
            status[f] = "accepted" if roll < 0.92 else "declined" if roll < 0.96 else "rejected"
            if status[f] != "accepted":
                failures.append({"round": r, "factory": f, "status": status[f], "reason": "x"})
        contribution = {f: rng.gauss(quality[f], 0.01) for f in ids if status[f] == "accepted"}
        for f, v in contribution.items():
            cumulative[f] += v
        per_round.append({"round": r, "status": status, "contribution": contribution,
                          "epsilon": {f: rate[f] * r for f in ids}})  # fmt: skip
    positive = math.fsum(max(v, 0.0) for v in cumulative.values())
    pool = 100_000
    return {
        "run_name": f"synthetic-{num_factories}-factories",
        "task": "tep_fault",
        "strategy": "fedavg",
        "contribution": "gtg",
        "main_metric": "macro_f1",
        "rounds": [
            {"round": r, "macro_f1": 0.05 + 0.5 * (1 - math.exp(-r / 3))}
            for r in range(num_rounds + 1)
        ],  # fmt: skip
        "test": {"macro_f1": 0.52},
        "privacy": {
            "enabled": True,
            "epsilon": 8.0,
            "delta": 1e-5,
            "unit": "window",
            "min_run_epsilon": 0.1,
        },  # fmt: skip
        "reward_currency": "EUR",
        "contribution_cumulative": cumulative,
        "payout_cumulative": {
            f: round(pool * max(v, 0.0) / positive) if positive else 0
            for f, v in cumulative.items()
        },
        "factory_epsilon": {f: rate[f] * num_rounds for f in ids},
        "failures": failures,
        "factory_rounds": per_round,
    }


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m fl_server.report N OUT``: the plots of a synthetic N-factory run in OUT."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    n, out = int(args[0]), Path(args[1])
    for path in save_plots(synthetic_summary(n), out):
        print(path)


if __name__ == "__main__":
    _main()
