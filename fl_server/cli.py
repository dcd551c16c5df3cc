"""The ``factoryfed`` command line.

Subcommands are registered with :func:`register_command`; each registration adds an argparse
sub-parser and the handler that runs it, so new tools plug in without touching :func:`main`::

    @register_command("data", help="create and inspect federation data")
    def _data(parser: argparse.ArgumentParser) -> None:
        ...  # add arguments and nested sub-parsers, set_defaults(handler=...)

Handlers take the parsed namespace and return the process exit code. Heavy imports (torch,
the task catalogue) happen inside handlers so that ``factoryfed --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    """A top-level subcommand: its name, one-line help and the function that sets up its parser."""

    name: str
    help: str
    configure: Configure


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str) -> Callable[[Configure], Configure]:
    """Decorator registering ``configure(parser)`` as the top-level subcommand ``name``.

    ``configure`` adds arguments (and nested sub-parsers if any) and must set
    ``parser.set_defaults(handler=...)`` on every leaf parser.
    """

    def decorate(configure: Configure) -> Configure:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        COMMANDS[name] = Command(name, help, configure)
        return configure

    return decorate


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="factoryfed",
        description="Federated learning for manufacturing firms: data, runs and operations.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``factoryfed`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        # A group (e.g. ``factoryfed data``) without its action: show what it offers.
        target = getattr(args, "group_parser", None) or parser
        target.print_help(sys.stderr)
        return 2
    return int(handler(args))


# ----------------------------------------------------------------------------- data commands


def _print_table(rows: list[tuple[str, str]], header: tuple[str, str]) -> None:
    width = max(len(r[0]) for r in [header, *rows])
    print(f"{header[0]:<{width}}  {header[1]:>8}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")


def _data_make(args: argparse.Namespace) -> int:
    from standard_models.base import DataValidationError, PartitionConfig
    from standard_models.datafiles import data_matches, make_federated_data, read_manifest

    partition = PartitionConfig(
        scheme=args.scheme,
        alpha=args.alpha,
        quantity_skew=args.quantity_skew,
        feature_shift=args.feature_shift,
    )
    params = (args.task, args.num_factories, args.seed, partition)
    try:
        if not args.force and data_matches(args.out, *params):
            status = "up to date (same parameters), kept"
        else:
            make_federated_data(*params, out_dir=args.out)
            status = "written"
        manifest = read_manifest(args.out)
    except (ValueError, DataValidationError, RuntimeError, OSError) as exc:
        print(f"factoryfed data make: {exc}", file=sys.stderr)
        return 1
    rows = [(entry["name"], str(entry["rows"])) for entry in manifest["files"]]
    _print_table(rows, ("file", "rows"))
    print(f"{args.task}: {args.num_factories} factories, seed {args.seed}, {partition}")
    print(f"{args.out}: {status}")
    return 0


@register_command("data", help="create federation data (one Parquet file per factory)")
def _configure_data(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(group_parser=parser)
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    make = actions.add_parser(
        "make",
        help="generate a task's factories, validation and test files plus a manifest",
    )
    make.add_argument("--task", required=True, help="standard model name, e.g. tep_fault")
    make.add_argument("--num-factories", type=int, required=True, help="number of factories")
    make.add_argument("--seed", type=int, required=True, help="generation seed (>= 0)")
    make.add_argument("--out", required=True, help="output directory")
    make.add_argument(
        "--scheme",
        choices=("natural", "dirichlet", "iid"),
        default="natural",
        help="how data is split into factories (default: natural)",
    )
    make.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    make.add_argument(
        "--quantity-skew", type=float, default=0.5, help="log-normal sigma of factory sizes"
    )
    make.add_argument(
        "--feature-shift", type=float, default=0.0, help="scale of per-factory sensor shift"
    )
    make.add_argument(
        "--force", action="store_true", help="regenerate even if identical data exists"
    )
    make.set_defaults(handler=_data_make)


# ----------------------------------------------------------------------------- reward ledger


def _ledger_verify(args: argparse.Namespace) -> int:
    from fl_server.ledger import LedgerFileError, verify_ledger

    try:
        result = verify_ledger(args.path, expected_head=args.head)
    except LedgerFileError as exc:
        print(f"factoryfed ledger verify: {exc}", file=sys.stderr)
        return 2
    if not result.ok:
        print(f"TAMPERED: {result.describe()}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


@register_command("ledger", help="check the reward ledger's hash chain")
def _configure_ledger(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(group_parser=parser)
    actions = parser.add_subparsers(dest="ledger_command", metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="recompute every entry's hash and follow the chain; exit 1 if it was tampered with",
    )
    verify.add_argument("path", metavar="PATH", help="reward ledger file (SQLite)")
    verify.add_argument(
        "--head",
        metavar="HASH",
        help="head hash kept outside the ledger: the chain must end there (this is how "
        "removed trailing entries are noticed)",
    )
    verify.set_defaults(handler=_ledger_verify)


def _statement(args: argparse.Namespace) -> int:
    from fl_server.ledger import LedgerFileError, audit_ledger, export_statement, factory_statement

    try:
        entries, result = audit_ledger(args.ledger)
    except LedgerFileError as exc:
        print(f"factoryfed statement: {exc}", file=sys.stderr)
        return 2
    try:
        statement = factory_statement(entries, args.factory, result, run_id=args.run_id)
    except ValueError as exc:
        print(f"factoryfed statement: {exc}", file=sys.stderr)
        return 1
    try:
        paths = export_statement(statement, args.out)
    except OSError as exc:
        print(f"factoryfed statement: cannot write the statement: {exc}", file=sys.stderr)
        return 1
    totals = statement["totals"]
    print(
        f"{args.factory}: {totals['entries']} entries in run(s) "
        f"{', '.join(statement['run_ids'])}; paid {totals['payout']}, "
        f"contribution {totals['contribution']:.6g}"
    )
    for path in paths.values():
        print(f"wrote {path}")
    if not result.ok:
        print(
            f"factoryfed statement: the ledger does not verify (statement marked unverified): "
            f"TAMPERED: {result.describe()}",
            file=sys.stderr,
        )
        return 1
    print(f"ledger verified: {result.entries} entries, head {result.head}")
    return 0


@register_command("statement", help="export a factory's reward statement (CSV, JSON, PNG)")
def _configure_statement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--factory", required=True, metavar="ID", help="factory id")
    parser.add_argument("--ledger", required=True, metavar="PATH", help="reward ledger file")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory for <factory>-statement.{csv,json,png}",
    )
    parser.add_argument("--run-id", metavar="RUN", help="only this run (default: all runs)")
    parser.set_defaults(handler=_statement)


if __name__ == "__main__":
    raise SystemExit(main())
