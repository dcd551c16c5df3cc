"""The warm ClientApp launcher and the ``flwr-clientapp`` shim (``fl_server.launch.warm_clientapp``,
``fl_server.launch.clientapp_shim``), with Flower's real ``flwr-clientapp``."""

from __future__ import annotations

import os
import subprocess

import pytest
from deployment_helpers import kill_tree, wait_for

from fl_server.launch.process import child_env
from fl_server.launch.warm_clientapp import (
    WARM_SOCKET_ENV,
    start_warm_clientapp,
    warm_socket_path,
    write_clientapp_shim,
)

pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_clientapp_shim_survives_a_dead_warm_launcher(tmp_path):
    """The ``flwr-clientapp`` shim a SuperNode finds first on its PATH hands a launch to the
    warm launcher while it listens; with none, or after the launcher was SIGKILLed (its socket
    file left behind), it runs Flower's own ``flwr-clientapp``: a factory whose launcher died
    keeps answering, only without the warm start."""
    home = tmp_path / "node"
    home.mkdir()
    socket_path = warm_socket_path(home)
    shim = write_clientapp_shim(home / "bin") / "flwr-clientapp"
    env = child_env(home / "flwr")
    env[WARM_SOCKET_ENV] = str(socket_path)

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(shim), "--help"], env=env, capture_output=True, text=True, timeout=60
        )

    cold = launch()  # no launcher yet
    assert cold.returncode == 0 and "Run a Flower ClientApp" in cold.stdout, cold.stderr
    launcher = start_warm_clientapp(
        socket_path, home, env, watch_pid=os.getpid(), preload=["flwr.supernode.cli.flwr_clientapp"]
    )
    try:
        wait_for(socket_path.exists, 60, "the warm launcher to listen")
        warm = launch()
        assert warm.returncode == 0 and "Run a Flower ClientApp" in warm.stdout, warm.stderr
        assert "warm-clientapp: ready on" in launcher.log_text()
        kill_tree(launcher.pid)
        wait_for(lambda: launcher.poll() is not None, 10, "the launcher to die")
        assert socket_path.exists()  # what a crash leaves behind
        after = launch()
        assert after.returncode == 0 and "Run a Flower ClientApp" in after.stdout, after.stderr
    finally:
        launcher.stop(grace=2)


def test_the_shim_runs_flowers_clientapp_when_its_module_is_missing(tmp_path):
    """The shim file is a few lines that import the shim module; without it (a broken install)
    it still runs Flower's own ``flwr-clientapp``, here a stand-in that reports its argv."""
    real = tmp_path / "real-clientapp"
    real.write_text("#!/bin/sh\necho real \"$@\"\n")
    real.chmod(0o755)
    shim = write_clientapp_shim(tmp_path / "bin", real) / "flwr-clientapp"
    text = shim.read_text()
    assert len(text.splitlines()) <= 12
    broken = tmp_path / "broken"
    broken.write_text(
        "\n".join(
            "sys.path.insert(0, '/nonexistent')" if line.startswith("sys.path.insert") else line
            for line in text.splitlines()
        )
        + "\n"
    )
    broken.chmod(0o755)
    env = {"PATH": os.environ["PATH"], WARM_SOCKET_ENV: str(tmp_path / "no.sock")}
    for exe in (shim, broken):
        out = subprocess.run(
            [str(exe), "--a", "b c"], env=env, capture_output=True, text=True, timeout=60
        )
        assert (out.returncode, out.stdout) == (0, "real --a b c\n"), out.stderr

