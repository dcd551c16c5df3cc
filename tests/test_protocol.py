"""The wire protocol: what the server writes, the factory reads, and back; no Flower runtime."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fl_common.protocol import (
    ACCEPTED,
    DECLINED,
    MAX_SKETCH_HASHES,
    RECORD_SKETCH,
    REPLY_RECORD,
    ProtocolError,
    TrainInstruction,
    TrainReply,
    decode_sketch,
    encode_sketch,
)
from fl_server.config import compose_config
from fl_server.report import training_line
from fl_server.server_app import train_instruction, training_settings


def _instruction(**overrides) -> TrainInstruction:
    values = dict(
        task="tep_fault",
        run_id="run-7",
        planned_rounds=5,
        local_epochs=2,
        batch_size=32,
        lr=0.1,
        momentum=0.9,
        dp=True,
        epsilon=4.0,
        delta=1e-5,
        accountant="prv",
        max_grad_norm=1.5,
        grad_sample_mode="ghost",
        seed=3,
        server_round=2,
    )
    values.update(overrides)
    return TrainInstruction(**values)


def test_an_instruction_survives_the_record():
    sent = _instruction(attack="scale", attack_factories="factory_001", attack_factor=3.0)
    record = sent.to_record()
    assert isinstance(record, ConfigRecord)
    assert record["local-epochs"] == 2 and record["server-round"] == 2
    assert "attack-std" not in record  # parameters an attack does not use are not sent
    assert TrainInstruction.from_record(record) == sent


def test_the_server_builds_the_instruction_from_its_config():
    cfg = compose_config(["seed=4", "task.train.dp_lr=0.3"])  # the default federation uses DP
    instruction = train_instruction(cfg, "mlflow-run")
    assert instruction.run_id == "mlflow-run" and instruction.seed == 4
    assert instruction.lr == 0.3 and instruction.task == str(cfg.task.name)
    assert instruction.attack == "none" and instruction.attack_factories == ""
    # What Flower's strategies add each round (FedProx: the proximal weight) is read back.
    record = instruction.to_record()
    record["server-round"] = 3
    record["proximal-mu"] = 0.01
    parsed = TrainInstruction.from_record(record)
    assert parsed.server_round == 3 and parsed.proximal_mu == 0.01


def test_factories_get_the_task_s_dp_recipe_under_dp_and_the_plain_one_without():
    """rul trains DP-SGD at batch 256 / lr 0.1 (full-batch, clipped steps) and plain SGD at
    64 / 0.05, where the larger unclipped step diverges; a task without a DP recipe
    (molding_quality) sends its plain settings either way."""
    dp = train_instruction(compose_config(["task=rul"]), "r")
    plain = train_instruction(compose_config(["task=rul", "privacy=none"]), "r")
    assert dp.dp and (dp.batch_size, dp.lr) == (256, 0.1)
    assert not plain.dp and (plain.batch_size, plain.lr) == (64, 0.05)
    only_lr = compose_config(["task=rul", "task.train.dp_batch_size=null"])
    assert (train_instruction(only_lr, "r").batch_size, train_instruction(only_lr, "r").lr) == (
        64,
        0.1,
    )
    molding = compose_config(["task=molding_quality"])
    assert train_instruction(molding, "r").batch_size == int(molding.task.train.batch_size)


def test_optional_keys_take_their_defaults_and_ints_pass_as_floats():
    record = _instruction().to_record()
    for key in ("proximal-mu", "min-run-epsilon", "data-dir", "output-dir", "attack"):
        del record[key]
    record["lr"] = 1  # TOML and Flower may carry a whole number as int
    parsed = TrainInstruction.from_record(record)
    assert parsed.proximal_mu == 0.0 and parsed.min_run_epsilon == 0.0
    assert parsed.attack == "none" and parsed.lr == 1.0 and isinstance(parsed.lr, float)


def test_a_missing_key_is_named():
    record = _instruction().to_record()
    del record["batch-size"]
    del record["server-round"]
    with pytest.raises(ProtocolError, match="lacks 'batch-size', 'server-round'"):
        TrainInstruction.from_record(record)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("local-epochs", "2", "an integer"), ("dp", 1, "a boolean"), ("seed", True, "an integer"),
     ("lr", "fast", "a number"), ("task", 3, "a string")],
)  # fmt: skip
def test_a_key_of_the_wrong_type_is_named(key, value, expected):
    record = _instruction().to_record()
    record[key] = value
    with pytest.raises(ProtocolError, match=f"'{key}' must be {expected}, got"):
        TrainInstruction.from_record(record)


def test_an_accepted_reply_survives_the_record():
    arrays = ArrayRecord([np.ones((2, 2), np.float32)])
    sent = TrainReply("factory_003", ACCEPTED, arrays=arrays, metrics={"num-examples": 12})
    content = sent.to_record()
    # The shape Flower's strategies need: one ArrayRecord and one MetricRecord.
    assert len(content.array_records) == 1 and len(content.metric_records) == 1
    back = TrainReply.from_record(content)
    assert back.factory_id == "factory_003" and back.status == ACCEPTED
    assert back.metrics == {"num-examples": 12.0}
    np.testing.assert_array_equal(back.arrays.to_numpy_ndarrays()[0], np.ones((2, 2)))


def test_a_declined_reply_carries_its_reason_and_spend():
    content = TrainReply("f1", DECLINED, "budget spent", metrics={"epsilon": 8.0}).to_record()
    back = TrainReply.from_record(content)
    assert (back.status, back.reason, back.arrays) == (DECLINED, "budget spent", None)
    assert back.metrics == {"epsilon": 8.0}


def test_a_reply_without_a_reply_record_is_an_anonymous_accepted_update():
    content = RecordDict(
        {"arrays": ArrayRecord([np.zeros(3, np.float32)]), "m": MetricRecord({"num-examples": 1})}
    )
    back = TrainReply.from_record(content)
    assert back.factory_id is None and back.status == ACCEPTED


def test_an_unknown_status_is_refused_on_both_sides():
    content = TrainReply("f1", DECLINED).to_record()
    content[REPLY_RECORD]["status"] = "paid"
    with pytest.raises(ProtocolError, match="unknown status 'paid'"):
        TrainReply.from_record(content)
    with pytest.raises(ProtocolError, match="reply status must be one of"):
        TrainReply("f1", "rejected").to_record()  # the server's verdict, never a reply


def test_an_accepted_reply_needs_exactly_one_array_record():
    content = TrainReply("f1", ACCEPTED, metrics={"num-examples": 1}).to_record()
    with pytest.raises(ProtocolError, match="one ArrayRecord and one MetricRecord"):
        TrainReply.from_record(content)


def test_a_record_sketch_travels_in_the_reply_record_and_a_bad_one_is_named():
    hashes = np.array([2**64 - 1, 7, 2**40], dtype=np.uint64)
    arrays = ArrayRecord([np.ones(2, np.float32)])
    sent = TrainReply(
        "f1",
        ACCEPTED,
        arrays=arrays,
        metrics={"num-examples": 3},
        record_sketch=encode_sketch(hashes),
    )
    content = sent.to_record()
    assert len(content.metric_records) == 1  # the sketch stays out of the strategies' metrics
    back = TrainReply.from_record(content)
    np.testing.assert_array_equal(decode_sketch(back.record_sketch), np.sort(hashes))
    assert TrainReply.from_record(TrainReply("f1", DECLINED).to_record()).record_sketch == b""
    for bad, message in [
        (b"1234567", "whole number of 8-byte hashes, got 7 bytes"),
        (b"\0" * 8 * (MAX_SKETCH_HASHES + 1), f"more than {MAX_SKETCH_HASHES}"),
        ("abcdefgh", "must be bytes, got str"),
    ]:
        content[REPLY_RECORD][RECORD_SKETCH] = bad
        with pytest.raises(ProtocolError, match=f"'{RECORD_SKETCH}' .*{message}"):
            TrainReply.from_record(content)


def test_the_run_says_which_recipe_the_factories_trained_with():
    """The MLflow params list both recipes; the summary and the description name the one sent."""
    dp = training_settings(compose_config(["task=rul"]))
    assert dp == {"batch_size": 256, "lr": 0.1, "local_epochs": 2, "recipe": "dp"}
    plain = training_settings(compose_config(["task=rul", "privacy=none"]))
    assert (plain["batch_size"], plain["recipe"]) == (64, "plain")
    assert training_settings(compose_config(["task=molding_quality"]))["recipe"] == "plain"
    text = "\n".join(training_line(dp))
    assert "batch 256 at learning rate 0.1 (the task's DP-SGD recipe" in text
    assert "(`task.train.batch_size` / `lr`)" in "\n".join(training_line(plain))
    assert training_line(None) == []
