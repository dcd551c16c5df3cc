"""Flower's deployment processes: the operator's SuperLink and a factory's SuperNode.

Each ``start_*`` function starts one long-running process in a session of its own, waits until
it is usable (the SuperNode: see :func:`wait_connected`) and returns a
:class:`~fl_server.launch.process.Handle`. The ``factoryfed deploy ...`` commands and the
containers of ``docker/compose.yaml`` run these same functions and then wait on the handle.

Operator side::

    superlink = start_superlink("bundles/operator", home="/srv/factoryfed/operator",
                                host="0.0.0.0", port=9093)   # TLS + SuperNode auth by default
    register_factories("bundles/operator", superlink.info["connection"], superlink.env)
    # then, with FLWR_HOME=<home>/flwr:  flwr run . factoryfed --run-config '...'

Factory side::

    node = start_supernode("bundles/factories/factory_000", home="/srv/factoryfed/node",
                           data_path="/data/factory_000.parquet",
                           ledger_path="/ledger/privacy.json", port=9094)

Every process gets the quiet environment and the venv's ``bin`` first on PATH
(:func:`~fl_server.launch.process.child_env`). A SuperNode also gets a warm ClientApp launcher
(:mod:`fl_server.launch.warm_clientapp`) unless ``warm_clientapp=False``.

Flower's one tunable poll, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how often the SuperExec
asks for new tasks, 1 s), is a parameter (``task_poll_interval``) but left at Flower's value:
a shorter poll cost CPU on every idle SuperNode and gained nothing measurable
(``experiments/bench_deploy_overhead.py``), since a launched ClientApp then waits for the
SuperNode to finish pulling the message anyway.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_server.launch.flower_config import DEFAULT_CONNECTION, write_connection, write_toml
from fl_server.launch.process import Handle, bind_port, child_env, spawn, spawn_healthy, wait_ready
from fl_server.launch.warm_clientapp import (
    CLIENTAPP_PRELOAD,
    WARM_SOCKET_ENV,
    start_warm_clientapp,
    warm_socket_path,
    write_clientapp_shim,
)
from fl_server.provision import CA_CERT, SERVER_CERT, SERVER_KEY, read_bundle

DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_PORT = 9094
#: Written into the SuperLink's home by ``factoryfed deploy superlink`` once it is up and the
#: factories are registered; removed when it stops (what the container health check tests).
READY_FILE = "ready"
#: Seconds between a SuperExec's requests for new tasks (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``);
#: None keeps Flower's 1 s (shorter cost CPU and gained nothing measurable here).
DEFAULT_TASK_POLL_INTERVAL: float | None = None
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def _flower_process_env(
    flwr_home: Path, task_poll_interval: float | None, extra_env: Mapping[str, str] | None
) -> dict[str, str]:
    """The environment of a SuperLink or SuperNode: quiet, its Flower home, its poll."""
    env = child_env(flwr_home)
    if task_poll_interval is not None:
        env[TASK_POLL_ENV] = repr(float(task_poll_interval))
    env.update(extra_env or {})
    return env


def start_superlink(
    operator_dir: str | Path | None,
    home: str | Path,
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_SUPERLINK_PORT,
    *,
    insecure: bool = False,
    node_auth: bool = True,
    database: str | Path | None = None,
    connection: str = DEFAULT_CONNECTION,
    ready_timeout: float = 60.0,
    extra_env: Mapping[str, str] | None = None,
    task_poll_interval: float | None = DEFAULT_TASK_POLL_INTERVAL,
) -> Handle:
    """Start ``flower-superlink`` for a deployment; returns once ``/health`` answers.

    Parameters
    ----------
    operator_dir : path or None
        The operator folder of :func:`fl_server.provision.provision` (``ca.crt``,
        ``server.crt``, ``server.key``); may be None only with ``insecure=True``.
    home : path
        Working folder: ``flwr/`` is the Flower home (``config.toml`` with the connection
        ``connection`` to this SuperLink, installed apps), ``superlink.db`` the state (SuperNode
        registrations survive a restart), ``superlink.log`` the log.
    host, port : bind address (``0.0.0.0`` in a container); ``port=None`` picks a free one.
    insecure : no TLS (tests and local trials only; refuses ``node_auth``).
    node_auth : only SuperNodes whose public key is registered may connect (default on).
    database : SQLite state file (default ``<home>/superlink.db``; ``":flwr-in-memory:"``).
    task_poll_interval : seconds between its SuperExec's looks for a new run to start (None:
        Flower's 1 s).

    The returned handle's ``info`` holds ``address`` (what to dial), ``connection``,
    ``flwr_home`` and ``ca_cert``; ``env`` is the environment for ``flwr`` CLI calls.
    """
    if insecure and node_auth:
        raise ValueError("SuperNode authentication needs TLS: pass node_auth=False with insecure")
    home = Path(home).resolve()
    flwr_home = home / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    port, address = bind_port(host, port)
    env = _flower_process_env(
        flwr_home,
        task_poll_interval,
        {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", **(extra_env or {})},
    )
    cmd = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database if database is not None else home / "superlink.db"),
        # The app runs in this environment; never let the SuperLink install dependencies.
        "--disable-runtime-dependency-installation",
    ]
    ca_cert: Path | None = None
    if insecure:
        cmd.append("--insecure")
    else:
        if operator_dir is None:
            raise ValueError("a TLS SuperLink needs the operator folder (ca.crt, server.*)")
        op = Path(operator_dir).resolve()
        ca_cert = op / CA_CERT
        for f in (ca_cert, op / SERVER_CERT, op / SERVER_KEY):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing; run 'factoryfed provision' first")
        cmd += [
            "--ssl-ca-certfile",
            str(ca_cert),
            "--ssl-certfile",
            str(op / SERVER_CERT),
            "--ssl-keyfile",
            str(op / SERVER_KEY),
        ]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    write_connection(flwr_home, address, connection, root_certificates=ca_cert, insecure=insecure)
    url = f"{'http' if insecure else 'https'}://{address}/health"
    return spawn_healthy(
        "superlink",
        cmd,
        env,
        home,
        home / "superlink.log",
        url,
        ca_cert=ca_cert,
        timeout=ready_timeout,
        what=f"flower-superlink ({url})",
        info={
            "address": address,
            "connection": connection,
            "flwr_home": str(flwr_home),
            "ca_cert": str(ca_cert or ""),
        },
    )


def start_supernode(
    bundle_dir: str | Path,
    home: str | Path,
    data_path: str | Path | None = None,
    ledger_path: str | Path | None = None,
    *,
    superlink: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_SUPERNODE_PORT,
    insecure: bool = False,
    node_auth: bool = True,
    node_config: Mapping[str, object] | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    extra_env: Mapping[str, str] | None = None,
    warm_clientapp: bool = True,
    preload: Sequence[str] = CLIENTAPP_PRELOAD,
    task_poll_interval: float | None = DEFAULT_TASK_POLL_INTERVAL,
) -> Handle:
    """Start a factory's ``flower-supernode`` from its bundle.

    Parameters
    ----------
    bundle_dir : path
        ``factories/<id>/`` from provisioning (``ca.crt``, ``supernode.key``, ``bundle.toml``,
        ``node-config.toml``); may be read-only.
    home : path
        The factory's writable folder: ``flwr/`` (Flower home), ``node-config.toml`` (the
        bundle's node config with the paths below filled in), ``supernode.log``.
    data_path, ledger_path : the factory's Parquet file and privacy ledger (override the
        bundle's placeholders); the data file must exist.
    superlink : ``host:port`` to dial (default: the bundle's address).
    host, port : the SuperNode's own runtime API (each SuperNode on a host needs its own port;
        ``port=None`` picks a free one).
    insecure, node_auth : TLS and authentication, both on by default.
    node_config : further node-config keys (``epsilon-budget``, ``delta``).
    max_retries, max_wait_time : give up connecting after so many tries / seconds (Flower's
        default: never).
    warm_clientapp : also start the warm ClientApp launcher (``<home>/clientapp-launcher.log``;
        see :mod:`fl_server.launch.warm_clientapp`), a companion of the returned handle:
        ``stop()`` stops both, and the launcher ends by itself when the SuperNode does.
    preload : what the launcher imports once.
    task_poll_interval : seconds between the SuperExec's looks for a new message to run (None:
        Flower's 1 s).

    Returns as soon as the process is started; :func:`wait_connected` waits until the
    SuperLink accepted it. A refused node (key not registered) exits with status 1 and
    ``Exit Code: 305`` in its log.
    """
    if insecure and node_auth:
        raise ValueError("SuperNode authentication needs TLS: pass node_auth=False with insecure")

    bundle = read_bundle(bundle_dir)
    home = Path(home).resolve()
    flwr_home = home / "flwr"
    flwr_home.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = dict(tomllib.loads(Path(bundle["node-config"]).read_text()))
    if data_path is not None:
        values["data-path"] = str(Path(data_path).resolve())
    if ledger_path is not None:
        values["ledger-path"] = str(Path(ledger_path).resolve())
    values.update(node_config or {})
    data = Path(str(values.get("data-path", "")))
    if not data.is_file():
        raise FileNotFoundError(f"{data}: the factory's data file (data-path) does not exist")
    ledger = Path(str(values.get("ledger-path", "")))
    ledger.parent.mkdir(parents=True, exist_ok=True)
    # Private: it may hold the factories' record-sketch key.
    nc_file = write_toml(home / "node-config.toml", values, private=True)
    port, runtime_address = bind_port(host, port)
    env = _flower_process_env(flwr_home, task_poll_interval, extra_env)
    warm_socket: Path | None = None
    if warm_clientapp:
        warm_socket = warm_socket_path(home)
        warm_socket.unlink(missing_ok=True)  # a crashed launcher's: wait for the new one
        shim_dir = write_clientapp_shim(home / "bin")
        env["PATH"] = str(shim_dir) + os.pathsep + env["PATH"]
        env[WARM_SOCKET_ENV] = str(warm_socket)
    cmd = [
        "flower-supernode",
        "--superlink",
        superlink or bundle["superlink"],
        "--host",
        host,
        "--port",
        str(port),
        "--node-config",
        str(nc_file),
    ]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", bundle["root-certificates"]]
    if node_auth:
        cmd += ["--auth-supernode-private-key", bundle["private-key"]]
    if max_retries is not None:
        cmd += ["--max-retries", str(int(max_retries))]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(float(max_wait_time))]
    handle = spawn(
        f"supernode-{bundle['factory-id']}",
        cmd,
        env,
        home,
        home / "supernode.log",
        info={
            "factory_id": str(values.get("factory-id", bundle["factory-id"])),
            "runtime_address": runtime_address,
            "node_config": str(nc_file),
        },
    )
    if warm_socket is not None:
        try:
            launcher = start_warm_clientapp(
                warm_socket, home, env, watch_pid=handle.pid, preload=preload
            )
        except BaseException:
            handle.stop()
            raise
        handle.companions.append(launcher)
        handle.info["warm_socket"] = str(warm_socket)
    return handle


def wait_connected(handle: Handle, timeout: float = 60.0) -> None:
    """Wait until a SuperNode's log says it reached the SuperLink (raises if it exits).

    With a warm ClientApp launcher it also waits (within the same ``timeout``) until the
    launcher listens, so that the first round is warm too; a launcher that fails is only
    reported in its log (the SuperNode then runs Flower's ``flwr-clientapp`` directly).
    """
    deadline = time.monotonic() + timeout
    wait_ready(handle, lambda: "SuperNode ID:" in handle.log_text(), timeout, handle.name)
    socket_path = handle.info.get("warm_socket")
    if socket_path:
        for launcher in handle.companions:
            while launcher.poll() is None and time.monotonic() < deadline:
                if Path(socket_path).exists():
                    break
                time.sleep(0.2)
