"""The container images, built and run: the compose demo's federation through podman.

``docker/build-images.sh`` (``make images``) builds ``factoryfed-factory`` and
``factoryfed-operator``; where no registry answers it makes a Debian bookworm base with
debootstrap. A second build in the same run reuses podman's layer cache. The images are checked
for what a factory's IT asks (non-root user, health checks, no MLflow, Ray, tests, data or keys
in the factory image), then ``docker/compose.yaml`` runs under ``podman-compose``: MLflow and the
SuperLink (TLS, SuperNode authentication), three factories that each see only their own bundle,
data file and privacy-ledger volume, and a ``flwr run`` of two rounds from the SuperLink's
container. MLflow, reached from this machine on a loopback port, holds the finished run; a
factory container that is removed and created again finds its privacy ledger where it was.

Every port is published on 127.0.0.1 only, under a project name of its own; the containers and
volumes are removed at the end, the images kept for the next build. Without podman the test is
skipped with the install command; under CI (``CI=true``) it fails instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import ci_helpers
import pytest
from deployment_helpers import IDS, REPO, wait_for

from fl_server.launch.process import free_port
from fl_server.provision import provision

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

INSTALL = "apt-get install -y podman runc debootstrap"
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
IMAGES = {"factory": "localhost/factoryfed-factory:latest",
          "operator": "localhost/factoryfed-operator:latest"}  # fmt: skip
TASK, SEED = "molding_quality", 0
OVERRIDES = [
    f"task={TASK}",
    f"federation.num_factories={len(IDS)}",
    "federation.num_rounds=2",
    "federation.min_factories=3",
    "federation.round_timeout=300",
    "contribution=exact",
    "tracking.register_model=false",
    f"seed={SEED}",
    "tracking.uri=http://mlflow:5000",
]
LEDGER = "/srv/factoryfed/ledger/privacy-ledger.json"


def _tools() -> tuple[str, str]:
    """podman and podman-compose; fail under CI, else skip, when one is missing."""
    podman = shutil.which("podman")
    compose = Path(sys.executable).parent / "podman-compose"
    missing = [] if podman else ["podman"]
    if not compose.is_file():
        missing.append("podman-compose (pip install -c constraints.txt -e '.[dev]')")
    if missing:
        ci_helpers.missing(f"container test needs {', '.join(missing)}: {INSTALL}")
    assert podman
    return podman, str(compose)


def _run(cmd: Sequence[str], env: dict[str, str], timeout: float = 300, check: bool = True):
    out = subprocess.run(
        list(cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)} -> {out.returncode}\n{out.stderr[-4000:]}"
    return out


def _containers_conf(folder: Path) -> Path:
    """A containers.conf for hosts where podman needs runc and low rlimits (harmless elsewhere:
    runc is podman's other standard runtime, 1024 open files are plenty for these services)."""
    conf = folder / "containers.conf"
    lines = ["[containers]", 'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]']
    if shutil.which("runc"):
        lines += ["[engine]", 'runtime = "runc"']
    conf.write_text("\n".join(lines) + "\n")
    return conf


class Compose:
    """``podman-compose`` on docker/compose.yaml under a project name of its own."""

    def __init__(self, podman: str, compose: str, project: str, env: dict[str, str]) -> None:
        self.podman, self.compose, self.project, self.env = podman, compose, project, env

    def __call__(self, *args: str, timeout: float = 300, check: bool = True):
        cmd = [self.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return _run(cmd, self.env, timeout=timeout, check=check)

    def podman_cmd(self, *args: str, timeout: float = 300, check: bool = True):
        return _run([self.podman, *args], self.env, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        """The name of the service's running container."""
        out = self.podman_cmd(
            "ps", "--filter", f"label=io.podman.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
            "--format", "{{.Names}}",
        )  # fmt: skip
        names = out.stdout.split()
        assert len(names) == 1, (service, names)
        return names[0]

    def healthy(self, service: str) -> bool:
        """The image's HEALTHCHECK, run now (podman without systemd schedules none itself)."""
        try:
            name = self.container(service)
        except AssertionError:
            return False
        return self.podman_cmd("healthcheck", "run", name, check=False).returncode == 0

    def wait_healthy(self, service: str, timeout: float = 240) -> None:
        try:
            wait_for(lambda: self.healthy(service), timeout, f"{service} healthy", interval=3)
        except AssertionError:
            logs = self("logs", service, check=False)
            raise AssertionError(f"{service} not healthy:\n{logs.stdout[-4000:]}") from None

    def exec(self, service: str, *args: str, timeout: float = 300, check: bool = True):
        return self.podman_cmd("exec", self.container(service), *args, timeout=timeout,
                               check=check)  # fmt: skip

    def down(self) -> None:
        self("down", "-v", "-t", "10", timeout=300, check=False)
        leftovers = self.podman_cmd(
            "ps", "-aq", "--filter", f"label=io.podman.compose.project={self.project}",
            check=False,
        ).stdout.split()
        if leftovers:
            self.podman_cmd("rm", "-f", *leftovers, check=False)


def test_images_and_compose_federation(tmp_path: Path) -> None:
    podman, compose_bin = _tools()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    env.setdefault("CONTAINERS_CONF", str(_containers_conf(tmp_path)))
    timings: dict[str, float] = {}

    # -- images --------------------------------------------------------------------------------
    t0 = time.monotonic()
    build = _run(["bash", str(REPO / "docker" / "build-images.sh")], env, timeout=3000)
    timings["build"] = time.monotonic() - t0
    sizes = {}
    for name, image in IMAGES.items():
        info = json.loads(_run([podman, "image", "inspect", image], env).stdout)[0]
        sizes[name] = int(info["Size"]) / 1e6
        config = info["Config"]
        assert config.get("User") == "factoryfed", (name, config.get("User"))
        healthcheck = info.get("Healthcheck") or config.get("Healthcheck") or {}
        assert healthcheck.get("Test", [""])[0] == "CMD", f"{name}: no HEALTHCHECK"
        assert not any("KEY" in e.split("=", 1)[0] for e in config.get("Env", [])), name
    probe = (
        "import importlib.util as u, pathlib, sys; "
        "bad = [m for m in ('mlflow', 'ray', 'hydra', 'pytest', 'bibmon') if u.find_spec(m)]; "
        "bad += [str(p) for r in ('/opt', '/srv', '/tmp', '/usr/local', '/home') "
        "for p in pathlib.Path(r).rglob('*') if p.suffix in ('.parquet', '.key') "
        "and 'site-packages' not in p.parts]; "
        "bad += [p for p in ('/app', '/tests', '/bundle') if pathlib.Path(p).exists()]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = _run([podman, "run", "--rm", "--entrypoint", "python", IMAGES["factory"], "-c", probe],
               env, check=False)  # fmt: skip
    assert out.returncode == 0, f"factory image holds {out.stdout} {out.stderr[-2000:]}"
    out = _run([podman, "run", "--rm", IMAGES["operator"], "id", "-u"], env)
    assert out.stdout.strip() == "10001"

    # -- the sites: bundles and data on this host, mounted into the containers ---------------
    bundles = tmp_path / "bundles"
    provision(bundles, IDS, superlink_address="superlink:9093")
    data = tmp_path / "data"
    factoryfed = str(Path(sys.executable).parent / "factoryfed")
    _run([factoryfed, "data", "make", "--task", TASK, "--num-factories", str(len(IDS)),
          "--seed", str(SEED), "--out", str(data)], env)  # fmt: skip
    if os.geteuid() == 0:  # the containers' user (uid 10001) reads its own 0600 key
        for path in [bundles, *bundles.rglob("*")]:
            os.chown(path, 10001, 10001)
    mlflow_port, superlink_port = free_port(), free_port()
    env.update(
        FACTORYFED_BUNDLES=str(bundles),
        FACTORYFED_DATA=str(data),
        FACTORYFED_MLFLOW_PUBLISH=f"127.0.0.1:{mlflow_port}",
        FACTORYFED_SUPERLINK_PUBLISH=f"127.0.0.1:{superlink_port}",
    )
    compose = Compose(podman, compose_bin, f"factoryfed-test-{os.getpid()}", env)
    try:
        t0 = time.monotonic()
        # podman 4.3 cannot wait for service_healthy: start in order, checking health here.
        compose("up", "-d", "mlflow")
        compose.wait_healthy("mlflow")
        compose("up", "-d", "--no-deps", "superlink")
        compose.wait_healthy("superlink")
        for fid in IDS:
            compose("up", "-d", "--no-deps", fid)
        for fid in IDS:
            compose.wait_healthy(fid)
        timings["up"] = time.monotonic() - t0

        # Each factory sees its own bundle and data file (read-only) and its ledger volume.
        for fid in IDS:
            info = json.loads(compose.podman_cmd("inspect", compose.container(fid)).stdout)[0]
            mounts = {m["Destination"]: m for m in info["Mounts"]}
            assert set(mounts) == {"/bundle", "/srv/factoryfed/data/factory.parquet",
                                   "/srv/factoryfed/ledger"}, (fid, sorted(mounts))  # fmt: skip
            assert mounts["/bundle"]["Source"] == str(bundles / "factories" / fid)
            assert mounts["/srv/factoryfed/data/factory.parquet"]["Source"] == str(
                data / f"factory_{IDS.index(fid):03d}.parquet"
            )
            assert not mounts["/bundle"]["RW"] and not mounts[
                "/srv/factoryfed/data/factory.parquet"]["RW"]  # fmt: skip
            assert mounts["/srv/factoryfed/ledger"]["Type"] == "volume"
            assert not info["HostConfig"].get("PortBindings"), fid
            assert compose.exec(fid, "id", "-u").stdout.strip() == "10001"

        # -- the run, started where the operator starts it ------------------------------------
        run_config = (
            f'overrides="{" ".join(OVERRIDES)}" output-dir="/srv/factoryfed/outputs/run1" '
            'data-dir="/srv/factoryfed/data"'
        )
        t0 = time.monotonic()
        run = compose.exec("superlink", "flwr", "run", "/app", "factoryfed", "--stream",
                           "--run-config", run_config, timeout=900, check=False)  # fmt: skip
        timings["flwr run"] = time.monotonic() - t0
        text = run.stdout + run.stderr
        assert run.returncode == 0, text[-6000:]
        assert "[factoryfed] round 2/2" in text, text[-6000:]
        assert f"SuperNodes registered as: {', '.join(IDS)}" in text, text[-6000:]

        # -- MLflow, from this machine --------------------------------------------------------
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        exp = client.get_experiment_by_name("factoryfed")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        mlrun = runs[0]
        assert mlrun.info.status == "FINISHED"
        assert mlrun.data.params["task.name"] == TASK
        for fid in IDS:
            for name in ("epsilon", "train_loss", "num_examples", "participated"):
                history = client.get_metric_history(mlrun.info.run_id, f"factory/{fid}/{name}")
                assert sorted(m.step for m in history) == [1, 2], (fid, name)
        artifacts = [a.path for a in client.list_artifacts(mlrun.info.run_id, "rewards")]
        assert "rewards/reward-ledger.sqlite" in artifacts

        # -- a factory container removed and created again keeps its privacy ledger ----------
        fid = IDS[1]
        before = json.loads(compose.exec(fid, "cat", LEDGER).stdout)
        assert before["factory_id"] == fid, before
        old = compose.container(fid)
        old_id = compose.podman_cmd("inspect", "--format", "{{.Id}}", old).stdout.strip()
        compose("stop", "-t", "20", fid)
        compose("up", "-d", "--no-deps", "--force-recreate", fid)  # podman-compose has no rm
        compose.wait_healthy(fid)
        new = compose.container(fid)
        new_id = compose.podman_cmd("inspect", "--format", "{{.Id}}", new).stdout.strip()
        assert new_id != old_id
        assert json.loads(compose.exec(fid, "cat", LEDGER).stdout) == before

        # -- nothing secret in the logs ---------------------------------------------------------
        for service in ("mlflow", "superlink", *IDS):
            logs = compose("logs", service, check=False)
            assert "PRIVATE KEY" not in logs.stdout + logs.stderr, service
    finally:
        compose.down()
    print(
        "\n[containers] "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + "; image sizes: "
        + ", ".join(f"{k} {v:.0f} MB" for k, v in sizes.items())
        + f"\n{build.stderr[-1500:]}"
    )
