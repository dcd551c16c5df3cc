"""``flwr run <app> <connection> --stream``: start it, pass its output on, stop it by PID.

The same route serves simulation (:mod:`fl_server.launch.simulation`) and deployment
(:func:`run_app` against a SuperLink of :mod:`fl_server.launch.flower`).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fl_server.launch.flower_config import DEFAULT_CONNECTION, write_toml
from fl_server.launch.process import child_env, stop_tree


def start_flwr_run(
    app_dir: str | Path,
    target: str,
    run_config: Mapping[str, object],
    home: Path,
    env: Mapping[str, str],
    rc_name: str = "run_config.toml",
    extra_args: Sequence[str] = (),
) -> subprocess.Popen:
    """Start ``flwr run <app_dir> <target> --stream --run-config FILE`` in a session of its own.

    The run config is written to ``home/<rc_name>`` as TOML, so paths and Hydra overrides with
    spaces or quotes survive; stdout and stderr come back together, as text, on ``stdout``.
    """
    rc_file = write_toml(Path(home) / rc_name, run_config)
    return subprocess.Popen(
        [
            "flwr",
            "run",
            str(app_dir),
            target,
            "--stream",
            "--run-config",
            str(rc_file),
            *extra_args,
        ],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        cwd=home,
    )


def stream_to_end(
    proc: subprocess.Popen, on_line: Callable[[str], None], timeout: float, stop: Callable[[], None]
) -> int:
    """Pass every output line of ``proc`` to ``on_line`` until it exits; returns its exit code.

    ``stop`` ends it (and what it started) after ``timeout`` seconds, which then raises
    :class:`TimeoutError`, or if it is still running when streaming ends (an error).
    """
    expired = threading.Event()

    def stop_on_timeout() -> None:
        expired.set()
        stop()

    watchdog = threading.Timer(timeout, stop_on_timeout)
    watchdog.daemon = True
    watchdog.start()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            stop()
    if expired.is_set():
        raise TimeoutError(f"flwr run exceeded {timeout:.0f} s and was stopped")
    return code


def run_app(
    flwr_home: str | Path,
    app_dir: str | Path,
    run_config: Mapping[str, object],
    on_line: Callable[[str], None] = print,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 3600.0,
    env: Mapping[str, str] | None = None,
    *,
    extra_args: Sequence[str] = (),
    grace: float = 5.0,
) -> int:
    """``flwr run <app_dir> <connection> --stream --run-config FILE``; returns the exit code.

    The run config (``overrides``, ``output-dir``, ``data-dir``, see pyproject's
    ``[tool.flwr.app.config]``) is written as a TOML file so paths and Hydra overrides with
    spaces or quotes survive. Every output line goes to ``on_line``; after ``timeout`` seconds
    the run is stopped (its process tree, SIGKILL after ``grace`` seconds) and
    :class:`TimeoutError` raised.
    """
    home = Path(flwr_home)
    proc = start_flwr_run(
        app_dir,
        connection,
        run_config,
        home,
        env if env is not None else child_env(home),
        extra_args=extra_args,
    )
    return stream_to_end(proc, on_line, timeout, lambda: stop_tree(proc, grace))
