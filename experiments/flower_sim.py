"""Running the Flower app on Flower's simulation engine through the supported CLI route.

``flwr run <app> <federation> --stream`` against a SuperLink started in simulation mode. We start
that SuperLink ourselves (the same command ``flwr run ... local`` would start detached) so it
binds 127.0.0.1 on free ports, lives in a Flower home of its own, and is stopped by its PID when
the run ends, whatever happens.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: Environment every Flower/MLflow process gets: no telemetry, no update checks.
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """os.environ plus a private FLWR_HOME, the quiet flags, and this venv's bin on PATH.

    SuperLink starts ``flower-superexec`` and friends by name, so the interpreter's bin folder
    must come first on PATH.
    """
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` in the process tree (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (it was started in a new session)."""
    try:
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    except ProcessLookupError:
        return
    proc.wait(timeout=10)


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
    rc_file = Path(home) / rc_name
    rc_file.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
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


class SimulationSuperLink:
    """A SuperLink in simulation mode on loopback, owned (and stopped) by this process.

    Parameters
    ----------
    flwr_home : Path
        Flower home for the SuperLink and the CLI (config.toml, logs, installed app bundles).
    num_supernodes : int
        Number of simulated factories.
    client_cpus : float
        Ray CPU resources per simulated factory (Flower's default of 2 serialises a 2-core box).
    """

    def __init__(self, flwr_home: Path, num_supernodes: int, client_cpus: float = 1) -> None:
        self.home = Path(flwr_home)
        self.num_supernodes = int(num_supernodes)
        self.client_cpus = client_cpus
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.federation = "factoryfed-sim"

    @property
    def env(self) -> dict[str, str]:
        env = flower_env(self.home)
        # Each simulated factory gets `client_cpus` Ray CPUs: keep torch's threads within them
        # so concurrent factories do not oversubscribe the machine.
        threads = str(max(1, int(self.client_cpus)))
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
        return env

    def _write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{self.federation}"\n\n'
            f"[superlink.{self.federation}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until its HTTP health endpoint answers."""
        self._write_config()
        log = open(self.home / "superlink.log", "ab")  # noqa: SIM115 - closed with the process
        cmd = [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{free_port()}",
            "--fleet-api-address",
            f"127.0.0.1:{free_port()}",
            "--health-server-address",
            f"127.0.0.1:{free_port()}",
            "--database",
            ":flwr-in-memory:",
            # The app runs in this environment; never let the SuperLink pip/uv-install its
            # dependencies into a fresh one (that pulls a multi-GB CUDA torch).
            "--disable-runtime-dependency-installation",
        ]
        self.process = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.home,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.home / 'superlink.log'}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"flower-superlink did not become healthy within {timeout:.0f} s")

    def stop(self, grace: float = 15.0) -> None:
        """Stop the SuperLink and everything it started, by PID.

        SIGTERM to its process group first, then SIGKILL to whatever is left of the group and
        of its process tree (Ray starts some of its daemons in sessions of their own).
        """
        proc, self.process = self.process, None
        if proc is None:
            return
        tree = descendants(proc.pid)
        if proc.poll() is None:
            pgid = os.getpgid(proc.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=5)
        for pid in tree + descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def run_app(
        self,
        app_dir: Path,
        run_config: Mapping[str, object],
        on_line: Callable[[str], None],
        timeout: float = 3600.0,
    ) -> int:
        """``flwr run <app_dir> <federation> --stream`` with ``run_config``; returns its exit code.

        Every output line goes to ``on_line``. The run config is passed as a TOML file so paths
        with spaces or quotes survive.
        """
        cpus = int(self.client_cpus) if float(self.client_cpus).is_integer() else self.client_cpus
        federation_config = f"num-supernodes={self.num_supernodes} client-resources-num-cpus={cpus}"
        proc = start_flwr_run(
            app_dir,
            self.federation,
            run_config,
            self.home,
            self.env,
            extra_args=("--federation-config", federation_config),
        )
        return stream_to_end(proc, on_line, timeout, lambda: _kill_group(proc))

    def __enter__(self) -> SimulationSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
