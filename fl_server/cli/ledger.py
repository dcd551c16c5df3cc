"""``factoryfed ledger verify`` and ``factoryfed statement``: the reward ledger's hash chain and
a factory's statement."""

from __future__ import annotations

import click


@click.group(help="check the reward ledger's hash chain")
def ledger() -> None:
    """The ``ledger`` group."""


@ledger.command(
    help="recompute every entry's hash and follow the chain; exit 1 if it was tampered with"
)
@click.argument("path", metavar="PATH")
@click.option(
    "--head",
    metavar="HASH",
    help="head hash kept outside the ledger, or a prefix of it of at least 16 hex digits: the "
    "chain must end there (this is how removed trailing entries are noticed)",
)
def verify(path: str, head: str | None) -> int:
    """Exit 0 if the chain verifies, 1 if it was tampered with, 2 if the file is no ledger."""
    from fl_server.rewards.ledger import LedgerFileError, verify_ledger

    try:
        result = verify_ledger(path, expected_head=head)
    except (LedgerFileError, ValueError) as exc:
        click.echo(f"factoryfed ledger verify: {exc}", err=True)
        return 2
    if not result.ok:
        click.echo(f"TAMPERED: {result.describe()}", err=True)
        return 1
    click.echo(result.describe())
    return 0


@click.command(help="export a factory's reward statement (CSV, JSON, PNG)")
@click.option("--factory", required=True, metavar="ID", help="factory id")
@click.option("--ledger", "ledger_path", required=True, metavar="PATH", help="reward ledger file")
@click.option(
    "--out",
    required=True,
    metavar="DIR",
    help="output directory for <factory>-statement.{csv,json,png}",
)
@click.option("--run-id", metavar="RUN", help="only this run (default: all runs)")
@click.option(
    "--currency",
    default="EUR",
    show_default=True,
    metavar="CODE",
    help="the run's rewards.currency (the ledger stores minor units, not the currency)",
)
def statement(factory: str, ledger_path: str, out: str, run_id: str | None, currency: str) -> int:
    """Write the statement files; exit 1 when the ledger does not verify (marked unverified)."""
    from fl_server.rewards.ledger import LedgerFileError, audit_ledger
    from fl_server.rewards.statements import export_statement, factory_statement

    def fail(message: str, code: int) -> int:
        click.echo(f"factoryfed statement: {message}", err=True)
        return code

    try:
        entries, result = audit_ledger(ledger_path)
    except LedgerFileError as exc:
        return fail(str(exc), 2)
    try:
        doc = factory_statement(
            entries, factory, result, run_id=run_id, context={"currency": currency}
        )
    except ValueError as exc:
        return fail(str(exc), 1)
    try:
        paths = export_statement(doc, out)
    except OSError as exc:
        return fail(f"cannot write the statement: {exc}", 1)
    totals = doc["totals"]
    click.echo(
        f"{factory}: {totals['entries']} entries in run(s) "
        f"{', '.join(doc['run_ids'])}; paid {currency} {totals['payout'] / 100:,.2f}, "
        f"contribution {totals['contribution']:.6g}"
    )
    for path in paths.values():
        click.echo(f"wrote {path}")
    if not result.ok:
        return fail(
            "the ledger does not verify (statement marked unverified): "
            f"TAMPERED: {result.describe()}",
            1,
        )
    click.echo(f"ledger verified: {result.entries} entries, head {result.head}")
    return 0
