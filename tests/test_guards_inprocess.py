"""The contribution guards on the product path: a whole federation through the in-process runner.

A free-rider that sends the global model plus noise instead of training, and a factory that
trains on a copy of another's file, take part in a real run (the ServerApp logic and the
ClientApp): the free-rider must be withheld and paid nothing, the copy and its original must be
scored as one factory and split its credit, and all of it must be in MLflow, in the
hash-chained ledger (which still verifies and still adds up) and in the statements a firm reads.

Without sample-level DP the copy's update equals its original's (both train the same records
with the run's seed), so both rules find it; under DP-SGD each factory's independent noise hides
a copy's update on a task as small as ``molding_quality``, and only the record sketches every
simulated factory sends find it (the second test).
"""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

import fl_client.client_app
from experiments.inprocess import run_inprocess
from fl_common.protocol import ARRAYS_RECORD, TrainReply
from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data
from fl_server.rewards.ledger import RewardLedger, verify_ledger

AMOUNT = 100_000
NOISE = "factory_004"
ORIGINAL, COPY = "factory_000", "factory_002"


def with_free_rider(honest: ClientApp, partition: int) -> ClientApp:
    """The factory ClientApp, except that node ``partition`` trains and then sends the global
    model plus isotropic noise as large as its trained update, instead of the update."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest(msg, context)
        if int(context.node_config["partition-id"]) != partition or reply.has_error():
            return reply
        parsed = TrainReply.from_record(reply.content)
        sent = {k: v.numpy() for k, v in msg.content[ARRAYS_RECORD].items()}
        trained = {k: v.numpy() for k, v in parsed.arrays.items()}
        norm = np.sqrt(sum(float(((trained[k] - sent[k]) ** 2).sum()) for k in sent))
        rng = np.random.default_rng(int(msg.content["config"]["server-round"]))
        noise = {k: rng.normal(size=v.shape) for k, v in sent.items()}
        scale = norm / np.sqrt(sum(float((n**2).sum()) for n in noise.values()))
        arrays = ArrayRecord(
            {k: Array((sent[k] + scale * noise[k]).astype(sent[k].dtype)) for k in sent}
        )
        return replace(parsed, arrays=arrays).to_message(msg)

    return app


def with_a_copy(tmp_path, *overrides: str) -> DictConfig:
    """A 2-round IID ``molding_quality`` run (``overrides`` last) whose factory COPY trains on
    a copy of ORIGINAL's file, its MLflow store, data and output folder in ``tmp_path``."""
    cfg = finalize(
        compose_config(
            [
                "task=molding_quality",
                "federation.num_rounds=2",
                "partition=iid",
                f"rewards.amount={AMOUNT}",
                "tracking.register_model=false",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"tracking.artifact_root={tmp_path / 'artifacts'}",
                f"data_root={tmp_path / 'data'}",
                *overrides,
            ]
        ),
        base=tmp_path,
        output_dir=tmp_path / "out",
    )
    data_dir, _ = ensure_data(cfg)
    shutil.copyfile(data_dir / f"{ORIGINAL}.parquet", data_dir / f"{COPY}.parquet")
    return cfg


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_noise_sender_is_paid_nothing_and_a_copy_shares_one_factorys_credit(
    tmp_path, monkeypatch
):
    cfg = with_a_copy(
        tmp_path,
        "federation.num_factories=5",
        "federation.min_factories=2",
        "contribution=exact",
        "contribution.guards.noise_test=true",
        "privacy=none",
    )
    monkeypatch.setattr(fl_client.client_app, "app", with_free_rider(fl_client.client_app.app, 4))

    summary = run_inprocess(cfg, quiet=True)

    # The run's records: the noise sender withheld after every round, the pair grouped.
    scored = [r for r in summary["factory_rounds"] if "withheld" in r]
    assert len(scored) == 2
    assert all(r["withheld"] == [NOISE] for r in scored)
    assert all(r["duplicate_groups"] == [[ORIGINAL, COPY]] for r in scored)
    assert all(r["contribution"][ORIGINAL] == r["contribution"][COPY] for r in scored)
    # Found both ways: its records (every simulated factory sends a sketch) and its updates.
    assert all(r["record_groups"] == [[ORIGINAL, COPY]] for r in scored)
    assert all(len(r["sketched"]) == 5 for r in scored)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = summary["mlflow_run_id"]
    history = client.get_metric_history
    assert [m.value for m in history(run_id, f"factory/{NOISE}/withheld")] == [1.0, 1.0]
    assert [m.value for m in history(run_id, f"factory/{ORIGINAL}/withheld")] == [0.0] * 2
    assert [m.value for m in history(run_id, f"factory/{COPY}/duplicate")] == [1.0] * 2
    assert [m.value for m in history(run_id, "server/duplicate_groups")] == [1.0] * 2
    tags = client.get_run(run_id).data.tags
    assert tags[f"factory/{COPY}/duplicate_group"] == f"{ORIGINAL},{COPY}"
    assert tags[f"factory/{COPY}/duplicate_by"].startswith("records")
    assert [m.value for m in history(run_id, f"factory/{NOISE}/record_sketch")] == [1.0] * 2
    assert "**Pay withheld** from factory_004" in tags["mlflow.note.content"]
    assert f"**Scored as one factory**: {ORIGINAL}, {COPY}" in tags["mlflow.note.content"]

    # The ledger: the same flags, money conserved, the chain intact.
    assert verify_ledger(summary["ledger"], expected_head=summary["ledger_head"]).ok
    entries = RewardLedger(summary["ledger"]).entries(run_id=run_id)
    assert sum(e.payout for e in entries) + summary["reward_carry"] == AMOUNT
    mine = [e for e in entries if e.factory_id == NOISE]
    assert len(mine) == 2 and all(e.withheld and e.payout == 0 for e in mine)
    pair = [e for e in entries if e.factory_id in (ORIGINAL, COPY)]
    assert all(e.duplicate_group == f"{ORIGINAL},{COPY}" and not e.withheld for e in pair)
    paid = summary["payout_cumulative"]
    assert paid[NOISE] == 0
    assert paid[ORIGINAL] > 0 and abs(paid[ORIGINAL] - paid[COPY]) <= 1  # one credit, split
    assert summary["contribution_cumulative"][ORIGINAL] == pytest.approx(
        summary["contribution_cumulative"][COPY]
    )

    # The statement a firm reads says why.
    statement = json.loads(
        (tmp_path / "out" / "statements" / f"{NOISE}-statement.json").read_text()
    )
    assert statement["paid_less"][0].startswith("Pay withheld in 2 round(s)")
    assert statement["verified"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_under_dp_a_copy_is_found_by_its_record_sketch_and_paid_as_one(tmp_path):
    """The product's defaults (DP-SGD at epsilon 8, linearised scoring, both guards): a factory
    training on a copy of another's file is grouped with it in every round by the sketches."""
    cfg = with_a_copy(tmp_path, "federation.num_factories=4")
    assert cfg.privacy.enabled and cfg.contribution.guards.record_sketches

    summary = run_inprocess(cfg, quiet=True)

    scored = [r for r in summary["factory_rounds"] if "record_groups" in r]
    assert len(scored) == 2
    assert all(r["record_groups"] == [[ORIGINAL, COPY]] for r in scored)
    assert all(r["duplicate_groups"] == [[ORIGINAL, COPY]] for r in scored)
    assert all(r["contribution"][ORIGINAL] == r["contribution"][COPY] for r in scored)
    tags = MlflowClient(tracking_uri=cfg.tracking.uri).get_run(summary["mlflow_run_id"]).data.tags
    assert tags[f"factory/{COPY}/duplicate_by"] in ("records", "records+updates")
    entries = RewardLedger(summary["ledger"]).entries(run_id=summary["mlflow_run_id"])
    assert {e.duplicate_group for e in entries if e.factory_id in (ORIGINAL, COPY)} == {
        f"{ORIGINAL},{COPY}"
    }
