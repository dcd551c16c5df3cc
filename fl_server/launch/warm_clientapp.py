"""A SuperNode's warm ClientApp launcher: import the heavy libraries once, fork per message.

Flower 1.42 runs every message a factory receives in a fresh ``flwr-clientapp`` process (it has
no long-lived ClientApp: ``flwr-clientapp`` serves one task token and exits, with
``--isolation process`` too), which spends seconds importing torch, Opacus, scikit-learn and
pandas for under a second of training. The launcher is a long-lived process beside the
SuperNode that has imported those libraries once (:data:`CLIENTAPP_PRELOAD`) and forks for each
message. The ``flwr-clientapp`` shim (:mod:`fl_server.launch.clientapp_shim`), first on the
SuperNode's PATH, hands each launch Flower's SuperExec makes to it, so every message still runs
Flower's own ``flwr-clientapp`` entry point in a process of its own that starts from a clean
state and loads the app from the FAB; only the import work is shared. Without the launcher
(not started yet, stopped, crashed) the shim runs Flower's ``flwr-clientapp`` itself. The
launcher never imports the app's own packages. ``experiments/bench_deploy_overhead.py``
measures what it saves per round.

Run as ``python -m fl_server.launch.warm_clientapp --socket PATH [--preload A,B]
[--watch-pid N]`` (started by :func:`start_warm_clientapp`; not a user command).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_server.launch.clientapp_shim import WARM_SOCKET_ENV
from fl_server.launch.process import Handle, pid_alive, spawn

__all__ = [
    "CLIENTAPP_PRELOAD",
    "WARM_SOCKET_ENV",
    "main",
    "start_warm_clientapp",
    "warm_socket_path",
    "write_clientapp_shim",
]

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
#: The launcher's own packages (imported by ``python -m fl_server.launch.warm_clientapp``):
#: dropped from a forked ClientApp's ``sys.modules`` so that the app imports its own copies
#: from the FAB.
_LAUNCHER_PACKAGES = ("fl_server", "fl_common")
_WARM_TMP_PREFIX = "factoryfed-warm-"

#: The file written as ``flwr-clientapp``; falls back to Flower's own when this module is gone.
_SHIM = """#!{python} -IS
# factoryfed: Flower's SuperExec starts this `flwr-clientapp` for every message; it hands the
# launch to the SuperNode's warm ClientApp launcher (fl_server.launch.clientapp_shim).
import os, sys
REAL = {real!r}
sys.path.insert(0, {root!r})
try:
    from fl_server.launch.clientapp_shim import main
except ImportError:
    os.execv(REAL, [REAL, *sys.argv[1:]])
main(REAL)
"""


def write_clientapp_shim(bin_dir: str | Path, real: str | Path | None = None) -> Path:
    """Write the ``flwr-clientapp`` shim into ``bin_dir`` (put it first on the SuperNode's
    PATH); ``real`` is Flower's own ``flwr-clientapp`` (default: the one next to this Python).
    Returns ``bin_dir``."""
    folder = Path(bin_dir)
    folder.mkdir(parents=True, exist_ok=True)
    real = Path(real) if real else Path(sys.executable).parent / "flwr-clientapp"
    root = Path(__file__).resolve().parents[2]  # the folder that holds the fl_server package
    shim = folder / "flwr-clientapp"
    tmp = shim.with_suffix(".tmp")
    tmp.write_text(_SHIM.format(python=sys.executable, real=str(real), root=str(root)))
    tmp.chmod(0o755)
    os.replace(tmp, shim)
    return folder


def warm_socket_path(home: Path) -> Path:
    """Where a SuperNode's warm launcher listens (a private folder; Unix socket paths must
    stay under about 100 bytes, so a long home gets a private temporary folder instead)."""
    folder = home / "warm"
    path = folder / "clientapp.sock"
    if len(str(path)) > 100:
        folder = Path(tempfile.mkdtemp(prefix=_WARM_TMP_PREFIX))
        path = folder / "clientapp.sock"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    return path


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
    home = Path(home)
    env = dict(env)
    # pyarrow's jemalloc would start a background thread at import; a process that forks
    # must not have threads.
    env["JE_ARROW_MALLOC_CONF"] = "background_thread:false"
    cmd = [
        sys.executable,
        "-m",
        "fl_server.launch.warm_clientapp",
        "--socket",
        str(socket_path),
        "--preload",
        ",".join(preload),
    ]
    if watch_pid is not None:
        cmd += ["--watch-pid", str(int(watch_pid))]
    return spawn(
        "clientapp-launcher",
        cmd,
        env,
        home,
        home / "clientapp-launcher.log",
        info={"socket": str(socket_path)},
    )


# ----------------------------------------------------------------------------- the launcher


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One launch request: 4-byte length, JSON, and the caller's stdin/stdout/stderr."""
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


def _preload(names: Sequence[str]) -> None:
    """Import ``names`` (skipping what this app does not use) without changing what logs."""
    root_handlers = list(logging.root.handlers)
    for name in names:
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


def _listen(path: Path) -> socket.socket:
    """A Unix socket only this user may use, moved into place once it listens."""
    tmp = path.with_name(path.name + f".{os.getpid()}")
    tmp.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp))
    os.chmod(tmp, 0o600)
    server.listen(16)
    os.replace(tmp, path)
    return server


def _reap(children: dict[int, socket.socket]) -> None:
    """Tell each waiting shim the exit code of its ClientApp that ended."""
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            conn.close()


def serve(socket_path: str, preload: Sequence[str], watch_pid: int | None) -> int:
    """The launcher's loop (single-threaded: it forks); returns its exit code."""
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    t0 = time.monotonic()
    # As a console script's: no working folder on sys.path (`python -m` puts it first).
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = str(Path(sys.executable).parent)
    _preload(preload)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    path = Path(socket_path)
    server = _listen(path)
    inode = os.stat(path).st_ino
    print(
        f"warm-clientapp: ready on {path} after {time.monotonic() - t0:.1f} s "
        f"({threads} thread(s)), pid {os.getpid()}",
        flush=True,
    )
    children: dict[int, socket.socket] = {}
    try:
        while not stop:
            if watch_pid is not None and not pid_alive(watch_pid):
                print(f"warm-clientapp: process {watch_pid} ended; stopping", flush=True)
                break
            ready, _, _ = select.select([server], [], [], 0.1)
            _reap(children)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fl_server.launch.warm_clientapp --socket PATH [--preload A,B]
    [--watch-pid N]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m fl_server.launch.warm_clientapp",
        description="a SuperNode's warm ClientApp launcher",
    )
    parser.add_argument("--socket", required=True)
    parser.add_argument("--preload", default=",".join(CLIENTAPP_PRELOAD))
    parser.add_argument("--watch-pid", type=int, default=None)
    args = parser.parse_args(argv)
    return serve(args.socket, [m for m in args.preload.split(",") if m], args.watch_pid)


if __name__ == "__main__":
    sys.exit(main())
