"""A real deployment on loopback: TLS SuperLink with SuperNode authentication, three factory
SuperNodes as separate processes, an MLflow server over HTTP, ``flwr run`` of the project app.

Everything binds 127.0.0.1 and every process is stopped by PID / process group. What it checks:

* provisioning (CA, server certificate, factory bundles) and the operator's launch command as
  the operator container runs it (``factoryfed deploy superlink --register-factories``);
* a factory whose key was provisioned but never registered is refused, a client speaking
  plain HTTP to the TLS port gets nowhere, and a client that does not trust the CA neither;
* three SuperNodes, each with its own data file and privacy ledger, complete two rounds of
  ``molding_quality`` with the Hydra-composed config passed as ``--run-config``;
* MLflow, queried over HTTP, holds the run: per-factory metrics, ``factory/<id>/contribution``
  and the ``rewards/reward-ledger.sqlite`` artifact (served by the tracking server), whose hash
  chain verifies against the run's ``ledger_head`` tag.

Privacy stays at the default (DP-SGD, epsilon 8): for ``molding_quality`` it costs about 0.3 s
more than non-private training per factory and round (README benchmark), against a deployed
round of 7-13 s here (with the warm ClientApp launcher), and it exercises what deployment
adds, the factory's own privacy ledger at its ``ledger-path``. Prints the per-round wall time
(MLflow ``server/round_seconds``, with the slowest factory's local training time) for
comparison with simulation. About 2 minutes.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from deployment_helpers import IDS, ONE_THREAD, REPO
from deployment_helpers import kill as _kill
from deployment_helpers import plain_http_fails as _plain_http_fails
from deployment_helpers import wait_for as _wait_for

from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from fl_server.launch.flower import READY_FILE, start_supernode, wait_connected
from fl_server.launch.flwr_run import run_app
from fl_server.launch.mlflow_server import start_mlflow
from fl_server.launch.process import Handle, child_env, free_port, https_get, pid_alive
from fl_server.provision import provision
from fl_server.rewards.ledger import verify_ledger

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

OVERRIDES = [
    "task=molding_quality",
    "federation.num_factories=3",
    "federation.num_rounds=2",
    "federation.min_factories=2",
    "federation.round_timeout=180",
    "contribution=exact",
    "tracking.register_model=false",
    "seed=0",
]


def test_tls_federation_with_node_auth(tmp_path):
    t_start = time.monotonic()
    env = child_env(tmp_path / "unused-flwr-home")
    env.update(ONE_THREAD)
    handles: list[Handle] = []
    cli_proc: subprocess.Popen | None = None
    superlink_pid: int | None = None
    timings: dict[str, float] = {}
    try:
        # -- provisioning and data -------------------------------------------------------------
        bundles = provision(tmp_path / "bundles", IDS)
        cfg = finalize(compose_config(OVERRIDES), base=tmp_path, output_dir=tmp_path / "out")
        cfg.data_dir = str(tmp_path / "data")
        data_dir, _ = ensure_data(cfg)

        # -- operator: MLflow server and SuperLink (the container's command) -------------------
        mlflow_handle = start_mlflow(tmp_path / "mlflow", port=None, extra_env=ONE_THREAD)
        handles.append(mlflow_handle)
        uri = mlflow_handle.info["uri"]
        port = free_port()
        home = tmp_path / "operator"
        cli_log = tmp_path / "superlink-cli.log"
        with open(cli_log, "wb") as out:
            cli_proc = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "factoryfed"),
                    "deploy",
                    "superlink",
                    "--operator-dir",
                    str(bundles.operator_dir),
                    "--home",
                    str(home),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--register-factories",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def cli_ready() -> bool:
            assert cli_proc.poll() is None, cli_log.read_text()
            return "\nrun: " in cli_log.read_text()

        _wait_for(cli_ready, 120, "factoryfed deploy superlink")
        cli_text = cli_log.read_text()
        superlink_pid = int(re.search(r"SuperLink PID (\d+)", cli_text).group(1))
        for fid in IDS:
            assert f"registered {fid}: node " in cli_text, cli_text
        address = f"127.0.0.1:{port}"
        assert (home / READY_FILE).read_text().strip() == address
        ca = bundles.operator_dir / "ca.crt"
        superlink_log = home / "superlink.log"
        timings["operator up"] = time.monotonic() - t_start

        # -- refusals ----------------------------------------------------------------------------
        # A client that trusts the CA gets through; plain HTTP and an untrusting client do not.
        assert https_get(f"https://{address}/health", ca) == 200
        plain = _plain_http_fails(address)
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(
                f"https://{address}/health", timeout=5, context=ssl.create_default_context()
            )
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
        # A factory provisioned after the SuperLink registered the others: same CA, valid
        # key, never registered.
        provision(tmp_path / "bundles", [*IDS, "factory_999"])
        intruder = start_supernode(
            tmp_path / "bundles" / "factories" / "factory_999",
            tmp_path / "factory_999",
            data_dir / "factory_000.parquet",
            tmp_path / "factory_999" / "ledger.json",
            superlink=address,
            port=None,
            max_wait_time=60,
            extra_env=ONE_THREAD,
        )
        handles.append(intruder)
        insecure = start_supernode(
            bundles.factories["factory_000"].path,
            tmp_path / "insecure",
            data_dir / "factory_000.parquet",
            tmp_path / "insecure" / "ledger.json",
            superlink=address,
            port=None,
            insecure=True,
            node_auth=False,
            max_retries=2,
            max_wait_time=20,
            extra_env=ONE_THREAD,
        )
        handles.append(insecure)

        # -- factories ---------------------------------------------------------------------------
        nodes = []
        for i, fid in enumerate(IDS):
            node = start_supernode(
                bundles.factories[fid].path,
                tmp_path / fid,
                data_dir / f"factory_{i:03d}.parquet",
                tmp_path / fid / "ledger" / "privacy.json",
                superlink=address,
                port=None,
                extra_env=ONE_THREAD,
            )
            handles.append(node)
            nodes.append(node)
        for node in nodes:
            wait_connected(node, 90)
        timings["factories connected"] = time.monotonic() - t_start

        _wait_for(lambda: intruder.poll() is not None, 60, "the unregistered SuperNode to exit")
        assert intruder.poll() != 0
        assert "SuperNode ID:" not in intruder.log_text()
        assert "Exit Code: 305" in intruder.log_text()
        assert "Failed to activate SuperNode" in intruder.log_text()
        assert "No SuperNode found with the given public key" in superlink_log.read_text()
        _wait_for(lambda: insecure.poll() is not None, 60, "the insecure SuperNode to exit")
        assert insecure.poll() != 0
        assert "SuperNode ID:" not in insecure.log_text()

        # -- the run -------------------------------------------------------------------------------
        lines: list[str] = []
        run_config = {
            "overrides": " ".join([*OVERRIDES, f"tracking.uri={uri}"]),
            "output-dir": str(tmp_path / "out"),
            "data-dir": str(data_dir),
        }
        run_env = child_env(home / "flwr")
        run_env.update(ONE_THREAD)
        t_run = time.monotonic()
        code = run_app(
            home / "flwr", REPO, run_config, on_line=lines.append, timeout=420, env=run_env
        )
        timings["flwr run"] = time.monotonic() - t_run
        text = "\n".join(lines)
        assert code == 0, text[-5000:]
        assert "[factoryfed] round 2/2" in text, text[-5000:]
        assert "Sampled 3 nodes (out of 3)" in text, text[-5000:]
        # The server bound every node to the factory id it was registered under.
        assert f"SuperNodes registered as: {', '.join(IDS)}" in text, text[-5000:]
        for node in nodes:
            assert node.poll() is None, node.log_text()[-3000:]

        # -- MLflow over HTTP ------------------------------------------------------------------
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("factoryfed")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert run.data.params["task.name"] == "molding_quality"
        assert run.data.params["federation.num_rounds"] == "2"
        for fid in IDS:
            for name in ("contribution", "epsilon", "train_loss", "num_examples", "participated"):
                history = client.get_metric_history(run_id, f"factory/{fid}/{name}")
                assert sorted(m.step for m in history) == [1, 2], (fid, name)
            participated = client.get_metric_history(run_id, f"factory/{fid}/participated")
            assert all(m.value == 1.0 for m in participated)
        assert "factory/factory_999/participated" not in run.data.metrics
        round_seconds = sorted(
            client.get_metric_history(run_id, "server/round_seconds"), key=lambda m: m.step
        )
        assert [m.step for m in round_seconds] == [1, 2]
        artifacts = [a.path for a in client.list_artifacts(run_id, "rewards")]
        assert "rewards/reward-ledger.sqlite" in artifacts
        local = client.download_artifacts(run_id, "rewards/reward-ledger.sqlite", str(tmp_path))
        result = verify_ledger(local, expected_head=run.data.tags["ledger_head"])
        assert result.ok, result.describe()
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["rounds_run"] == 2
        assert set(summary["contribution_cumulative"]) == set(IDS)

        # -- factory side: each privacy ledger lives where its node config put it -------------
        for fid in IDS:
            ledger = tmp_path / fid / "ledger" / "privacy.json"
            assert ledger.is_file(), fid
            assert fid in ledger.read_text()

        # -- stopping the operator's command stops its SuperLink ----------------------------
        cli_proc.send_signal(signal.SIGTERM)
        assert cli_proc.wait(timeout=30) == 0
        _wait_for(lambda: not pid_alive(superlink_pid), 15, "the SuperLink to stop")
        assert not (home / READY_FILE).exists()
        timings["total"] = time.monotonic() - t_start

        train = {}  # slowest factory's local training (DP-SGD) per round, for comparison
        for fid in IDS:
            for m in client.get_metric_history(run_id, f"factory/{fid}/train_time"):
                train[m.step] = max(train.get(m.step, 0.0), m.value)
        per_round = ", ".join(
            f"round {m.step}: {m.value:.1f} s (slowest local training {train[m.step]:.1f} s)"
            for m in round_seconds
        )
        print(
            f"\n[deployment] per-round wall time (MLflow server/round_seconds): {per_round}; "
            f"mean {sum(m.value for m in round_seconds) / len(round_seconds):.1f} s"
        )
        print(
            "[deployment] "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
            + f"; plain HTTP to the TLS port: {plain}"
        )
    finally:
        for handle in reversed(handles):
            handle.stop(grace=5)
        if cli_proc is not None and cli_proc.poll() is None:
            cli_proc.send_signal(signal.SIGTERM)
            try:
                cli_proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill(cli_proc.pid)
                cli_proc.wait(timeout=10)
        if superlink_pid is not None and pid_alive(superlink_pid):
            _kill(superlink_pid)
