"""Test-wide settings (no telemetry, one torch thread) and a builder for Flower replies."""

from fl_common.env import set_quiet

set_quiet()

import torch  # noqa: E402

# Two cores shared by the runner and any simulated factories: extra threads only contend.
torch.set_num_threads(1)

import pytest  # noqa: E402
from flwr.app import Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402


@pytest.fixture
def identity(monkeypatch):
    """Messages need the identity a Flower runtime would give this process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)

    def reply_from(node_id, content):
        monkeypatch.setattr(TaskIdentity, "_node_id", 0)
        request = Message(RecordDict(), dst_node_id=node_id, message_type="train")
        monkeypatch.setattr(TaskIdentity, "_node_id", node_id)
        return Message(content, reply_to=request)

    return reply_from


@pytest.fixture
def train_as_node(monkeypatch):
    """Send a train message from the server and answer it with the real ClientApp as node 5,
    the way Flower's runtime calls it (``config``, ``arrays``, ``node_config`` -> reply)."""
    from flwr.app import ConfigRecord, Context

    from fl_client import client_app

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)

    def call(config, arrays, node_config):
        monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
        msg = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord(config)}),
            dst_node_id=5,
            message_type="train",
        )
        monkeypatch.setattr(TaskIdentity, "_node_id", 5, raising=False)
        context = Context(
            run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={}
        )
        return client_app.train(msg, context)

    return call
