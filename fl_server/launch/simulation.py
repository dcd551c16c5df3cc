"""Flower's simulation engine (Ray) through the supported CLI route, on loopback.

``flwr run <app> <federation> --stream`` against a SuperLink started in simulation mode. We start
that SuperLink ourselves (the same command ``flwr run ... local`` would start detached) so it
binds 127.0.0.1 on free ports, lives in a Flower home of its own, and is stopped by its PID when
the run ends, whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from fl_server.launch.flower_config import config_args, write_connection
from fl_server.launch.flwr_run import run_app
from fl_server.launch.process import Handle, child_env, free_port, spawn_healthy


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
        self.handle: Handle | None = None
        self.federation = "factoryfed-sim"

    @property
    def env(self) -> dict[str, str]:
        env = child_env(self.home)
        # Each simulated factory gets `client_cpus` Ray CPUs: keep torch's threads within them
        # so concurrent factories do not oversubscribe the machine.
        threads = str(max(1, int(self.client_cpus)))
        env.setdefault("OMP_NUM_THREADS", threads)
        env.setdefault("MKL_NUM_THREADS", threads)
        return env

    def start(self, timeout: float = 60.0) -> None:
        """Start the SuperLink and wait until its HTTP health endpoint answers."""
        address = f"127.0.0.1:{self.port}"
        write_connection(self.home, address, self.federation, insecure=True)
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
        self.handle = spawn_healthy(
            "superlink",
            cmd,
            self.env,
            self.home,
            self.home / "superlink.log",
            f"http://{address}/health",
            timeout=timeout,
            what="flower-superlink",
        )

    def stop(self, grace: float = 15.0) -> None:
        """Stop the SuperLink and everything it started (Ray starts some of its daemons in
        sessions of their own), by PID."""
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.stop(grace)

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
        federation = {"num-supernodes": self.num_supernodes, "client-resources-num-cpus": cpus}
        return run_app(
            self.home,
            app_dir,
            run_config,
            on_line,
            self.federation,
            timeout,
            self.env,
            extra_args=("--federation-config", config_args(federation)),
            grace=0,
        )

    def __enter__(self) -> SimulationSuperLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
