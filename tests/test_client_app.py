"""The ClientApp of a deployed factory holds its privacy policy against the server's config.

Each test calls the real ``train`` function with a Flower ``Message`` and ``Context`` built as
a SuperNode would give them, on a real Parquet file and a real privacy ledger. A declined
instruction must leave the ledger byte for byte as it was and read no data (every read of
the factory's rows goes through ``pandas.read_parquet``, which the tests count).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, Message
from mlflow.tracking import MlflowClient
from tiny_task import molding_frame

from fl_client.privacy import PrivacyLedger, epsilon_of, plan_noise_multiplier
from fl_client.training import sample_rate_for, steps_per_epoch
from fl_common.protocol import DECLINED, TrainReply, decode_sketch, encode_sketch
from fl_common.sketch import fingerprint_similarity, record_fingerprint
from fl_server.recorder import RoundRecorder
from fl_server.tracking import MlflowTracker
from standard_models.registry import get_task
from strategies.reports import FactoryOutcome, RoundRecord, RoundReport

ROWS, BATCH = 300, 64
BUDGET = 3.0


@pytest.fixture
def as_node(train_as_node):
    """Answer a train message as node 5, as Flower's runtime would call the ClientApp."""

    def call(config: dict, node_config: dict) -> Message:
        torch.manual_seed(0)
        arrays = ArrayRecord(get_task("molding_quality").build_model().state_dict())
        return train_as_node(config, arrays, node_config)

    return call


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Parquet file whose rows are read during the test."""
    seen: list[str] = []
    real = pd.read_parquet

    def counting(path, *args, **kwargs):
        seen.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pd, "read_parquet", counting)
    return seen


def _config(**changes) -> dict:
    config = {
        "task": "molding_quality", "run-id": "r0", "planned-rounds": 20, "server-round": 1,
        "local-epochs": 1, "batch-size": BATCH, "lr": 0.05, "momentum": 0.0, "dp": True,
        "epsilon": BUDGET, "delta": 1e-5, "accountant": "rdp", "max-grad-norm": 1.0,
        "grad-sample-mode": "bk", "seed": 0,
        # what a simulation would add; a deployed factory must never take these paths
        "data-dir": "/nonexistent", "output-dir": "/nonexistent",
    }  # fmt: skip
    config.update(changes)
    return config


@functools.cache
def _sigma(planned_rounds: int, epsilon: float = BUDGET) -> float:
    """The noise multiplier a fresh ledger plans for ``planned_rounds`` rounds."""
    q, steps = sample_rate_for(ROWS, BATCH), steps_per_epoch(ROWS, BATCH)
    return plan_noise_multiplier(None, epsilon, 1e-5, q, planned_rounds * steps)


@pytest.fixture
def plant(tmp_path: Path) -> dict:
    """A deployed factory's node config: its own data, ledger, budget, clipping range, floor."""
    data = tmp_path / "plant.parquet"
    molding_frame(ROWS, 1).to_parquet(data)
    floor = (_sigma(1) + _sigma(20)) / 2  # 20 planned rounds pass, a single one does not
    return {
        "factory-id": "plant", "data-path": str(data), "ledger-path": str(tmp_path / "l.json"),
        "epsilon-budget": BUDGET, "delta": 1e-5, "max-grad-norm": 1.0,
        "min-noise-multiplier": floor,
    }  # fmt: skip


def _status(reply: Message) -> tuple[str, str]:
    info = reply.content["factory"]
    return str(info["status"]), str(info["reason"])


#: Instructions that would weaken the plant's policy, and the field each reply must name.
WEAKENING = [
    ({"dp": False}, "'dp'"),
    ({"max-grad-norm": 2.0}, "'max-grad-norm'"),
    ({"epsilon": BUDGET + 1.0}, "'epsilon'"),
    ({"delta": 1e-4}, "'delta'"),
    ({"planned-rounds": 1}, "'planned-rounds'"),
]


def test_a_weakening_instruction_is_declined_before_data_or_ledger(
    as_node, plant: dict, reads: list[str]
) -> None:
    first = as_node(_config(), plant)  # an honest round: the ledger now holds spend
    assert _status(first)[0] == "accepted"
    assert first.content["metrics"]["dp"] == 1
    ledger = Path(plant["ledger-path"])
    before = ledger.read_bytes()
    for changes, field in WEAKENING:
        reads.clear()
        reply = as_node(_config(**{"run-id": "r1", **changes}), plant)
        status, reason = _status(reply)
        assert status == DECLINED, (changes, reason)
        assert reason.startswith("privacy policy: ") and field in reason, (changes, reason)
        assert "arrays" not in reply.content
        assert ledger.read_bytes() == before, changes
        assert reads == [], changes  # not one row of the factory's data was read


def test_a_factory_without_a_ledger_yet_declines_without_creating_one(
    as_node, plant: dict, reads: list[str]
) -> None:
    reply = as_node(_config(**{"planned-rounds": 1}), plant)
    assert _status(reply)[0] == DECLINED
    assert not Path(plant["ledger-path"]).exists()
    assert reads == []


def test_a_per_round_ceiling_declines_too_few_rounds(
    as_node, plant: dict, reads: list[str]
) -> None:
    q, steps = sample_rate_for(ROWS, BATCH), steps_per_epoch(ROWS, BATCH)
    ceiling = epsilon_of([(_sigma(20), q, steps)], 1e-5) * 1.01  # one round of a 20-round plan
    node = {**plant, "max-round-epsilon": ceiling}
    del node["min-noise-multiplier"]
    reply = as_node(_config(**{"planned-rounds": 2}), node)
    status, reason = _status(reply)
    assert status == DECLINED and "'max-round-epsilon'" in reason
    assert reads == [] and not Path(plant["ledger-path"]).exists()
    assert _status(as_node(_config(), node))[0] == "accepted"


def test_more_privacy_is_taken_and_trained_with(as_node, plant: dict, reads: list[str]) -> None:
    """A lower epsilon and another accountant: the stricter budget, the node's accountant."""
    reply = as_node(_config(**{"epsilon": 1.0, "accountant": "prv"}), plant)
    assert _status(reply)[0] == "accepted"
    metrics = reply.content["metrics"]
    assert metrics["dp"] == 1
    assert metrics["noise_multiplier"] == pytest.approx(_sigma(20, epsilon=1.0), rel=1e-12)
    assert metrics["noise_multiplier"] > _sigma(20)
    assert 0 < metrics["epsilon"] <= 1.0
    assert reads == [plant["data-path"]]
    stored = json.loads(Path(plant["ledger-path"]).read_text())
    assert stored["accountant"] == "rdp"  # the node's (its default), not the server's
    assert stored["epsilon_budget"] == BUDGET  # the lifetime budget stays the factory's
    # a later run may still use the factory's whole budget
    later = as_node(_config(**{"run-id": "r1"}), plant)
    assert _status(later)[0] == "accepted"
    spent = PrivacyLedger.open(plant["ledger-path"], "plant", BUDGET, 1e-5).spent_epsilon()
    assert later.content["metrics"]["epsilon"] == pytest.approx(spent)


def test_a_simulated_factory_still_trains_without_dp(as_node, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    molding_frame(ROWS, 0).to_parquet(data_dir / "factory_000.parquet")
    node = {"partition-id": 0, "ledger-path": str(tmp_path / "sim.json")}
    reply = as_node(_config(**{"dp": False, "data-dir": str(data_dir)}), node)
    assert _status(reply)[0] == "accepted"
    assert reply.content["metrics"]["dp"] == 0
    assert not (tmp_path / "sim.json").exists()


def test_a_bad_policy_value_is_answered_with_the_key(as_node, plant: dict) -> None:
    reply = as_node(_config(), {**plant, "delta": 2.0})
    status, reason = _status(reply)
    assert status == "error"
    assert "node config 'delta' must be above 0 and below 1, got 2.0" in reason
    assert not Path(plant["ledger-path"]).exists()


def test_the_server_records_a_policy_decline(as_node, plant: dict, tmp_path: Path) -> None:
    """The declined reply, parsed as the server does, reaches MLflow and ``failures.json``."""
    reply = TrainReply.from_message(as_node(_config(dp=False), plant))
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "t", str(tmp_path / "art"))
    run_id = tracker.start("r", {"seed": "0"}, tags={})
    recorder = RoundRecorder(tracker, tmp_path / "out", run_id, 2, "macro_f1")
    report = RoundReport(1)
    assert reply.factory_id is not None
    report.add(FactoryOutcome(reply.factory_id, reply.status, reply.reason, reply.metrics))
    recorder.receive(RoundRecord(report))
    recorder.record(1, {"macro_f1": 0.5, "loss": 0.5}, {"w": torch.zeros(1)})
    client = MlflowClient(tracker.uri)
    assert client.get_run(run_id).data.metrics["factory/plant/declined"] == 1.0
    path = client.download_artifacts(run_id, "failures.json", str(tmp_path / "a"))
    [failure] = json.loads(Path(path).read_text())
    assert (failure["factory"], failure["status"]) == ("plant", "declined")
    assert failure["reason"].startswith("privacy policy: 'dp'")


SKETCH_KEY = "the-factories-own-secret"


def _sketch(reply: Message) -> bytes | None:
    return TrainReply.from_message(reply).record_sketch or None


def test_a_deployed_factory_sends_a_record_sketch_only_with_its_own_key(
    as_node, plant: dict, tmp_path: Path
) -> None:
    """No key in the node config, no sketch; with one, the sketch of the file's records, which
    a factory holding the same records under another name matches and a stranger does not."""
    assert _sketch(as_node(_config(), plant)) is None
    keyed = {**plant, "record-sketch-key": SKETCH_KEY}
    mine = _sketch(as_node(_config(**{"run-id": "r1"}), keyed))
    assert mine == encode_sketch(
        record_fingerprint(pd.read_parquet(plant["data-path"]), SKETCH_KEY)
    )
    copy = tmp_path / "copy.parquet"
    copy.write_bytes(Path(plant["data-path"]).read_bytes())
    other = tmp_path / "other.parquet"
    molding_frame(ROWS, 7).to_parquet(other)

    def sketch_of(path: Path, name: str) -> np.ndarray:
        node = {**keyed, "data-path": str(path), "factory-id": name,
                "ledger-path": str(tmp_path / f"{name}.json")}  # fmt: skip
        sent = _sketch(as_node(_config(), node))
        assert sent is not None
        return decode_sketch(sent)

    assert fingerprint_similarity(decode_sketch(mine), sketch_of(copy, "copier")) == 1.0
    assert fingerprint_similarity(decode_sketch(mine), sketch_of(other, "stranger")) == 0.0


def test_a_simulated_factory_sketches_under_the_run_s_key(as_node, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    frame = molding_frame(ROWS, 0)
    frame.to_parquet(data_dir / "factory_000.parquet")
    node = {"partition-id": 0, "ledger-path": str(tmp_path / "sim.json")}
    first = _sketch(as_node(_config(**{"dp": False, "data-dir": str(data_dir)}), node))
    again = _sketch(as_node(_config(**{"dp": False, "data-dir": str(data_dir)}), node))
    later = _sketch(
        as_node(_config(**{"dp": False, "data-dir": str(data_dir), "run-id": "r9"}), node)
    )
    assert first is not None and first == again  # one key for the run's factories
    assert later is not None and later != first  # another run, another key


@pytest.mark.parametrize("key", ["short", 12345])
def test_a_bad_sketch_key_is_answered_with_the_key_before_any_data(
    as_node, plant: dict, reads: list[str], key
) -> None:
    reply = as_node(_config(), {**plant, "record-sketch-key": key})
    status, reason = _status(reply)
    assert status == "error"
    assert "node config record-sketch-key: must be a string of 16 to 64 bytes" in reason
    assert reads == [] and not Path(plant["ledger-path"]).exists()


def test_a_federation_that_requires_sketches_is_declined_without_a_key(
    as_node, plant: dict, reads: list[str]
) -> None:
    """The server would reject an update without a record sketch, so a factory that has not
    agreed to send one declines before reading a row or touching its ledger; with the key it
    trains and sends its sketch."""
    required = _config(**{"record-sketch-required": True})
    status, reason = _status(as_node(required, plant))
    assert status == DECLINED
    assert reason.startswith("privacy policy: 'record-sketch-key' is not set")
    assert "record-sketch-required" in reason
    assert reads == [] and not Path(plant["ledger-path"]).exists()
    keyed = as_node(required, {**plant, "record-sketch-key": SKETCH_KEY})
    assert _status(keyed)[0] == "accepted" and _sketch(keyed) is not None
