"""``factoryfed deploy superlink|register|mlflow|supernode``: the operator's and a factory's
long-running processes in the foreground (what the containers run).

Each command starts its process with :mod:`fl_server.launch` and waits on it
(:func:`~fl_server.launch.process.serve_forever`): SIGTERM or SIGINT stops it by process group.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from pathlib import Path

import click


def _sigterm_interrupts(command: Callable[..., int]) -> Callable[..., int]:
    """While ``command`` starts its process, SIGTERM raises KeyboardInterrupt, so that a
    container stopped during start-up still stops the processes it launched (the foreground
    wait then handles SIGTERM itself). The previous handler is back when it returns."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    @functools.wraps(command)
    def wrapped(*args: object, **kwargs: object) -> int:
        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            return command(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapped


def _fail(command: str, message: object) -> int:
    click.echo(f"factoryfed deploy {command}: {message}", err=True)
    return 1


def _print_registrations(registrations: list) -> int:
    failed = 0
    for r in registrations:
        if r.ok:
            detail = f"node {r.node_id}" if r.node_id is not None else r.message
            click.echo(f"registered {r.factory_id}: {detail}")
        else:
            failed += 1
            click.echo(f"NOT registered {r.factory_id}: {r.message}", err=True)
    return 1 if failed else 0


@click.group(help="run the operator side (SuperLink, MLflow) or a factory's SuperNode")
def deploy() -> None:
    """The ``deploy`` group."""


_operator_dir = click.option(
    "--operator-dir", default="bundles/operator", help="provisioned folder"
)
_connection = click.option(
    "--connection", default="factoryfed", help="Flower CLI connection name"
)


@deploy.command(
    help="operator: the SuperLink with TLS and SuperNode authentication (foreground)"
)
@_operator_dir
@click.option("--home", required=True, help="state folder (Flower home, DB, log)")
@click.option("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
@click.option("--port", type=int, default=9093, help="the one HTTPS port (default 9093)")
@_connection
@click.option(
    "--register-factories",
    is_flag=True,
    help="register every provisioned factory's public key once the SuperLink is up",
)
@click.option("--insecure", is_flag=True, help="no TLS (local trials only)")
@click.option("--no-node-auth", is_flag=True, help="accept any SuperNode (not recommended)")
@_sigterm_interrupts
def superlink(
    operator_dir: str,
    home: str,
    host: str,
    port: int,
    connection: str,
    register_factories: bool,
    insecure: bool,
    no_node_auth: bool,
) -> int:
    """Start the SuperLink, register the factories, mark it ready, serve until stopped."""
    from fl_server.launch.flower import READY_FILE, start_superlink
    from fl_server.launch.flower_config import config_args
    from fl_server.launch.process import LaunchError, serve_forever
    from fl_server.provision import ProvisionError
    from fl_server.provision import register_factories as register

    # <home>/ready exists only while this SuperLink is up with the factories registered
    # (the container's health check): a factory that connects earlier would be refused.
    ready = Path(home) / READY_FILE
    ready.unlink(missing_ok=True)
    try:
        handle = start_superlink(
            None if insecure else operator_dir,
            home,
            host=host,
            port=port,
            insecure=insecure,
            node_auth=not no_node_auth,
            connection=connection,
        )
    except (LaunchError, OSError, ValueError) as exc:
        return _fail("superlink", exc)
    except KeyboardInterrupt:
        return 130
    info = handle.info
    click.echo(f"SuperLink PID {handle.pid} on {info['address']} (log {handle.log_path})")
    click.echo(f"Flower CLI: FLWR_HOME={info['flwr_home']} (connection '{info['connection']}')")
    if register_factories:
        try:
            code = _print_registrations(register(operator_dir, info["connection"], handle.env))
        except (ProvisionError, OSError, ValueError) as exc:
            code = _fail("superlink", f"registration failed: {exc}")
        except KeyboardInterrupt:
            code = 130
        if code:
            handle.stop()
            return code
    ready.write_text(info["address"] + "\n")
    hint = config_args({"overrides": "...", "output-dir": "...", "data-dir": "..."})
    click.echo(
        f"run: FLWR_HOME={info['flwr_home']} flwr run . {info['connection']} --stream "
        f"--run-config '{hint}'"
    )
    try:
        return serve_forever([handle])
    finally:
        ready.unlink(missing_ok=True)


@deploy.command(help="operator: register factories' public keys with a running SuperLink")
@_operator_dir
@click.option("--home", required=True, help="the SuperLink launcher's --home")
@click.option(
    "--superlink", metavar="HOST:PORT", help="write a connection to this SuperLink first"
)
@_connection
@click.option("--factory", "factories", multiple=True, metavar="ID", help="only these factories")
def register(
    operator_dir: str,
    home: str,
    superlink: str | None,
    connection: str,
    factories: tuple[str, ...],
) -> int:
    """Register the keys (again: a known key counts as registered)."""
    from fl_server.launch.flower_config import write_connection
    from fl_server.launch.process import child_env
    from fl_server.provision import CA_CERT, ProvisionError, register_factories

    flwr_home = Path(home) / "flwr"
    if superlink:
        ca = Path(operator_dir) / CA_CERT
        write_connection(flwr_home, superlink, connection, root_certificates=ca)
    elif not (flwr_home / "config.toml").is_file():
        click.echo(
            f"factoryfed deploy register: no {flwr_home / 'config.toml'}; give --superlink "
            "HOST:PORT or the --home of 'factoryfed deploy superlink'",
            err=True,
        )
        return 2
    try:
        regs = register_factories(
            operator_dir, connection, child_env(flwr_home), list(factories) or None
        )
    except (ProvisionError, OSError, ValueError) as exc:
        return _fail("register", exc)
    return _print_registrations(regs)


@deploy.command(help="operator: an MLflow tracking server (foreground)")
@click.option("--home", required=True, help="folder for the default store and artifacts")
@click.option("--host", default="127.0.0.1", help="bind address")
@click.option("--port", type=int, default=5000, help="port (default 5000)")
@click.option(
    "--backend-store-uri",
    help="default sqlite:///<home>/mlflow.db; e.g. postgresql://user:pw@db:5432/mlflow",
)
@click.option("--artifacts-destination", help="default <home>/artifacts; or s3://...")
@click.option(
    "--allowed-hosts",
    multiple=True,
    metavar="HOST",
    help="Host header the server accepts besides localhost and private IPs (e.g. mlflow:5000)",
)
@click.option(
    "--experiment",
    default="factoryfed",
    help="create this experiment with the server's artifact store ('' to skip)",
)
@_sigterm_interrupts
def mlflow(
    home: str,
    host: str,
    port: int,
    backend_store_uri: str | None,
    artifacts_destination: str | None,
    allowed_hosts: tuple[str, ...],
    experiment: str,
) -> int:
    """Start the tracking server and serve until stopped."""
    from fl_server.launch.mlflow_server import start_mlflow
    from fl_server.launch.process import LaunchError, serve_forever

    try:
        handle = start_mlflow(
            home,
            host=host,
            port=port,
            backend_store_uri=backend_store_uri,
            artifacts_destination=artifacts_destination,
            allowed_hosts=list(allowed_hosts),
            experiment=experiment or None,
        )
    except (LaunchError, OSError, ValueError) as exc:
        return _fail("mlflow", exc)
    except KeyboardInterrupt:
        return 130
    click.echo(f"MLflow PID {handle.pid}: {handle.info['uri']} (log {handle.log_path})")
    click.echo(
        "set tracking.uri=<this server's URL as the ServerApp sees it> in the run's overrides"
    )
    return serve_forever([handle])


@deploy.command(help="factory: its SuperNode from its bundle")
@click.option("--bundle", required=True, help="the factory's bundle folder")
@click.option("--home", required=True, help="writable folder (Flower home, log)")
@click.option("--data-path", help="the factory's Parquet file")
@click.option("--ledger-path", help="the factory's privacy ledger (JSON)")
@click.option("--superlink", metavar="HOST:PORT", help="default: the bundle's address")
@click.option("--host", default="127.0.0.1", help="bind address of its runtime API")
@click.option("--port", type=int, default=9094, help="its runtime API port (9094)")
@click.option("--epsilon-budget", type=float, help="this factory's own privacy budget")
@click.option("--delta", type=float, help="this factory's own delta")
@click.option(
    "--record-sketch-key-file",
    type=click.Path(dir_okay=False),
    help="file holding the secret the factories share for record sketches (16 to 64 bytes; "
    "never the operator's): with it, replies carry a keyed sketch of this factory's records",
)
@click.option("--max-retries", type=int, help="give up connecting after N tries")
@click.option("--max-wait-time", type=float, help="give up connecting after S seconds")
@click.option(
    "--wait-connected",
    type=float,
    default=0,
    metavar="S",
    help="fail unless the SuperLink accepts the node within S seconds",
)
@click.option("--insecure", is_flag=True, help="no TLS and no authentication")
@_sigterm_interrupts
def supernode(
    bundle: str,
    home: str,
    data_path: str | None,
    ledger_path: str | None,
    superlink: str | None,
    host: str,
    port: int,
    epsilon_budget: float | None,
    delta: float | None,
    record_sketch_key_file: str | None,
    max_retries: int | None,
    max_wait_time: float | None,
    wait_connected: float,
    insecure: bool,
) -> int:
    """Start the SuperNode (and its warm ClientApp launcher) and serve until stopped."""
    from fl_common.sketch import is_sketch_key
    from fl_server.launch import flower
    from fl_server.launch.process import LaunchError, serve_forever
    from fl_server.provision import ProvisionError

    extra: dict[str, object] = {}
    if epsilon_budget is not None:
        extra["epsilon-budget"] = epsilon_budget
    if delta is not None:
        extra["delta"] = delta
    if record_sketch_key_file is not None:
        try:
            key = Path(record_sketch_key_file).read_text().strip()
        except OSError as exc:
            return _fail("supernode", f"--record-sketch-key-file {record_sketch_key_file}: {exc}")
        if not is_sketch_key(key):
            return _fail(
                "supernode",
                f"--record-sketch-key-file {record_sketch_key_file}: the key must be 16 to 64 "
                f"bytes, got {len(key.encode())}",
            )
        extra["record-sketch-key"] = key
    try:
        handle = flower.start_supernode(
            bundle,
            home,
            data_path,
            ledger_path,
            superlink=superlink,
            host=host,
            port=port,
            insecure=insecure,
            node_auth=not insecure,
            node_config=extra,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
        )
    except (ProvisionError, OSError, ValueError) as exc:
        return _fail("supernode", exc)
    except KeyboardInterrupt:
        return 130
    try:
        click.echo(
            f"SuperNode PID {handle.pid} for {handle.info['factory_id']} (log {handle.log_path})"
        )
        if wait_connected:
            try:
                flower.wait_connected(handle, wait_connected)
            except LaunchError as exc:
                _fail("supernode", exc)
                click.echo(handle.log_text()[-2000:], err=True)
                return 1
            click.echo("connected to the SuperLink")
    except KeyboardInterrupt:
        handle.stop()
        return 130
    return serve_forever([handle])
