"""A whole federation in one process: the real ServerApp logic and the real ClientApp, no engine.

Benchmarks need hundreds of federation runs. Flower's simulation engine costs about 15-20 s of
start-up per run through ``flwr run`` (:mod:`fl_server.launch.simulation`), and Flower 1.42's own
in-process engine (``flwr.simulation.run_simulation``, Ray backend) measured about 25 s per run
on this project's 2-core machine, nearly all of it spent starting Ray actors and importing torch
and Opacus in them, for rounds whose training takes under a second. So this module runs
:func:`fl_server.server_app.run_federation` unchanged with :class:`InProcessGrid`, a Flower
``Grid`` that delivers every instruction message to :data:`fl_client.client_app.app` (a
``flwr.clientapp.ClientApp``) in this process, through the ClientApp's public entry
``app(message, context)``, so the registered handlers and their Flower plumbing run exactly as
in deployment. Only the transport is replaced:

* ``get_node_ids`` lists N simulated nodes; each has one persistent ``flwr.app.Context``
  (node config ``partition-id`` and ``num-partitions``, as Flower's simulation gives its
  virtual nodes; run config ``config-file``, ``data-dir`` and ``output-dir``, as
  :func:`experiments.run.run_simulation` passes; ``state`` kept across rounds);
* messages are delivered one at a time, in node-id order, on a copy of their content (in
  deployment a message crosses a serialisation boundary: neither side may see the other's
  later edits), and replies come back sorted by node id, so a run does not depend on the order
  in which the strategy happened to sample its nodes;
* an exception raised by the ClientApp becomes an error reply with Flower's
  ``CLIENT_APP_RAISED_EXCEPTION`` code, as Flower's runtimes answer it;
* messages are built with public constructors (``Message(..., metadata=Metadata(...))``,
  ``Message(error, reply_to=...)``), with message ids, ``reply_to_message_id``, and source and
  destination node ids set as a SuperLink would; nothing in Flower is patched.

A round's ``timeout`` still holds: a node whose turn comes after the deadline gets no message
and the round goes on without its reply, as it would without that node's answer in deployment.

    python -m experiments.inprocess task=molding_quality federation.num_factories=3 \\
        federation.num_rounds=2                 # any Hydra override of conf/, as experiments.run

Writes ``outputs/inprocess/<time>-<task>-<strategy>/`` (``config.yaml``, ``flower.log``,
``summary.json``, checkpoints, privacy ledgers, reward ledger) and logs the MLflow run as
``experiments.run`` does. From Python: :func:`run_inprocess` (the in-process twin of
:func:`experiments.run.run_simulation`).
"""

from __future__ import annotations

import copy
import json
import logging
import random
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from flwr.app import Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.common.logger import FLOWER_LOGGER, console_handler
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig, OmegaConf

from fl_server.config import compose_config, finalize
from fl_server.data import ensure_data

APP_DIR = Path(__file__).resolve().parent.parent

#: User-config values (Flower's ``UserConfig``: node and run config).
UserConfigValue = bool | float | int | str


class InProcessGrid(Grid):
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs (``fl_client.client_app.app`` for factoryfed).
    num_nodes : int
        Number of simulated nodes; node ``i`` gets ``partition-id`` ``i``.
    run_config : Mapping[str, UserConfigValue], optional
        Every node's run config (Flower's ``Context.run_config``).
    seed : int
        Derives the node ids and the run id (random-looking 63-bit integers, as Flower's, so
        nothing can mistake a node id for a partition id; the same seed gives the same ids).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: Mapping[str, UserConfigValue] | None = None,
        seed: int = 0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        self.client_app = client_app
        rng = random.Random(f"factoryfed-inprocess-{seed}-{num_nodes}")
        self._run = Run.create_empty(run_id=rng.getrandbits(63))
        ids: list[int] = []
        while len(ids) < num_nodes:
            node_id = rng.getrandbits(63)
            if node_id not in ids and node_id != SUPERLINK_NODE_ID:
                ids.append(node_id)
        self._node_ids = ids
        self.contexts: dict[int, Context] = {
            node_id: Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, node_id in enumerate(ids)
        }
        self._replies: dict[str, Message] = {}
        self.delivered = 0

    # -- Grid API ----------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Adopt ``run``; the nodes' contexts follow its run id."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run
        for context in self.contexts.values():
            context.run_id = run.run_id

    @property
    def run(self) -> Run:
        """A copy of the run this grid operates in."""
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """An instruction message for ``dst_node_id`` (what ``Message(...)`` builds)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The simulated nodes, always all connected."""
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message to its node now; returns the delivered messages' ids."""
        return self._push(messages, deadline=None)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids`` that are ready (each is handed out once)."""
        out = [self._replies.pop(mid) for mid in message_ids if mid in self._replies]
        return sorted(out, key=lambda m: m.metadata.src_node_id)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver the messages one by one and return the replies, sorted by node id.

        Nodes whose turn comes after ``timeout`` seconds get no message and give no reply.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return self.pull_messages(self._push(messages, deadline))

    # -- delivery ----------------------------------------------------------------------------
    def partition_of(self, node_id: int) -> int:
        """The ``partition-id`` of a node."""
        return int(self.contexts[node_id].node_config[PARTITION_ID_KEY])

    def _push(self, messages: Iterable[Message], deadline: float | None) -> list[str]:
        ids: list[str] = []
        pending = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        for i, msg in enumerate(pending):
            if deadline is not None and time.monotonic() > deadline:
                FLOWER_LOGGER.warning(
                    "In-process grid: round timeout reached, %d message(s) not delivered",
                    len(pending) - i,
                )
                break
            delivered = self._as_delivered(msg)
            self._replies[delivered.metadata.message_id] = self._call(delivered)
            ids.append(delivered.metadata.message_id)
        return ids

    def _as_delivered(self, msg: Message) -> Message:
        """The instruction as a node receives it: a message id and a private copy of content."""
        meta = msg.metadata
        if meta.reply_to_message_id or meta.ttl <= 0 or not msg.has_content():
            raise ValueError(f"not a valid instruction message: {meta}")
        return Message(
            content=copy.deepcopy(msg.content),
            metadata=Metadata(
                run_id=self._run.run_id,
                message_id=uuid.uuid4().hex,
                src_node_id=SUPERLINK_NODE_ID,
                dst_node_id=meta.dst_node_id,
                reply_to_message_id="",
                group_id=meta.group_id,
                created_at=meta.created_at,
                ttl=meta.ttl,
                message_type=meta.message_type,
                src_task_id=meta.src_task_id,
                dst_task_id=meta.dst_task_id,
            ),
        )

    def _call(self, msg: Message) -> Message:
        """Run the ClientApp on one delivered message; returns the stored reply."""
        context = self.contexts.get(msg.metadata.dst_node_id)
        if context is None:
            reply = Message(
                Error(ErrorCode.NODE_UNAVAILABLE, f"unknown node {msg.metadata.dst_node_id}"),
                reply_to=msg,
            )
        else:
            self.delivered += 1
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:  # a Flower runtime answers a crash with an error reply
                FLOWER_LOGGER.exception("ClientApp raised on node %d", msg.metadata.dst_node_id)
                reason = f"{type(exc)}:<'{exc}'>"
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        return self._as_stored(reply, msg)

    def _as_stored(self, reply: Message, ins: Message) -> Message:
        """The reply as the server pulls it: its own id, bound to the instruction it answers."""
        meta = reply.metadata
        if meta.reply_to_message_id != ins.metadata.message_id:
            raise ValueError("the ClientApp's reply does not answer the message it was given")
        metadata = Metadata(
            run_id=self._run.run_id,
            message_id=uuid.uuid4().hex,
            src_node_id=ins.metadata.dst_node_id,
            dst_node_id=SUPERLINK_NODE_ID,
            reply_to_message_id=ins.metadata.message_id,
            group_id=ins.metadata.group_id,
            created_at=meta.created_at,
            ttl=meta.ttl,
            message_type=ins.metadata.message_type,
            src_task_id=meta.src_task_id,
            dst_task_id=meta.dst_task_id,
        )
        if reply.has_error():
            return Message(error=reply.error, metadata=metadata)
        return Message(content=copy.deepcopy(reply.content), metadata=metadata)


@contextmanager
def server_identity(run_id: int) -> Iterator[None]:
    """Give this process the ServerApp's task identity, as Flower's runtime does.

    Strategies build their instruction messages with ``Message(...)``, which reads the run id
    and the sender's node and task ids from ``TaskIdentity``. The previous identity is restored.
    """
    saved = {}
    for name in ("run_id", "node_id", "task_id"):
        try:
            saved[name] = getattr(TaskIdentity, name)
        except RuntimeError:  # not set in this process
            saved[name] = None
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


@contextmanager
def flower_log(path: Path, quiet: bool) -> Iterator[None]:
    """Write Flower's log of the run to ``path``; with ``quiet``, only errors reach the console.

    Quiet also stops Flower's records from propagating to the root logger (some imported
    libraries configure it, which prints every Flower line twice); the file gets them all.
    """
    handler = logging.FileHandler(path, mode="w")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level, propagate = console_handler.level, FLOWER_LOGGER.propagate
    FLOWER_LOGGER.addHandler(handler)
    if quiet:
        console_handler.setLevel(logging.ERROR)
        FLOWER_LOGGER.propagate = False
    try:
        yield
    finally:
        console_handler.setLevel(level)
        FLOWER_LOGGER.propagate = propagate
        FLOWER_LOGGER.removeHandler(handler)
        handler.close()


def default_output_dir(cfg: DictConfig) -> Path:
    """``outputs/inprocess/<date>/<time>-<task>-<strategy>`` under the repository."""
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
    return APP_DIR / "outputs" / "inprocess" / f"{stamp}-{cfg.task.name}-{cfg.strategy.name}"


def run_inprocess(cfg: DictConfig, quiet: bool = False) -> dict:
    """Run one federation in this process; returns ``run_federation``'s summary.

    The in-process twin of :func:`experiments.run.run_simulation`: a config whose paths are not
    filled in yet is finalised first (output under ``outputs/inprocess/``), the factories' data
    is made if missing, the resolved config is written next to the run, and the summary gets
    ``wall_seconds`` (whole run, data included) and ``grid`` (``"inprocess"``).
    """
    from fl_client.client_app import app as client_app
    from fl_server.server_app import run_federation

    if cfg.get("output_dir") is None or cfg.get("data_dir") is None:
        cfg = finalize(cfg, base=APP_DIR, output_dir=default_output_dir(cfg))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    data_dir, _ = ensure_data(cfg)
    config_file = out / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(cfg))
    summary_path = out / "summary.json"
    summary_path.unlink(missing_ok=True)
    grid = InProcessGrid(
        client_app,
        int(cfg.federation.num_factories),
        {"config-file": str(config_file), "data-dir": str(data_dir), "output-dir": str(out)},
        seed=int(cfg.seed),
    )
    with server_identity(grid.run.run_id), flower_log(out / "flower.log", quiet):
        summary = run_federation(grid, cfg)
    summary["wall_seconds"] = time.monotonic() - t0
    summary["grid"] = "inprocess"
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> float:
    """CLI: Hydra overrides of ``conf/`` in, one in-process federation, the summary table out."""
    import torch

    from experiments.run import print_summary

    torch.set_num_threads(1)
    cfg = compose_config(list(sys.argv[1:] if argv is None else argv))
    cfg = finalize(cfg, base=APP_DIR, output_dir=default_output_dir(cfg))
    summary = run_inprocess(cfg)
    print_summary(summary, cfg)
    return float(summary["rounds"][-1][summary["main_metric"]])


if __name__ == "__main__":
    main()
