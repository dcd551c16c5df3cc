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
    from fl_server.rewards.ledger import LedgerFileError, verify_ledger

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
    from fl_server.rewards.ledger import LedgerFileError, audit_ledger
    from fl_server.rewards.statements import export_statement, factory_statement

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


# ----------------------------------------------------------------------------- deployment


def _provision(args: argparse.Namespace) -> int:
    from fl_server.provision import ProvisionError, provision

    if args.factory:
        ids = list(args.factory)
    elif args.num_factories:
        ids = [f"factory_{i:03d}" for i in range(args.num_factories)]
    else:
        print("factoryfed provision: give --num-factories N or --factory ID ...", file=sys.stderr)
        return 2
    try:
        result = provision(
            args.out,
            ids,
            superlink_address=args.superlink_address,
            dns_names=["localhost", *args.dns],
            ip_addresses=["127.0.0.1", *args.ip],
            cert_days=args.cert_days,
        )
    except (ProvisionError, OSError, ValueError) as exc:
        print(f"factoryfed provision: {exc}", file=sys.stderr)
        return 1
    # Public facts only: paths and fingerprints, never a private key.
    print(f"CA:        {result.ca_dir} (keep ca.key off the servers)")
    print(f"operator:  {result.operator_dir}  (ca.crt, server.crt, server.key, factories.json)")
    dns, ips = ", ".join(result.dns_names), ", ".join(result.ip_addresses) or "-"
    print(f"SuperLink: {result.superlink_address}; certificate SANs: DNS {dns}; IP {ips}")
    for fid, bundle in result.factories.items():
        print(f"factory    {fid:<16} {bundle.path}  {bundle.fingerprint}")
    print(
        "next: start the SuperLink (factoryfed deploy superlink --operator-dir "
        f"{result.operator_dir} --home DIR --register-factories), give each factory its "
        "folder under factories/"
    )
    return 0


@register_command(
    "provision",
    help="create the CA, the SuperLink certificate and one key bundle per factory",
)
def _configure_provision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bundles", help="output folder (default: bundles)")
    parser.add_argument("--num-factories", type=int, help="factories factory_000 ... factory_N-1")
    parser.add_argument(
        "--factory", action="append", default=[], metavar="ID", help="a factory id (repeatable)"
    )
    parser.add_argument(
        "--superlink-address",
        default="127.0.0.1:9093",
        metavar="HOST:PORT",
        help="address the factories dial; its host goes into the certificate (default "
        "127.0.0.1:9093)",
    )
    parser.add_argument(
        "--dns",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name of the SuperLink for the certificate (localhost is always in)",
    )
    parser.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDR",
        help="another IP address of the SuperLink for the certificate (127.0.0.1 is always in)",
    )
    parser.add_argument(
        "--cert-days", type=int, default=825, help="server certificate validity (days)"
    )
    parser.set_defaults(handler=_provision)


def _sigterm_interrupts() -> None:
    """Until a launcher waits in the foreground, SIGTERM raises KeyboardInterrupt, so that a
    container stopped during start-up still stops the processes it launched."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _print_registrations(registrations: list) -> int:
    failed = 0
    for r in registrations:
        if r.ok:
            detail = f"node {r.node_id}" if r.node_id is not None else r.message
            print(f"registered {r.factory_id}: {detail}")
        else:
            failed += 1
            print(f"NOT registered {r.factory_id}: {r.message}", file=sys.stderr)
    return 1 if failed else 0


def _deploy_superlink(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fl_server.deploy import READY_FILE, LaunchError, serve_forever, start_superlink
    from fl_server.provision import ProvisionError, register_factories

    # <home>/ready exists only while this SuperLink is up with the factories registered
    # (the container's health check): a factory that connects earlier would be refused.
    ready = Path(args.home) / READY_FILE
    ready.unlink(missing_ok=True)
    _sigterm_interrupts()
    try:
        handle = start_superlink(
            None if args.insecure else args.operator_dir,
            args.home,
            host=args.host,
            port=args.port,
            insecure=args.insecure,
            node_auth=not args.no_node_auth,
            connection=args.connection,
        )
    except (LaunchError, OSError, ValueError) as exc:
        print(f"factoryfed deploy superlink: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    info = handle.info
    print(f"SuperLink PID {handle.pid} on {info['address']} (log {handle.log_path})")
    print(f"Flower CLI: FLWR_HOME={info['flwr_home']} (connection '{info['connection']}')")
    if args.register_factories:
        try:
            code = _print_registrations(
                register_factories(args.operator_dir, info["connection"], handle.env)
            )
        except (ProvisionError, OSError, ValueError) as exc:
            print(f"factoryfed deploy superlink: registration failed: {exc}", file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            code = 130
        if code:
            handle.stop()
            return code
    ready.write_text(info["address"] + "\n")
    print(
        f"run: FLWR_HOME={info['flwr_home']} flwr run . {info['connection']} --stream "
        '--run-config \'overrides="..." output-dir="..." data-dir="..."\'',
        flush=True,
    )
    try:
        return serve_forever([handle])
    finally:
        ready.unlink(missing_ok=True)


def _deploy_register(args: argparse.Namespace) -> int:
    from pathlib import Path

    from experiments.flower_sim import flower_env
    from fl_server.deploy import write_connection
    from fl_server.provision import CA_CERT, ProvisionError, register_factories

    flwr_home = Path(args.home) / "flwr"
    if args.superlink:
        ca = Path(args.operator_dir) / CA_CERT
        write_connection(flwr_home, args.superlink, args.connection, root_certificates=ca)
    elif not (flwr_home / "config.toml").is_file():
        print(
            f"factoryfed deploy register: no {flwr_home / 'config.toml'}; give --superlink "
            "HOST:PORT or the --home of 'factoryfed deploy superlink'",
            file=sys.stderr,
        )
        return 2
    try:
        regs = register_factories(
            args.operator_dir, args.connection, flower_env(flwr_home), args.factory or None
        )
    except (ProvisionError, OSError, ValueError) as exc:
        print(f"factoryfed deploy register: {exc}", file=sys.stderr)
        return 1
    return _print_registrations(regs)


def _deploy_mlflow(args: argparse.Namespace) -> int:
    from fl_server.deploy import LaunchError, serve_forever, start_mlflow

    _sigterm_interrupts()
    try:
        handle = start_mlflow(
            args.home,
            host=args.host,
            port=args.port,
            backend_store_uri=args.backend_store_uri,
            artifacts_destination=args.artifacts_destination,
            allowed_hosts=args.allowed_hosts,
            experiment=args.experiment or None,
        )
    except (LaunchError, OSError, ValueError) as exc:
        print(f"factoryfed deploy mlflow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"MLflow PID {handle.pid}: {handle.info['uri']} (log {handle.log_path})")
    print(
        "set tracking.uri=<this server's URL as the ServerApp sees it> in the run's overrides",
        flush=True,
    )
    return serve_forever([handle])


def _deploy_supernode(args: argparse.Namespace) -> int:
    from fl_server.deploy import LaunchError, serve_forever, start_supernode, wait_connected
    from fl_server.provision import ProvisionError

    _sigterm_interrupts()
    extra: dict[str, object] = {}
    if args.epsilon_budget is not None:
        extra["epsilon-budget"] = args.epsilon_budget
    if args.delta is not None:
        extra["delta"] = args.delta
    try:
        handle = start_supernode(
            args.bundle,
            args.home,
            args.data_path,
            args.ledger_path,
            superlink=args.superlink,
            host=args.host,
            port=args.port,
            insecure=args.insecure,
            node_auth=not args.insecure,
            node_config=extra,
            max_retries=args.max_retries,
            max_wait_time=args.max_wait_time,
        )
    except (ProvisionError, OSError, ValueError) as exc:
        print(f"factoryfed deploy supernode: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        print(
            f"SuperNode PID {handle.pid} for {handle.info['factory_id']} (log {handle.log_path})",
            flush=True,
        )
        if args.wait_connected:
            try:
                wait_connected(handle, args.wait_connected)
            except LaunchError as exc:
                print(f"factoryfed deploy supernode: {exc}", file=sys.stderr)
                print(handle.log_text()[-2000:], file=sys.stderr)
                return 1
            print("connected to the SuperLink", flush=True)
    except KeyboardInterrupt:
        handle.stop()
        return 130
    return serve_forever([handle])


@register_command(
    "deploy",
    help="run the operator side (SuperLink, MLflow) or a factory's SuperNode",
)
def _configure_deploy(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(group_parser=parser)
    actions = parser.add_subparsers(dest="deploy_command", metavar="ACTION")

    link = actions.add_parser(
        "superlink",
        help="operator: the SuperLink with TLS and SuperNode authentication (foreground)",
    )
    link.add_argument("--operator-dir", default="bundles/operator", help="provisioned folder")
    link.add_argument("--home", required=True, help="state folder (Flower home, DB, log)")
    link.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    link.add_argument("--port", type=int, default=9093, help="the one HTTPS port (default 9093)")
    link.add_argument("--connection", default="factoryfed", help="Flower CLI connection name")
    link.add_argument(
        "--register-factories",
        action="store_true",
        help="register every provisioned factory's public key once the SuperLink is up",
    )
    link.add_argument("--insecure", action="store_true", help="no TLS (local trials only)")
    link.add_argument(
        "--no-node-auth", action="store_true", help="accept any SuperNode (not recommended)"
    )
    link.set_defaults(handler=_deploy_superlink)

    reg = actions.add_parser(
        "register",
        help="operator: register factories' public keys with a running SuperLink",
    )
    reg.add_argument("--operator-dir", default="bundles/operator", help="provisioned folder")
    reg.add_argument("--home", required=True, help="the SuperLink launcher's --home")
    reg.add_argument(
        "--superlink", metavar="HOST:PORT", help="write a connection to this SuperLink first"
    )
    reg.add_argument("--connection", default="factoryfed", help="Flower CLI connection name")
    reg.add_argument(
        "--factory", action="append", default=[], metavar="ID", help="only these factories"
    )
    reg.set_defaults(handler=_deploy_register)

    ml = actions.add_parser("mlflow", help="operator: an MLflow tracking server (foreground)")
    ml.add_argument("--home", required=True, help="folder for the default store and artifacts")
    ml.add_argument("--host", default="127.0.0.1", help="bind address")
    ml.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ml.add_argument(
        "--backend-store-uri",
        help="default sqlite:///<home>/mlflow.db; e.g. postgresql://user:pw@db:5432/mlflow",
    )
    ml.add_argument("--artifacts-destination", help="default <home>/artifacts; or s3://...")
    ml.add_argument(
        "--allowed-hosts",
        action="append",
        default=[],
        metavar="HOST",
        help="Host header the server accepts besides localhost and private IPs (e.g. mlflow:5000)",
    )
    ml.add_argument(
        "--experiment",
        default="factoryfed",
        help="create this experiment with the server's artifact store ('' to skip)",
    )
    ml.set_defaults(handler=_deploy_mlflow)

    node = actions.add_parser("supernode", help="factory: its SuperNode from its bundle")
    node.add_argument("--bundle", required=True, help="the factory's bundle folder")
    node.add_argument("--home", required=True, help="writable folder (Flower home, log)")
    node.add_argument("--data-path", help="the factory's Parquet file")
    node.add_argument("--ledger-path", help="the factory's privacy ledger (JSON)")
    node.add_argument("--superlink", metavar="HOST:PORT", help="default: the bundle's address")
    node.add_argument("--host", default="127.0.0.1", help="bind address of its runtime API")
    node.add_argument("--port", type=int, default=9094, help="its runtime API port (9094)")
    node.add_argument("--epsilon-budget", type=float, help="this factory's own privacy budget")
    node.add_argument("--delta", type=float, help="this factory's own delta")
    node.add_argument("--max-retries", type=int, help="give up connecting after N tries")
    node.add_argument("--max-wait-time", type=float, help="give up connecting after S seconds")
    node.add_argument(
        "--wait-connected",
        type=float,
        default=0,
        metavar="S",
        help="fail unless the SuperLink accepts the node within S seconds",
    )
    node.add_argument("--insecure", action="store_true", help="no TLS and no authentication")
    node.set_defaults(handler=_deploy_supernode)


if __name__ == "__main__":
    raise SystemExit(main())
