"""Launchers for a deployed federation: SuperLink, MLflow server, factory SuperNodes.

Each ``start_*`` function starts one long-running process in a session of its own (so its
process group can be stopped as a whole), waits until it is usable, and returns a
:class:`Handle` with the PID and ``stop()``. The ``factoryfed deploy ...`` commands and the
containers of ``docker/compose.yaml`` run these same functions and then wait on the handle.

Operator side::

    superlink = start_superlink("bundles/operator", home="/srv/factoryfed/operator",
                                host="0.0.0.0", port=9093)   # TLS + SuperNode auth by default
    register_factories("bundles/operator", superlink.info["connection"], superlink.env)
    mlflow = start_mlflow("/srv/factoryfed/mlflow", host="0.0.0.0", port=5000)
    # then, with FLWR_HOME=<home>/flwr:  flwr run . factoryfed --run-config '...'

Factory side::

    node = start_supernode("bundles/factories/factory_000", home="/srv/factoryfed/node",
                           data_path="/data/factory_000.parquet",
                           ledger_path="/ledger/privacy.json", port=9094)

Process hygiene: every process gets the quiet environment of :mod:`experiments.flower_sim`
(no telemetry, no update checks) and the venv's ``bin`` first on PATH (the SuperLink and the
SuperNodes start ``flower-superexec`` by name). ``stop()`` sends SIGTERM to the process group,
then SIGKILL to what is left of the group and of the process tree (Flower starts
``flower-superexec`` in a session of its own).

Round overhead. Flower 1.42 runs every message a factory receives in a fresh ``flwr-clientapp``
process (it has no long-lived ClientApp: ``flwr-clientapp`` serves one task token and exits,
with ``--isolation process`` too), which here spends about 5 s (10 s with three factories on
two cores) importing torch, Opacus, scikit-learn and pandas for under a second of training.
A *warm ClientApp launcher* per SuperNode (``warm_clientapp=True``, the default) brings a
deployed round of ``molding_quality`` from about 21 s to about 7.5 s here
(``experiments/bench_deploy_overhead.py``): a long-lived process that has imported those
libraries once and forks for each message. A ``flwr-clientapp`` shim, first on the SuperNode's
PATH, hands each launch Flower's SuperExec makes to it (argv, environment, working folder,
standard streams), so every message still runs Flower's own ``flwr-clientapp`` entry point in
a process of its own that starts from a clean state and loads the app from the FAB; only the
import work is shared. Without the launcher (not started yet, stopped, crashed) the shim runs
Flower's ``flwr-clientapp`` itself. The launcher never imports the app's own packages.

Flower's one tunable poll, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (how often the SuperExec
asks for new tasks, 1 s), is a parameter (``task_poll_interval``) but left at Flower's value:
0.2 s cost 2 % of a core per idle SuperNode and gained nothing measurable, since a launched
ClientApp then waits for the SuperNode to finish pulling the message anyway. What remains are
Flower's fixed polls (an idle SuperNode asks for messages every 3 s, the ServerApp's grid asks
for replies every 3 s, a SuperNode passes a reply on within 0.5 s), the local HTTPS transfers
of each message and reply, and the round's own work.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.flower_sim import (
    _toml_value,
    descendants,
    flower_env,
    free_port,
    start_flwr_run,
    stream_to_end,
)
from fl_server.provision import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    read_bundle,
    toml_string,
)

#: Name of the ``[superlink.<name>]`` connection the operator launcher writes.
DEFAULT_CONNECTION = "factoryfed"
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_PORT = 9094
DEFAULT_MLFLOW_PORT = 5000
#: Written into the SuperLink's home by ``factoryfed deploy superlink`` once it is up and the
#: factories are registered; removed when it stops (what the container health check tests).
READY_FILE = "ready"
#: Seconds between a SuperExec's requests for new tasks (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``);
#: None keeps Flower's 1 s (shorter cost CPU and gained nothing measurable here).
DEFAULT_TASK_POLL_INTERVAL: float | None = None
#: Libraries the warm ClientApp launcher imports once (what ``fl_client.client_app`` needs
#: besides its own packages; missing ones are skipped). Never the app's own packages.
CLIENTAPP_PRELOAD = (
    "numpy",
    "torch",
    "opacus",
    "scipy.stats",
    "pyarrow.parquet",
    "pandas",
    "sklearn.metrics",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.cli.flwr_clientapp",
)
#: The environment variable that points the ``flwr-clientapp`` shim at its launcher's socket.
WARM_SOCKET_ENV = "FACTORYFED_CLIENTAPP_SOCKET"
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class LaunchError(RuntimeError):
    """A launched process exited or never became ready; the message names its log."""


@dataclass
class Handle:
    """A process started by a launcher: its PID, log, and how to stop it (by process group)."""

    name: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    #: Where this process's output starts in ``log_path`` (logs are appended across restarts).
    log_offset: int = 0
    #: Helper processes that live and die with this one (a SuperNode's warm ClientApp
    #: launcher); :meth:`stop` stops them after the main process.
    companions: list[Handle] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout=timeout)

    def log_text(self) -> str:
        """What this process wrote to its log so far."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``grace`` s, then SIGKILL group and tree.

        The group id is the PID (every launcher starts a new session). The group is signalled
        only while it still has members, which cannot be anyone else's processes: a group id
        is not reused while the group exists. Returns the exit code (None if it could not be
        collected). Safe to call twice, and after the process exited by itself.
        """
        proc = self.process
        pgid = proc.pid
        alive = proc.returncode is None  # not reaped yet: its PID cannot have been reused
        tree = descendants(proc.pid) if alive else []
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        if alive:
            tree += descendants(proc.pid)
        _signal_group(pgid, signal.SIGKILL)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        for companion in self.companions:
            companion.stop(grace=grace)
        return code

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_members(pgid: int) -> list[int]:
    """PIDs of live processes in process group ``pgid`` (Linux ``/proc``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _signal_group(pgid: int, sig: int) -> None:
    if not _group_members(pgid):
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(
    name: str,
    cmd: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    info: Mapping[str, str] | None = None,
) -> Handle:
    """Start ``cmd`` in a new session (its own process group), output appended to the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it; closed below in the parent
    try:
        offset = log.tell()
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()
    return Handle(name, proc, log_path, env=dict(env), info=dict(info or {}), log_offset=offset)


def _wait_ready(handle: Handle, probe: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``probe`` until true; stop the process if it exits, times out or we are interrupted."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            code = handle.poll()
            if code is not None:
                raise LaunchError(f"{what} exited with code {code}; see {handle.log_path}")
            if probe():
                return
            time.sleep(0.3)
        raise LaunchError(f"{what} was not ready within {timeout:.0f} s; see {handle.log_path}")
    except BaseException:
        handle.stop()
        raise


def connect_host(host: str) -> str:
    """The address to dial for a bind address (``0.0.0.0`` and ``::`` mean loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def https_get(url: str, ca_cert: str | Path | None, timeout: float = 2.0) -> int:
    """Status of a GET to ``url``, verifying TLS against ``ca_cert`` when it is https."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
        return int(resp.status)


# ----------------------------------------------------------------------------- Flower CLI config


def write_connection(
    flwr_home: str | Path,
    address: str,
    name: str = DEFAULT_CONNECTION,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one ``[superlink.<name>]`` entry, the default.

    With ``root_certificates`` (absolute path of the CA certificate) the CLI talks TLS;
    ``insecure=True`` is only for a SuperLink started without TLS. Returns the file.
    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f"default = {toml_string(name)}",
        "",
        f"[superlink.{name}]",
        f"address = {toml_string(address)}",
    ]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates is not None:
        lines.append(f"root-certificates = {toml_string(str(Path(root_certificates).resolve()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- SuperLink


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
    port = int(port) if port else free_port()
    address = _hostport(connect_host(host), port)
    env = flower_env(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    if task_poll_interval is not None:
        env[TASK_POLL_ENV] = repr(float(task_poll_interval))
    env.update(extra_env or {})
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
    handle = _spawn(
        "superlink",
        cmd,
        env,
        home,
        home / "superlink.log",
        info={
            "address": address,
            "connection": connection,
            "flwr_home": str(flwr_home),
            "ca_cert": str(ca_cert or ""),
        },
    )
    scheme = "http" if insecure else "https"
    url = f"{scheme}://{address}/health"

    def healthy() -> bool:
        try:
            return https_get(url, ca_cert) == 200
        except (OSError, ssl.SSLError):
            return False

    _wait_ready(handle, healthy, ready_timeout, f"flower-superlink ({url})")
    return handle


# ----------------------------------------------------------------------------- SuperNode


def write_node_config(path: Path, values: Mapping[str, object]) -> Path:
    """A node-config TOML file (read by ``flower-supernode --node-config FILE.toml``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


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
        see the module docstring), a companion of the returned handle: ``stop()`` stops both,
        and the launcher ends by itself when the SuperNode does.
    preload : what the launcher imports once.
    task_poll_interval : seconds between the SuperExec's looks for a new message to run (None:
        Flower's 1 s).

    Returns as soon as the process is started; :func:`wait_connected` waits until the
    SuperLink accepted it. A refused node (key not registered) exits with status 1 and
    ``Exit Code: 305`` in its log.
    """
    import tomllib

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
    nc_file = write_node_config(home / "node-config.toml", values)
    port = int(port) if port else free_port()
    env = flower_env(flwr_home)
    if task_poll_interval is not None:
        env[TASK_POLL_ENV] = repr(float(task_poll_interval))
    env.update(extra_env or {})
    warm_socket: Path | None = None
    if warm_clientapp:
        warm_socket = _warm_socket_path(home)
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
    handle = _spawn(
        f"supernode-{bundle['factory-id']}",
        cmd,
        env,
        home,
        home / "supernode.log",
        info={
            "factory_id": str(values.get("factory-id", bundle["factory-id"])),
            "runtime_address": _hostport(connect_host(host), port),
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

    def connected() -> bool:
        text = handle.log_text()
        return "SuperNode ID:" in text

    _wait_ready(handle, connected, timeout, handle.name)
    socket_path = handle.info.get("warm_socket")
    if socket_path:
        for launcher in handle.companions:
            while launcher.poll() is None and time.monotonic() < deadline:
                if Path(socket_path).exists():
                    break
                time.sleep(0.2)


# ----------------------------------------------------------------------------- warm ClientApp

_SHIM = """#!{python} -IS
# factoryfed: Flower's SuperExec starts this `flwr-clientapp` for every message. It hands the
# launch (argv, environment, working folder, standard streams) to the SuperNode's warm
# ClientApp launcher (fl_server.deploy), which forks a process that runs Flower's own
# flwr-clientapp entry point; without a launcher it runs Flower's flwr-clientapp itself.
import array, json, os, signal, socket, sys

REAL = {real!r}


def cold():
    os.execv(REAL, [REAL, *sys.argv[1:]])


path = os.environ.get({env!r}, "")
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
except OSError:
    cold()
for fd in (0, 1, 2):
    try:
        os.fstat(fd)
    except OSError:
        os.dup2(os.open(os.devnull, os.O_RDWR), fd)
request = json.dumps(
    {{"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}}
).encode()
fds = array.array("i", [0, 1, 2])
try:
    sock.sendmsg(
        [len(request).to_bytes(4, "big") + request],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
    )
    reply = sock.makefile("rb")
    first = reply.readline().split()
except OSError:
    first = []
if len(first) != 2 or first[0] != b"pid":
    sock.close()
    cold()  # the launcher is gone or refused before starting anything
pid = int(first[1])


def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except OSError:
        pass


for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, forward)
last = reply.readline().split()
sys.exit(int(last[1]) if len(last) == 2 and last[0] == b"exit" else 1)
"""


#: The launcher's own packages (imported by ``python -m fl_server.deploy``): dropped from a
#: forked ClientApp's ``sys.modules`` so that the app imports its own copies from the FAB.
_LAUNCHER_PACKAGES = ("fl_server", "experiments")
_WARM_TMP_PREFIX = "factoryfed-warm-"


def _warm_socket_path(home: Path) -> Path:
    """Where a SuperNode's warm launcher listens (a private folder; Unix socket paths must
    stay under about 100 bytes, so a long home gets a private temporary folder instead)."""
    import tempfile

    folder = home / "warm"
    path = folder / "clientapp.sock"
    if len(str(path)) > 100:
        folder = Path(tempfile.mkdtemp(prefix=_WARM_TMP_PREFIX))
        path = folder / "clientapp.sock"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return path


def write_clientapp_shim(bin_dir: str | Path, real: str | Path | None = None) -> Path:
    """Write the ``flwr-clientapp`` shim into ``bin_dir`` (put it first on the SuperNode's
    PATH); ``real`` is Flower's own ``flwr-clientapp`` (default: the one next to this Python).
    Returns ``bin_dir``."""
    import sys

    folder = Path(bin_dir)
    folder.mkdir(parents=True, exist_ok=True)
    real = Path(real) if real else Path(sys.executable).parent / "flwr-clientapp"
    shim = folder / "flwr-clientapp"
    tmp = shim.with_suffix(".tmp")
    tmp.write_text(_SHIM.format(python=sys.executable, real=str(real), env=WARM_SOCKET_ENV))
    tmp.chmod(0o755)
    os.replace(tmp, shim)
    return folder


def start_warm_clientapp(
    socket_path: str | Path,
    home: str | Path,
    env: Mapping[str, str],
    *,
    watch_pid: int | None = None,
    preload: Sequence[str] = CLIENTAPP_PRELOAD,
) -> Handle:
    """Start a warm ClientApp launcher listening on ``socket_path`` (see the module docstring).

    It imports ``preload`` first and only then listens, so a listening socket means warm. It
    runs in ``env`` (the SuperNode's), in a session of its own, logs to
    ``<home>/clientapp-launcher.log`` and exits when ``watch_pid`` does. Does not wait.
    """
    import sys

    home = Path(home)
    env = dict(env)
    # pyarrow's jemalloc would start a background thread at import; a process that forks
    # must not have threads.
    env["JE_ARROW_MALLOC_CONF"] = "background_thread:false"
    cmd = [
        sys.executable,
        "-m",
        "fl_server.deploy",
        "warm-clientapp",
        "--socket",
        str(socket_path),
        "--preload",
        ",".join(preload),
    ]
    if watch_pid is not None:
        cmd += ["--watch-pid", str(int(watch_pid))]
    return _spawn(
        "clientapp-launcher",
        cmd,
        env,
        home,
        home / "clientapp-launcher.log",
        info={"socket": str(socket_path)},
    )


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _read_request(conn) -> tuple[dict, list[int]]:
    """One launch request: 4-byte length, JSON, and the caller's stdin/stdout/stderr."""
    import json
    import socket

    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    try:
        if len(data) < 4:
            raise ValueError("short request")
        size = int.from_bytes(data[:4], "big")
        body = bytearray(data[4:])
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("truncated request")
            body += chunk
        request = json.loads(bytes(body))
        if len(fds) != 3 or not isinstance(request.get("argv"), list):
            raise ValueError("malformed request")
        return request, list(fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _run_forked_clientapp(request: dict, fds: list[int], keep_closed: list) -> None:
    """In the forked child: become the shim's ``flwr-clientapp`` process; never returns."""
    import sys

    code = 1
    try:
        for obj in keep_closed:
            obj.close()
        for target, fd in zip((0, 1, 2), fds, strict=True):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in request["env"].items()})
        sys.argv = [str(a) for a in request["argv"]]
        # What the launcher imported for itself must not stand in for the app's modules.
        for name in [m for m in sys.modules if m.split(".")[0] in _LAUNCHER_PACKAGES]:
            del sys.modules[name]
        if "numpy" in sys.modules:  # a fresh process would seed it from the OS
            sys.modules["numpy"].random.seed()
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        try:
            flwr_clientapp()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _warm_clientapp_main(socket_path: str, preload: Sequence[str], watch_pid: int | None) -> int:
    """The warm ClientApp launcher's loop (single-threaded: it forks)."""
    import importlib
    import logging
    import select
    import socket
    import sys

    stop = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    t0 = time.monotonic()
    # As a console script's: no working folder on sys.path (`python -m` puts it first).
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = str(Path(sys.executable).parent)
    root_handlers = list(logging.root.handlers)
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a library this app does not use: nothing to warm
            print(f"warm-clientapp: not preloaded {name}: {exc!r}", flush=True)
    # A library's logging.basicConfig at import (Opacus has one) would now pass Flower's
    # DEBUG records on to stderr from the start of every ClientApp; in a cold flwr-clientapp
    # it is installed only once the app is loaded. Keep such handlers to INFO and above.
    for handler in logging.root.handlers:
        if handler not in root_handlers and handler.level == logging.NOTSET:
            handler.setLevel(logging.INFO)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    path = Path(socket_path)
    tmp = path.with_name(path.name + f".{os.getpid()}")
    tmp.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp))
    os.chmod(tmp, 0o600)
    server.listen(16)
    os.replace(tmp, path)
    inode = os.stat(path).st_ino
    print(
        f"warm-clientapp: ready on {path} after {time.monotonic() - t0:.1f} s "
        f"({threads} thread(s)), pid {os.getpid()}",
        flush=True,
    )
    children: dict[int, socket.socket] = {}
    try:
        while not stop:
            if watch_pid is not None and not _pid_alive(watch_pid):
                print(f"warm-clientapp: process {watch_pid} ended; stopping", flush=True)
                break
            ready, _, _ = select.select([server], [], [], 0.1)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is not None:
                    try:
                        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
                    except OSError:
                        pass
                    conn.close()
            if not ready:
                continue
            conn, _ = server.accept()
            conn.settimeout(5)
            try:
                request, fds = _read_request(conn)
            except (OSError, ValueError) as exc:
                print(f"warm-clientapp: bad request: {exc!r}", flush=True)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError as exc:
                print(f"warm-clientapp: fork failed: {exc!r}", flush=True)
                for fd in fds:
                    os.close(fd)
                conn.close()  # the shim runs flwr-clientapp itself
                continue
            if pid == 0:
                _run_forked_clientapp(request, fds, [server, conn, *children.values()])
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(f"pid {pid}\n".encode())
            except OSError:
                pass
            children[pid] = conn
    finally:
        server.close()
        try:
            if os.stat(path).st_ino == inode:  # not a newer launcher's socket
                path.unlink()
            if path.parent.name.startswith(_WARM_TMP_PREFIX):
                path.parent.rmdir()
        except OSError:
            pass
        for conn in children.values():
            conn.close()
    return 0


# ----------------------------------------------------------------------------- MLflow


def start_mlflow(
    home: str | Path,
    host: str = "127.0.0.1",
    port: int | None = DEFAULT_MLFLOW_PORT,
    *,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    allowed_hosts: Sequence[str] = (),
    experiment: str | None = "factoryfed",
    workers: int = 1,
    ready_timeout: float = 90.0,
    extra_env: Mapping[str, str] | None = None,
) -> Handle:
    """Start an MLflow tracking server; returns once it answers, with ``info["uri"]``.

    ``backend_store_uri`` defaults to ``sqlite:///<home>/mlflow.db``; PostgreSQL is
    ``postgresql://user:password@db:5432/mlflow`` (needs ``psycopg2`` in the image).
    Artifacts are served by the server itself (proxied, ``mlflow-artifacts:/``) from
    ``artifacts_destination`` (default ``<home>/artifacts``; ``s3://...`` works too), so
    the ServerApp uploads them over HTTP instead of writing into a local folder.

    ``experiment`` (default ``factoryfed``, the config's ``tracking.experiment``) is created
    on the server if missing, with the server's proxied artifact location. The ServerApp would
    otherwise create it with the local ``tracking.artifact_root`` folder of the machine it
    runs on, which the MLflow server cannot serve.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = int(port) if port else free_port()
    backend = backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = artifacts_destination or str(home / "artifacts")
    env = flower_env(home / "flwr")
    env.pop("FLWR_HOME")  # the quiet flags and PATH only
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else TERM orphans job workers
    env.update(extra_env or {})
    cmd = [
        "mlflow",
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(int(workers)),
    ]
    if allowed_hosts:
        cmd += ["--allowed-hosts", ",".join(allowed_hosts)]
    uri = f"http://{_hostport(connect_host(host), port)}"
    handle = _spawn("mlflow", cmd, env, home, home / "mlflow.log", info={"uri": uri})

    def healthy() -> bool:
        try:
            return https_get(f"{uri}/health", None) == 200
        except OSError:
            return False

    _wait_ready(handle, healthy, ready_timeout, f"mlflow server ({uri})")
    if experiment:
        try:
            ensure_experiment(uri, experiment)
        except BaseException as exc:
            handle.stop()
            if isinstance(exc, Exception):
                raise LaunchError(f"creating experiment {experiment!r} on {uri}: {exc}") from exc
            raise
    return handle


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` on the tracking server, created with its defaults."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


# ----------------------------------------------------------------------------- flwr run


def run_app(
    flwr_home: str | Path,
    app_dir: str | Path,
    run_config: Mapping[str, object],
    on_line: Callable[[str], None] = print,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 3600.0,
    env: Mapping[str, str] | None = None,
) -> int:
    """``flwr run <app_dir> <connection> --stream --run-config FILE``; returns the exit code.

    The run config (``overrides``, ``output-dir``, ``data-dir``, see pyproject's
    ``[tool.flwr.app.config]``) is written as a TOML file so paths and Hydra overrides with
    spaces or quotes survive. Every output line goes to ``on_line``; the run is stopped (its
    process group) after ``timeout`` seconds.
    """
    home = Path(flwr_home)
    proc = start_flwr_run(
        app_dir, connection, run_config, home, env if env is not None else flower_env(home)
    )
    handle = Handle("flwr-run", proc, home / "run_config.toml")
    return stream_to_end(proc, on_line, timeout, lambda: handle.stop(grace=5))


# ----------------------------------------------------------------------------- foreground


def serve_forever(handles: Sequence[Handle]) -> int:
    """Wait on launched processes in the foreground (the CLI and the containers).

    SIGTERM/SIGINT stop every handle by process group; if one process exits by itself the
    others are stopped too. Returns the exit code of the first process that ended.
    """
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while not stopping.is_set():
            ended = [h for h in handles if h.poll() is not None]
            if ended:
                code = int(ended[0].poll() or 0)
                break
            stopping.wait(0.5)
    finally:
        for h in reversed(list(handles)):
            h.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def _main(argv: Sequence[str]) -> int:
    """``python -m fl_server.deploy warm-clientapp --socket PATH [--preload A,B] [--watch-pid N]``
    (started by :func:`start_supernode`; not a user command)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fl_server.deploy")
    sub = parser.add_subparsers(dest="command", required=True)
    warm = sub.add_parser("warm-clientapp", help="a SuperNode's warm ClientApp launcher")
    warm.add_argument("--socket", required=True)
    warm.add_argument("--preload", default=",".join(CLIENTAPP_PRELOAD))
    warm.add_argument("--watch-pid", type=int, default=None)
    args = parser.parse_args(argv)
    preload = [m for m in args.preload.split(",") if m]
    return _warm_clientapp_main(args.socket, preload, args.watch_pid)


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
