"""Launched processes (``fl_server.launch.process``): sessions, the ``/proc`` scan, stopping a
whole process tree by PID, waiting until ready, serving in the foreground."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fl_common.env import CHILD_ENV, QUIET_ENV, set_quiet
from fl_server.launch.process import (
    LaunchError,
    child_env,
    connect_host,
    descendants,
    group_members,
    hostport,
    pid_alive,
    proc_stat,
    serve_forever,
    spawn,
    stop_tree,
    wait_ready,
)

#: A process that starts a child in a session of its own (as Flower's SuperLink starts
#: ``flower-superexec``) and a grandchild in its own group, prints the PIDs, then sleeps; it
#: ignores SIGTERM, so only SIGKILL ends it.
TREE = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
own_session = subprocess.Popen(sleeper, start_new_session=True)
in_group = subprocess.Popen(sleeper)
print(own_session.pid, in_group.pid, flush=True)
time.sleep(600)
"""


def _python(tmp_path, name: str, code: str):
    """``python -c code`` launched like any process of a federation, logging to ``<name>.log``."""
    return spawn(name, [sys.executable, "-c", code], {}, tmp_path, tmp_path / f"{name}.log")


SLEEP = "import time; time.sleep(600)"


def _wait_line(path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if text.endswith("\n"):
            return text
        time.sleep(0.05)
    raise AssertionError(f"nothing written to {path}")


def test_the_quiet_environment_is_defined_once(monkeypatch):
    assert QUIET_ENV == {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    assert QUIET_ENV.items() <= CHILD_ENV.items()
    environ = {"FLWR_TELEMETRY_ENABLED": "1"}
    set_quiet(environ)
    assert environ["FLWR_TELEMETRY_ENABLED"] == "1"  # a value the user set is kept
    assert environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    env = child_env("/some/home")
    assert CHILD_ENV.items() <= env.items()  # a child is always quiet
    assert env["FLWR_HOME"] == "/some/home"
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    monkeypatch.delenv("FLWR_HOME", raising=False)
    assert "FLWR_HOME" not in child_env()


def test_stop_tree_kills_the_group_and_the_descendants_in_other_sessions(tmp_path):
    handle = _python(tmp_path, "tree", TREE)
    own_session, in_group = (int(p) for p in _wait_line(tmp_path / "tree.log").split())
    assert proc_stat(handle.pid).pgid == handle.pid  # it leads a group of its own
    assert {own_session, in_group} <= set(descendants(handle.pid))
    assert set(group_members(handle.pid)) == {handle.pid, in_group}
    assert proc_stat(own_session).pgid == own_session  # out of reach of the group signal
    code = handle.stop(grace=0.5)
    assert code == -signal.SIGKILL  # it ignored SIGTERM
    for pid in (handle.pid, own_session, in_group):
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), pid
    assert handle.stop() == code  # twice is harmless


def test_stop_tree_after_the_process_ended_by_itself(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait(timeout=30)
    assert stop_tree(proc, grace=0) == 0


def test_a_handle_keeps_its_log_from_where_it_started(tmp_path):
    (tmp_path / "echo.log").write_text("an earlier run\n")
    handle = _python(tmp_path, "echo", "print('hello')")
    assert handle.wait(timeout=30) == 0
    assert handle.log_text() == "hello\n"


def test_wait_ready_stops_a_process_that_exits_or_is_never_ready(tmp_path):
    crash = _python(tmp_path, "crash", "raise SystemExit(3)")
    with pytest.raises(LaunchError, match=r"crash exited with code 3; see .*crash.log$"):
        wait_ready(crash, lambda: False, 30, "crash")
    sleeper = _python(tmp_path, "sleeper", SLEEP)
    with pytest.raises(LaunchError, match="was not ready within 1 s"):
        wait_ready(sleeper, lambda: False, 1, "sleeper")
    assert sleeper.poll() is not None  # stopped on the way out
    ready = _python(tmp_path, "ready", SLEEP)
    try:
        wait_ready(ready, lambda: True, 30, "ready")
        assert ready.poll() is None
    finally:
        ready.stop(grace=1)


def test_serve_forever_stops_the_others_when_one_ends(tmp_path):
    quick = _python(tmp_path, "quick", "raise SystemExit(4)")
    slow = _python(tmp_path, "slow", SLEEP)
    before = signal.getsignal(signal.SIGTERM)
    assert serve_forever([slow, quick]) == 4
    assert slow.poll() is not None
    assert signal.getsignal(signal.SIGTERM) is before


def test_serve_forever_stops_everything_on_sigterm(tmp_path):
    slow = _python(tmp_path, "slow", SLEEP)
    before = signal.getsignal(signal.SIGTERM)

    def terminate_once_served() -> None:
        while signal.getsignal(signal.SIGTERM) is before:  # serve_forever not listening yet
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_once_served, daemon=True)
    sender.start()
    assert serve_forever([slow]) == 0
    sender.join(timeout=10)
    assert slow.poll() is not None
    assert signal.getsignal(signal.SIGTERM) is before


def test_addresses():
    assert connect_host("0.0.0.0") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("link.example.com") == "link.example.com"
    assert hostport("::1", 9093) == "[::1]:9093"
    assert hostport("127.0.0.1", 9093) == "127.0.0.1:9093"
