"""The ``flwr-clientapp`` that a SuperNode with a warm launcher runs for every message.

Flower's SuperExec starts ``flwr-clientapp`` by name for each message; with a warm launcher the
first one on the SuperNode's PATH is a tiny file
(:func:`fl_server.launch.warm_clientapp.write_clientapp_shim`) that runs
:func:`main` in an isolated interpreter (``python -IS``: no site packages, nothing but the
standard library and this module). :func:`main` hands the launch (argv, environment, working
folder, standard streams) to the launcher over its Unix socket (:data:`WARM_SOCKET_ENV`),
waits for the forked ClientApp's exit code and exits with it; signals are passed on to the
fork. Without a launcher (not started yet, stopped, crashed, refused) it becomes Flower's own
``flwr-clientapp`` with ``execv``: a factory keeps answering, only without the warm start.

Wire format: one request (4-byte big-endian length, then JSON ``{"argv", "cwd", "env"}``, with
the caller's stdin/stdout/stderr passed as ``SCM_RIGHTS``), answered by the lines
``pid <pid>`` once forked and ``exit <code>`` when the fork ended.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys

#: The environment variable that points the shim at its launcher's socket.
WARM_SOCKET_ENV = "FACTORYFED_CLIENTAPP_SOCKET"

def main(real: str) -> None:
    """Run this launch in the warm launcher's fork, or ``execv`` Flower's ``real`` one; never
    returns (exits with the ClientApp's code, or becomes Flower's process)."""

    def cold() -> None:
        os.execv(real, [real, *sys.argv[1:]])

    path = os.environ.get(WARM_SOCKET_ENV, "")
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
    request = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
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

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    last = reply.readline().split()
    sys.exit(int(last[1]) if len(last) == 2 and last[0] == b"exit" else 1)
