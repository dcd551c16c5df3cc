"""Faults in a real deployment on loopback: a factory's SuperNode killed mid-round, the operator's
server killed mid-run, a factory with a corrupt data file.

One provisioning (CA, server certificate, factory bundles), one set of factory data and one
MLflow server (over HTTP) serve the whole module; each test starts its own TLS SuperLink with
SuperNode authentication (own state database) and its own three SuperNodes (own privacy
ledgers), so a test's faults never leak into the next. Processes are killed with SIGKILL, the
whole process tree at once (the SuperLink and the SuperNodes start ``flower-superexec``, which
starts ``flwr-serverapp`` / ``flwr-clientapp``), which is what a crash of that machine does.

What a deployed round costs here (see ``experiments/bench_deploy_overhead.py``) sets the
round timeout: long enough for honest rounds, short enough to keep the tests bounded. The
module takes about 9.5 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deployment_helpers import (
    FlwrRun,
    LoopbackFederation,
    Site,
    count_log_lines,
    crash,
    kill_tree,
    wait_for,
)

from fl_server.checkpoint import load_latest, load_run_state
from fl_server.launch.flower import wait_connected
from fl_server.launch.process import descendants
from fl_server.rewards.ledger import RewardLedger, verify_ledger

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: What every run of the module shares (the data is made once from these).
OVERRIDES = [
    "task=molding_quality",
    "federation.num_factories=3",
    "federation.min_factories=2",
    "tracking.register_model=false",
    "seed=0",
]
#: Seconds a round waits for replies. An honest deployed round of this config takes 7-15 s
#: here with the warm ClientApp launchers (fl_server.launch.warm_clientapp) and 20-30 s with
#: Flower's cold ``flwr-clientapp`` (what a factory whose launcher died falls back to), for
#: under 1 s of training (the tests print their round times).
ROUND_TIMEOUT = 45
#: How long the SuperLink keeps a silent SuperNode online: 2 missed heartbeats of 30 s (Flower
#: 1.42 constants HEARTBEAT_PATIENCE, HEARTBEAT_DEFAULT_INTERVAL, not configurable).
NODE_ONLINE_AFTER_CRASH = 60


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = Site(tmp_path_factory.mktemp("faults"), OVERRIDES)
    try:
        site.start_mlflow()
        yield site
    finally:
        site.close()


@pytest.fixture
def federation(site, tmp_path):
    fed = LoopbackFederation(site, tmp_path)
    try:
        fed.start_superlink()
        yield fed
    finally:
        fed.close()


def _round_times(run: FlwrRun, num_rounds: int) -> dict[int, float]:
    """Seconds from ``[ROUND k/N]`` to ``[factoryfed] round k/N`` per finished round (as the
    streamed log shows them)."""
    out = {}
    for k in range(1, num_rounds + 1):
        start = run.first(rf"\[ROUND {k}/{num_rounds}\]")
        end = run.first(rf"\[factoryfed\] round {k}/{num_rounds}\b")
        if start and end:
            out[k] = end[0] - start[0]
    return out


def _overrides(rounds: int, *extra: str) -> list[str]:
    """The module's config for a run of ``rounds`` rounds at the test round timeout."""
    return [
        *OVERRIDES,
        f"federation.num_rounds={rounds}",
        f"federation.round_timeout={ROUND_TIMEOUT}",
        *extra,
    ]


def _round_line(run: FlwrRun, k: int, num_rounds: int) -> str:
    hit = run.first(rf"\[factoryfed\] round {k}/{num_rounds}\b.*")
    assert hit, run.text()[-4000:]
    return hit[1].group(0)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _ledger_doc(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- 1. SuperNode


@pytest.mark.timeout(600)
def test_supernode_killed_mid_round_is_absent_then_rejoins(federation, site):
    """SIGKILL one factory's SuperNode (and its ClientApp) while round 2 is in flight.

    Round 2 completes with the other two within the round timeout and MLflow records the
    absence (``factory/<id>/participated`` 0). The factory's SuperNode is started again from
    the same bundle with the same privacy ledger and takes part in a later round.
    """
    fed, victim, rounds = federation, "factory_001", 7
    t0 = time.monotonic()
    fed.start_nodes()
    out = fed.root / "out"
    # Sampling must not wait for the dead factory: 2 connected nodes are enough.
    overrides = _overrides(rounds, "federation.min_available=2", "contribution=none")
    run = fed.start_run(out, overrides)
    node = fed.nodes[victim]

    # Round 2's message is at the victim and its ClientApp runs (no reply sent yet): kill it.
    def in_round_2() -> bool:
        text = node.log_text()
        return (
            count_log_lines(text, "Received successfully") >= 2
            and count_log_lines(text, "Start `flwr-clientapp` process") >= 2
            and count_log_lines(text, "Sent successfully") < 2
        )

    wait_for(in_round_2, 240, f"round 2's train message at {victim}", interval=0.1)
    assert run.poll() is None, run.text()[-3000:]
    node_id = fed.node_id(node)
    killed = crash(node)
    t_kill = time.monotonic()
    assert run.first(r"\[factoryfed\] round 2/") is None, "killed too late: round 2 was over"
    before = _ledger_doc(fed.ledger_path(victim))

    # The factory is started again at once: same bundle, same home, same privacy ledger. The
    # SuperLink refuses it until it has given up on the dead process (up to 60 s), meanwhile
    # the federation goes on without it.
    node, attempts = fed.restart_node(victim, timeout=NODE_ONLINE_AFTER_CRASH + 90, node_id=node_id)
    assert fed.node_id(node) == node_id  # the same registration, the same node
    t_back = time.monotonic() - t_kill

    # Round 2 went on with the other two and ended within the round timeout.
    wait_for(
        lambda: run.first(rf"\[factoryfed\] round 2/{rounds}\b"),
        ROUND_TIMEOUT + 30,
        "round 2 to finish without the killed factory",
    )
    round2 = _round_line(run, 2, rounds)
    t_round2 = run.first(rf"\[factoryfed\] round 2/{rounds}\b")[0] - t_kill
    assert "2/2 accepted" in round2 or re.search(r"2/3 accepted; node-\d+ error", round2), round2
    # Within the round timeout (plus Flower's 3 s reply polling and the server's evaluation).
    assert _round_times(run, rounds)[2] <= ROUND_TIMEOUT + 15, _round_times(run, rounds)

    assert run.wait(timeout=rounds * ROUND_TIMEOUT + 120) == 0, run.text()[-5000:]
    summary = _summary(out)
    run_id = summary["mlflow_run_id"]
    assert summary["rounds_run"] == rounds
    participated = site.metric_steps(run_id, f"factory/{victim}/participated")
    assert set(participated) == set(range(1, rounds + 1)), participated
    assert participated[1] == 1.0 and participated[2] == 0.0, participated
    rejoined = [k for k in range(3, rounds + 1) if participated[k] == 1.0]
    assert rejoined, f"{victim} never took part again after its restart: {participated}"
    for fid in fed.ids:
        if fid != victim:
            steps = site.metric_steps(run_id, f"factory/{fid}/participated")
            assert all(v == 1.0 for v in steps.values()), (fid, steps)
    accepted = site.metric_steps(run_id, "server/accepted")
    assert accepted[2] == 2.0 and accepted[rejoined[0]] == 3.0, accepted
    run_info = site.client().get_run(run_id)
    assert run_info.info.status == "FINISHED"

    # Its privacy ledger went on from where it was (nothing reset).
    after = _ledger_doc(fed.ledger_path(victim))
    assert after["rounds"][: len(before["rounds"])] == before["rounds"]
    assert {r["round"] for r in after["rounds"]} >= {1, *rejoined}
    assert all(r["epsilon_after"] <= after["epsilon_budget"] + 1e-9 for r in after["rounds"])

    times = _round_times(run, rounds)
    print(
        f"\n[faults/supernode] killed {victim} ({len(killed)} processes) in round 2; round 2 "
        f"ended {t_round2:.1f} s later ({round2.split('(')[-1].rstrip(')')}); restarted after "
        f"{t_back:.1f} s ({attempts} start(s)); took part again in round(s) {rejoined}; "
        f"round times {', '.join(f'{k}: {v:.1f} s' for k, v in times.items())}; "
        f"test {time.monotonic() - t0:.0f} s"
    )


# ----------------------------------------------------------------------------- 2. server


def _serverapp_pids(pids: list[int]) -> list[int]:
    """Which of ``pids`` run ``flwr-serverapp``. Call it on live processes: a killed one's
    ``/proc/<pid>/cmdline`` reads empty (zombie) or is gone (reaped)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"flwr-serverapp" in f.read():
                    out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.timeout(720)
def test_server_killed_mid_run_resumes(federation, site):
    """Kill the operator's whole server side (SuperLink, its SuperExec and the running
    ``flwr-serverapp``) after round 2's checkpoint, while round 3 trains; restart the SuperLink
    on the same state database and ``flwr run`` again with the same ``output-dir``.

    The run resumes: same MLflow run, the round-2 checkpoint's weights, rounds 3-4 numbered on,
    every round paid once in a reward ledger that verifies, and every factory's privacy ledger
    continues (the interrupted round 3 stays charged, nothing is reset, never above budget).
    """
    fed, rounds = federation, 4
    t0 = time.monotonic()
    fed.start_nodes()
    out = fed.root / "out"
    overrides = _overrides(rounds, "contribution=exact", "rewards=per_round", "rewards.amount=300")
    run1 = fed.start_run(out, overrides)
    wait_for(
        lambda: run1.first(rf"\[factoryfed\] round 2/{rounds}\b"),
        4 * ROUND_TIMEOUT + 120,
        "round 2's checkpoint",
    )

    def round3_at_factories() -> bool:
        return all(
            count_log_lines(n.log_text(), "Received successfully") >= 3 for n in fed.nodes.values()
        )

    wait_for(round3_at_factories, ROUND_TIMEOUT, "round 3's train messages", interval=0.1)
    assert run1.first(rf"\[factoryfed\] round 3/{rounds}\b") is None
    serverapps = _serverapp_pids(descendants(fed.superlink.pid))
    assert serverapps, "no flwr-serverapp process was running under the SuperLink"
    killed = kill_tree(fed.superlink.pid)
    assert set(serverapps) <= set(killed)
    t_kill = time.monotonic()
    run1.wait(timeout=120)  # the CLI's log stream ends with its SuperLink

    # What the crash left behind.
    state = load_run_state(out)
    checkpoint = load_latest(out / "checkpoints")
    assert checkpoint["round"] == 2
    ckpt_file = out / "checkpoints" / "round_0002.pt"
    ckpt_hash = hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    run_id = state["mlflow_run_id"]
    reward_ledger = RewardLedger(out / "reward-ledger.sqlite")
    assert reward_ledger.rounds(run_id) == {1, 2}
    assert not (out / "summary.json").exists()
    time.sleep(2)  # let the factories' in-flight round 3 reserve its spend
    privacy_before = {fid: _ledger_doc(fed.ledger_path(fid)) for fid in fed.ids}
    for fid, doc in privacy_before.items():
        assert [r["round"] for r in doc["rounds"]] in ([1, 2], [1, 2, 3]), (fid, doc["rounds"])

    # The operator restarts the SuperLink (same home, state database and port) without
    # registering anyone: the factories' registrations are in the state, and the running
    # SuperNodes (never restarted) reconnect by themselves.
    node_ids = {fid: n.log_text().count("SuperNode ID:") for fid, n in fed.nodes.items()}
    fed.start_superlink(register=False)
    run2 = fed.start_run(out, overrides)
    assert run2.wait(timeout=(rounds - 1) * ROUND_TIMEOUT + 180) == 0, run2.text()[-5000:]
    assert {fid: n.log_text().count("SuperNode ID:") for fid, n in fed.nodes.items()} == node_ids
    assert all(n.poll() is None for n in fed.nodes.values())
    text = run2.text()
    assert f"Resuming MLflow run {run_id} after round 2" in text, text[-5000:]
    summary = _summary(out)
    assert summary["mlflow_run_id"] == run_id
    assert [r["round"] for r in summary["rounds"]] == list(range(rounds + 1))

    # Same weights as the last checkpoint: the resumed run evaluates them first, unchanged.
    initial = re.search(r"Initial global evaluation results: .*'loss': ([0-9.e+-]+)", text)
    assert initial, text[-5000:]
    assert float(initial.group(1)) == pytest.approx(checkpoint["metrics"]["loss"], rel=1e-6)
    assert hashlib.sha256(ckpt_file.read_bytes()).hexdigest() == ckpt_hash
    assert load_latest(out / "checkpoints")["round"] == rounds
    # Round 3 trained again from there, with every factory.
    assert "(3/3 accepted)" in _round_line(run2, 3, rounds), _round_line(run2, 3, rounds)
    assert f"[factoryfed] round {rounds}/{rounds}" in text

    # MLflow: one run, each round logged once, finished.
    client = site.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    loss_steps = site.metric_steps(run_id, "server/loss")
    assert sorted(loss_steps) == list(range(rounds + 1))

    # Rewards: every round paid once, per factory; the chain verifies against MLflow's head.
    entries = reward_ledger.entries(run_id=run_id)
    keys = [(e.round, e.factory_id) for e in entries]
    assert len(keys) == len(set(keys)), keys
    paid_rounds = sorted({e.round for e in entries})
    assert paid_rounds[:2] == [1, 2] and set(paid_rounds) <= set(range(1, rounds + 1))
    head = run.data.tags["ledger_head"]
    assert verify_ledger(out / "reward-ledger.sqlite", head).ok
    cli = subprocess.run(
        [
            str(Path(sys.executable).parent / "factoryfed"),
            "ledger",
            "verify",
            str(out / "reward-ledger.sqlite"),
            "--head",
            head,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr

    # Privacy: every factory's ledger went on from its pre-crash state, never above budget.
    epsilons = {}
    for fid in fed.ids:
        before, after = privacy_before[fid], _ledger_doc(fed.ledger_path(fid))
        assert after["rounds"][: len(before["rounds"])] == before["rounds"], fid
        assert {r["run_id"] for r in after["rounds"]} == {run_id}
        eps_before = before["rounds"][-1]["epsilon_after"]
        eps_after = after["rounds"][-1]["epsilon_after"]
        assert eps_after >= eps_before
        assert all(r["epsilon_after"] <= after["epsilon_budget"] + 1e-9 for r in after["rounds"])
        epsilons[fid] = (eps_before, eps_after, [r["round"] for r in after["rounds"]])

    # What the restarted SuperLink says about the killed run and the resumed one.
    runs = (fed.flwr_json("ls") or {}).get("runs", [])
    flower_runs = [(r.get("run-id"), r.get("status")) for r in runs]

    # The retried round 3 was charged again; a factory without budget left declines round 4.
    for f in summary["failures"]:
        assert f["status"] == "declined" and "privacy budget exhausted" in f["reason"], f
    declined = sorted({(f["round"], f["factory"]) for f in summary["failures"]})
    print(
        f"\n[faults/server] killed {len(killed)} processes (SuperLink, SuperExec, ServerApp) "
        f"{time.monotonic() - t_kill:.0f} s before the resumed run ended; MLflow run {run_id} "
        f"resumed after round 2 (checkpoint loss {checkpoint['metrics']['loss']:.4f}); reward "
        f"ledger rounds {paid_rounds}, {len(entries)} entries; privacy "
        + "; ".join(
            f"{fid} eps {b:.3f} -> {a:.3f} rounds {r}" for fid, (b, a, r) in epsilons.items()
        )
        + (f"; declined {declined}" if declined else "")
        + f"; Flower runs on the SuperLink: {flower_runs}"
        + f"; test {time.monotonic() - t0:.0f} s"
    )


# ----------------------------------------------------------------------------- 3. data


@pytest.mark.timeout(420)
def test_corrupt_data_file_is_reported_and_federation_continues(federation, site, tmp_path):
    """A factory whose Parquet file is corrupt (truncated) answers every round with a
    ``data-error`` naming the file: MLflow gets ``factory/<id>/failed`` 1 and a
    ``failures.json`` artifact with the reason; the others carry the federation."""
    fed, bad, rounds = federation, "factory_002", 2
    t0 = time.monotonic()
    corrupt = tmp_path / "corrupt" / "factory_002.parquet"
    corrupt.parent.mkdir()
    original = site.data_path(bad).read_bytes()
    corrupt.write_bytes(original[: len(original) // 2])
    for fid in fed.ids:
        fed.start_node(fid, data_path=corrupt if fid == bad else None, connect_timeout=None)
    for node in fed.nodes.values():
        wait_connected(node, 90)
    out = fed.root / "out"
    overrides = _overrides(rounds, "contribution=none")
    run = fed.start_run(out, overrides)
    assert run.wait(timeout=rounds * ROUND_TIMEOUT + 120) == 0, run.text()[-5000:]
    for k in range(1, rounds + 1):
        line = _round_line(run, k, rounds)
        assert f"2/3 accepted; {bad} data-error" in line, line

    summary = _summary(out)
    run_id = summary["mlflow_run_id"]
    failed = site.metric_steps(run_id, f"factory/{bad}/failed")
    participated = site.metric_steps(run_id, f"factory/{bad}/participated")
    assert failed == dict.fromkeys(range(1, rounds + 1), 1.0), failed
    assert participated == dict.fromkeys(range(1, rounds + 1), 0.0), participated
    for fid in fed.ids:
        if fid != bad:
            steps = site.metric_steps(run_id, f"factory/{fid}/participated")
            assert steps == dict.fromkeys(range(1, rounds + 1), 1.0), (fid, steps)
    client = site.client()
    assert client.get_run(run_id).info.status == "FINISHED"
    local = client.download_artifacts(run_id, "failures.json", str(tmp_path))
    failures = json.loads(Path(local).read_text())
    mine = [f for f in failures if f["factory"] == bad]
    assert [f["round"] for f in mine] == list(range(1, rounds + 1)), failures
    for f in mine:
        assert f["status"] == "data-error"
        assert str(corrupt) in f["reason"] and "unreadable Parquet file" in f["reason"], f
    assert not fed.ledger_path(bad).exists() or bad in fed.ledger_path(bad).read_text()
    print(
        f"\n[faults/data] {bad}: {mine[0]['reason'][:160]}...; rounds "
        f"{', '.join(f'{k}: {v:.1f} s' for k, v in _round_times(run, rounds).items())}; "
        f"test {time.monotonic() - t0:.0f} s"
    )
