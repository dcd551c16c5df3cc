"""Helpers shared by the deployment tests (``test_deployment.py``, ``test_faults.py``).

Everything binds 127.0.0.1 and every process is started in a session of its own and stopped by
PID / process group. :class:`LoopbackFederation` is the operator and the factories of a small
deployment on one machine (TLS SuperLink with SuperNode authentication, MLflow over HTTP, one
SuperNode per factory) built from :mod:`fl_server.launch`'s launchers; :class:`FlwrRun` is a
``flwr run --stream`` in the background whose output lines are kept with their arrival time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from fl_server.launch import flower
from fl_server.launch.flower_config import DEFAULT_CONNECTION
from fl_server.launch.flwr_run import start_flwr_run
from fl_server.launch.mlflow_server import start_mlflow
from fl_server.launch.process import Handle, LaunchError, child_env, descendants, stop_tree
from fl_server.provision import Provisioned, provision, register_factories

REPO = Path(__file__).resolve().parent.parent
IDS = ["factory_000", "factory_001", "factory_002"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: Flower's log lines carry ANSI colours; strip them before matching.
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.3):
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill(pid: int) -> None:
    """SIGKILL a process started in a session of its own, and its group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid``, its process group and every descendant (a crash of that machine).

    Flower's SuperLink and SuperNode start ``flower-superexec`` (and it the app processes), some
    in sessions of their own, so the group alone is not the whole tree. Returns the PIDs hit.
    """
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGSTOP)  # freeze first: nothing may react to its parent dying
        except ProcessLookupError:
            pass
    kill(pid)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def crash(handle: Handle) -> list[int]:
    """SIGKILL a launched process with its whole tree and its companions' (a SuperNode's warm
    ClientApp launcher and the ClientApps it forked): the machine it runs on died."""
    hit = []
    for h in [handle, *handle.companions]:
        if h.poll() is None:
            hit += kill_tree(h.pid)
    return hit


def count_log_lines(text: str, message: str) -> int:
    """How many of Flower's own log lines (``INFO :  <message>``) hold ``message``.

    Libraries that call ``logging.basicConfig`` (Opacus) repeat Flower's records in another
    format; those copies are not counted.
    """
    rx = re.compile(r"^(?:INFO|DEBUG|WARNING|ERROR)\s*(?:\S+ \S+)?:\s+" + re.escape(message), re.M)
    return len(rx.findall(ANSI.sub("", text)))


def plain_http_fails(address: str) -> str:
    """What a plain-HTTP GET to the TLS port gives (never a 200)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status != 200, "plain HTTP reached the TLS SuperLink"
        return f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


class FlwrRun:
    """``flwr run <app> <connection> --stream --run-config FILE`` in the background.

    Output lines (ANSI colours removed) are kept in :attr:`lines` with their arrival time
    (``time.monotonic()``) in :attr:`times`. The process has a session of its own; :meth:`stop`
    ends it by process group.
    """

    def __init__(
        self,
        flwr_home: Path,
        run_config: Mapping[str, object],
        env: Mapping[str, str],
        app_dir: Path = REPO,
        connection: str = DEFAULT_CONNECTION,
        rc_name: str = "run_config.toml",
    ) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []
        self.started = time.monotonic()
        self.process = start_flwr_run(app_dir, connection, run_config, flwr_home, env, rc_name)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.times.append(time.monotonic())
            self.lines.append(ANSI.sub("", line.rstrip("\n")))

    def text(self) -> str:
        return "\n".join(self.lines)

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        """Arrival time and match of the first line matching ``pattern``, or None."""
        rx = re.compile(pattern)
        for t, line in zip(list(self.times), list(self.lines), strict=False):
            m = rx.search(line)
            if m:
                return t, m
        return None

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float) -> int:
        """Exit code; stops the run and raises AssertionError when it takes longer."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"flwr run did not finish within {timeout:.0f} s:\n{self.text()[-5000:]}"
            ) from None
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        stop_tree(self.process, grace=0)
        self._reader.join(timeout=10)


class Site:
    """What a module of deployment tests shares: provisioning, the factories' data, MLflow.

    ``root`` holds ``bundles/`` (CA, operator folder, factory bundles), ``data/`` (the
    factories' Parquet files and the server's holdout files, made from ``overrides``) and
    ``mlflow/`` (the tracking server, started by :meth:`start_mlflow`).
    """

    def __init__(
        self,
        root: Path,
        overrides: Sequence[str],
        ids: Sequence[str] = IDS,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.ids = list(ids)
        self.overrides = list(overrides)
        self.env = dict(ONE_THREAD if env is None else env)
        self.mlflow: Handle | None = None
        self.bundles: Provisioned = provision(self.root / "bundles", self.ids)
        cfg = finalize(
            compose_config(self.overrides), base=self.root, output_dir=self.root / "unused-out"
        )
        cfg.data_dir = str(self.root / "data")
        self.data_dir, _ = ensure_data(cfg)

    def start_mlflow(self) -> str:
        self.mlflow = start_mlflow(self.root / "mlflow", port=None, extra_env=self.env)
        return self.mlflow.info["uri"]

    @property
    def tracking_uri(self) -> str:
        assert self.mlflow is not None, "start_mlflow() first"
        return self.mlflow.info["uri"]

    def data_path(self, fid: str) -> Path:
        return self.data_dir / f"factory_{self.ids.index(fid):03d}.parquet"

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def metric_steps(self, run_id: str, key: str) -> dict[int, float]:
        """``{step: value}`` of one metric of an MLflow run (over HTTP), one value per step."""
        history = self.client().get_metric_history(run_id, key)
        steps = [m.step for m in history]
        assert len(steps) == len(set(steps)), f"{key} logged twice for a step: {sorted(steps)}"
        return {m.step: m.value for m in history}

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.stop(grace=5)


class LoopbackFederation:
    """One deployment of a :class:`Site`'s factories: a SuperLink, SuperNodes and runs.

    ``root`` holds ``operator/`` (the SuperLink's home: Flower home, state database
    ``superlink.db``, log) and one folder per factory (its SuperNode's home and its privacy
    ledger ``<factory>/ledger/privacy.json``), so every federation has its own state and
    ledgers. Every process started here is stopped by :meth:`close`.
    """

    def __init__(self, site: Site, root: Path) -> None:
        self.site = site
        self.root = Path(root)
        self.ids = site.ids
        self.env = dict(site.env)
        self.home = self.root / "operator"
        self.handles: list[Handle] = []
        self.nodes: dict[str, Handle] = {}
        self.superlink: Handle | None = None
        self.runs: list[FlwrRun] = []

    # -- operator ----------------------------------------------------------------------------
    def start_superlink(self, port: int | None = None, register: bool = True) -> Handle:
        """The SuperLink (TLS, SuperNode auth) with its state in ``operator/superlink.db``.

        A restart keeps the previous port (the factories dial it). ``register`` registers every
        factory's key (a key the state already holds counts as registered).
        """
        if port is None and self.superlink is not None:
            port = int(self.superlink.info["address"].rsplit(":", 1)[1])
        self.superlink = flower.start_superlink(
            self.site.bundles.operator_dir, self.home, port=port, extra_env=self.env
        )
        self.handles.append(self.superlink)
        if register:
            regs = register_factories(
                self.site.bundles.operator_dir,
                self.superlink.info["connection"],
                self.superlink.env,
            )
            bad = [r for r in regs if not r.ok]
            assert not bad, bad
        return self.superlink

    @property
    def address(self) -> str:
        assert self.superlink is not None
        return self.superlink.info["address"]

    # -- factories ---------------------------------------------------------------------------
    def ledger_path(self, fid: str) -> Path:
        return self.root / fid / "ledger" / "privacy.json"

    def start_node(
        self,
        fid: str,
        data_path: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        connect_timeout: float | None = 90,
        **kwargs,
    ) -> Handle:
        """A factory's SuperNode from its bundle (same home and ledger path on every start)."""
        node = flower.start_supernode(
            self.site.bundles.factories[fid].path,
            self.root / fid,
            data_path or self.site.data_path(fid),
            self.ledger_path(fid),
            superlink=self.address,
            port=None,
            extra_env={**self.env, **(extra_env or {})},
            **kwargs,
        )
        self.handles.append(node)
        self.nodes[fid] = node
        if connect_timeout:
            flower.wait_connected(node, connect_timeout)
        return node

    def flwr_json(self, *command: str) -> dict | None:
        """``flwr <command> <connection> --format json`` against the SuperLink, parsed (None
        when the CLI printed no JSON document)."""
        assert self.superlink is not None
        proc = subprocess.run(
            ["flwr", *command, self.superlink.info["connection"], "--format", "json"],
            env=self.superlink.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            return json.loads(proc.stdout[proc.stdout.find("{") :])
        except ValueError:
            return None

    def node_status(self, node_id: int) -> str | None:
        """A node's status at the SuperLink (``online``, ``offline``...): ``flwr supernode ls``."""
        nodes = (self.flwr_json("supernode", "ls") or {}).get("nodes", [])
        return next((n["status"] for n in nodes if int(n["node-id"]) == node_id), None)

    @staticmethod
    def node_id(handle: Handle) -> int:
        """The node id a SuperNode's log reports."""
        return int(re.findall(r"SuperNode ID: (\d+)", handle.log_text())[-1])

    def restart_node(
        self, fid: str, timeout: float = 120, node_id: int | None = None, **kwargs
    ) -> tuple[Handle, int]:
        """Start a factory's SuperNode again until the SuperLink accepts it.

        After a crash the SuperLink keeps the node ``online`` until its heartbeats have been
        missing for 2 x 30 s and refuses to activate it again before that (the SuperNode exits
        with ``Failed to activate SuperNode``, the SuperLink logs ``could not be activated``).
        With ``node_id`` the first start waits until ``flwr supernode ls`` no longer shows the
        node online. Returns the connected handle and the number of starts.
        """
        deadline = time.monotonic() + timeout
        if node_id is not None:
            wait_for(
                lambda: self.node_status(node_id) not in ("online", None),
                timeout,
                f"the SuperLink to see node {node_id} offline",
                interval=2,
            )
        attempt = 0
        while True:
            attempt += 1
            node = self.start_node(fid, connect_timeout=None, **kwargs)
            try:
                flower.wait_connected(node, max(5.0, deadline - time.monotonic()))
                return node, attempt
            except LaunchError:
                if (
                    "Failed to activate SuperNode" not in node.log_text()
                    or time.monotonic() > deadline
                ):
                    raise
            time.sleep(3)

    def start_nodes(self, **kwargs) -> None:
        for fid in self.ids:
            self.start_node(fid, connect_timeout=None, **kwargs)
        for fid in self.ids:
            flower.wait_connected(self.nodes[fid], 90)

    # -- runs --------------------------------------------------------------------------------
    def run_config(self, output_dir: Path, overrides: Sequence[str]) -> dict:
        return {
            "overrides": " ".join([*overrides, f"tracking.uri={self.site.tracking_uri}"]),
            "output-dir": str(output_dir),
            "data-dir": str(self.site.data_dir),
        }

    def start_run(self, output_dir: Path, overrides: Sequence[str]) -> FlwrRun:
        """``flwr run`` of the project app on this SuperLink, in the background."""
        env = child_env(self.home / "flwr")
        env.update(self.env)
        run = FlwrRun(
            self.home / "flwr",
            self.run_config(output_dir, overrides),
            env,
            rc_name=f"run_config_{len(self.runs)}.toml",
        )
        self.runs.append(run)
        return run

    def close(self) -> None:
        for run in self.runs:
            run.stop()
        for handle in reversed(self.handles):
            handle.stop(grace=5)
