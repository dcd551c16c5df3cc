"""Launched processes: start each in a session of its own, wait until it is usable, stop its tree.

Every long-running process the project starts (SuperLink, SuperNode, warm ClientApp launcher,
MLflow server, ``flwr run``) goes through :func:`spawn` and comes back as a :class:`Handle`.
The process leads a new session, so its process group can be signalled as a whole; Flower and
Ray start some helpers in sessions of their own, so :func:`stop_tree` also kills every
descendant it found in ``/proc`` (before and after the group was told to stop). Processes are
only ever stopped by their PID or their group, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fl_common.env import CHILD_ENV


class LaunchError(RuntimeError):
    """A launched process exited or never became ready; the message names its log."""


# ----------------------------------------------------------------------------- /proc


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` this module reads."""

    pid: int
    state: str
    ppid: int
    pgid: int


def proc_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` of one process (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: split after its end.
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return ProcStat(int(pid), fields[0], int(fields[1]), int(fields[2]))


def processes() -> list[ProcStat]:
    """Every process on this machine (one scan of Linux ``/proc``)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                out.append(stat)
    return out


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for stat in processes():
        children.setdefault(stat.ppid, []).append(stat.pid)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid``."""
    return [s.pid for s in processes() if s.pgid == pgid and s.state != "Z"]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is neither a zombie nor dead."""
    stat = proc_stat(pid)
    return stat is not None and stat.state not in ("Z", "X")


# ----------------------------------------------------------------------------- stopping


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid`` while it still has live members.

    A group id is not reused while the group exists, so a group with members is still ours.
    """
    if not group_members(pgid):
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_tree(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """Stop a process started in a session of its own, with everything it started.

    SIGTERM to its process group, up to ``grace`` seconds to exit, then SIGKILL to what is left
    of the group and of its process tree (collected before and after the SIGTERM). Returns the
    exit code (None if it could not be collected). Safe to call twice, and after the process
    exited by itself.
    """
    pgid = proc.pid
    alive = proc.returncode is None  # not reaped yet: its PID cannot have been reused
    tree = descendants(proc.pid) if alive else []
    if proc.poll() is None:
        signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if alive:
        tree += descendants(proc.pid)
    signal_group(pgid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


# ----------------------------------------------------------------------------- handles


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
        """:func:`stop_tree` of the process, then of its companions; returns its exit code."""
        code = stop_tree(self.process, grace)
        for companion in self.companions:
            companion.stop(grace=grace)
        return code

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """``os.environ`` plus the quiet flags, this interpreter's ``bin`` first on PATH and, when
    given, a private ``FLWR_HOME``.

    Flower's SuperLink and SuperNode start ``flower-superexec`` (and it the app processes) by
    name, so the venv's ``bin`` must come first on PATH.
    """
    env = dict(os.environ)
    env.update(CHILD_ENV)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def spawn(
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


def wait_ready(handle: Handle, probe: Callable[[], bool], timeout: float, what: str) -> None:
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


def spawn_healthy(
    name: str,
    cmd: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    health_url: str,
    *,
    ca_cert: str | Path | None = None,
    timeout: float = 60.0,
    what: str | None = None,
    info: Mapping[str, str] | None = None,
) -> Handle:
    """:func:`spawn` a server, then :func:`wait_ready` until ``health_url`` answers 200
    (verified against ``ca_cert`` over https); ``what`` names it in errors."""
    handle = spawn(name, cmd, env, cwd, log_path, info)
    what = what or f"{name} ({health_url})"
    wait_ready(handle, lambda: answers(health_url, ca_cert), timeout, what)
    return handle


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


# ----------------------------------------------------------------------------- network


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bind_port(host: str, port: int | None) -> tuple[int, str]:
    """The port to bind (``None`` or 0: a free one) and the ``host:port`` to dial it at."""
    port = int(port) if port else free_port()
    return port, hostport(connect_host(host), port)


def connect_host(host: str) -> str:
    """The address to dial for a bind address (``0.0.0.0`` and ``::`` mean loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def https_get(url: str, ca_cert: str | Path | None, timeout: float = 2.0) -> int:
    """Status of a GET to ``url``, verifying TLS against ``ca_cert`` when it is https."""
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
        return int(resp.status)


def answers(url: str, ca_cert: str | Path | None = None, timeout: float = 2.0) -> bool:
    """Whether a GET to ``url`` answers 200 (a health probe for :func:`wait_ready`)."""
    try:
        return https_get(url, ca_cert, timeout) == 200
    except (OSError, ssl.SSLError):
        return False
