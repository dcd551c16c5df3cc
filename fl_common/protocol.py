"""The wire protocol between the operator's server and a factory: one definition, both sides.

Each round the server sends every sampled factory the global model (an ArrayRecord) and a
:class:`TrainInstruction` as the message's ``config`` ConfigRecord; the factory answers with a
:class:`TrainReply`. Neither side writes or reads the dashed record keys by hand: the server
builds the instruction once from its config and Flower's strategies add ``server-round`` (and
FedProx ``proximal-mu``) to the same record; the factory parses it with
:meth:`TrainInstruction.from_record`, which names the key at fault when one is missing or of
the wrong type.

A reply keeps the shape Flower's strategies need: an accepted reply holds exactly one
ArrayRecord (``arrays``) and one MetricRecord (``metrics``, with a scalar ``num-examples``),
plus the ConfigRecord :data:`REPLY_RECORD` with the factory id, its status and the reason. The
server removes that record before the inner strategy aggregates.

Plain data, numpy and Flower record types only: no torch, no server or factory code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

#: Key of the ConfigRecord a factory adds to its reply (identity, status, reason).
REPLY_RECORD = "factory"
#: Keys of the instruction and the model in the server's train message (Flower's defaults).
CONFIG_RECORD = "config"
ARRAYS_RECORD = "arrays"
#: Key of the reply's MetricRecord.
METRICS_RECORD = "metrics"

# Reply statuses.
ACCEPTED = "accepted"  # the factory trained; the update is aggregated unless validation fails
REJECTED = "rejected"  # the server refused the update (validation); never sent by a factory
DECLINED = "declined"  # the factory refused to train (privacy budget)
DATA_ERROR = "data-error"  # the factory's data file is unusable
ERROR = "error"  # anything else that failed on the factory side
#: The statuses a factory may send (``rejected`` is the server's verdict, not a reply).
REPLY_STATUSES = (ACCEPTED, DECLINED, DATA_ERROR, ERROR)

# Reply metric names (MetricRecord keys). Flower's strategies weight by ``num-examples``.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EPSILON = "epsilon"  # cumulative DP spend of the factory after the round
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
SAMPLE_RATE = "sample_rate"
STEPS = "steps"
TRAIN_TIME = "train_time"
DP = "dp"  # 1 if the round ran DP-SGD, else 0
MALICIOUS = "malicious"  # simulated robustness benches only: 1.0 for an attacking factory
#: The factory's privacy facts, from its reply record (see :func:`reply_metrics`).
EPSILON_BUDGET = "epsilon_budget"  # the factory's own lifetime epsilon budget
PRIVACY_UNIT_RANK = "privacy_unit_rank"  # 0: the task's declared unit; k: its k-th coarser one
#: Reply-record key of the factory's keyed record sketch (little-endian uint64 hashes as bytes).
RECORD_SKETCH = "record-sketch"
#: Most hashes a record sketch may hold (the factories' default is 256).
MAX_SKETCH_HASHES = 4096


def encode_sketch(hashes: np.ndarray) -> bytes:
    """A record sketch (unsigned 64-bit hashes) as the bytes a reply carries."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64)).astype("<u8").tobytes()


def decode_sketch(data: bytes) -> np.ndarray:
    """The hashes of a reply's record sketch, sorted and unique.

    Raises:
        ProtocolError: as :func:`check_sketch`.
    """
    check_sketch(data)
    return np.unique(np.frombuffer(data, dtype="<u8").astype(np.uint64))


def check_sketch(data: object) -> None:
    """Check a reply's record sketch without decoding it.

    Raises:
        ProtocolError: not bytes, empty, not a whole number of 8-byte hashes, or more than
            :data:`MAX_SKETCH_HASHES` of them; the message names the key.
    """
    if not isinstance(data, bytes):
        raise ProtocolError(f"reply key '{RECORD_SKETCH}' must be bytes, got {type(data).__name__}")
    if not data or len(data) % 8:
        raise ProtocolError(
            f"reply key '{RECORD_SKETCH}' must be a non-empty whole number of 8-byte hashes, "
            f"got {len(data)} bytes"
        )
    if len(data) // 8 > MAX_SKETCH_HASHES:
        raise ProtocolError(
            f"reply key '{RECORD_SKETCH}' holds {len(data) // 8} hashes, more than "
            f"{MAX_SKETCH_HASHES}"
        )


class ProtocolError(ValueError):
    """A record that does not follow the protocol; the message names the key and the value."""


def _key(wire: str, default: Any = MISSING, required: bool | None = None) -> Any:
    """A dataclass field stored under the record key ``wire``.

    ``required``: whether a parsed record must hold the key (default: unless ``default``).
    """
    need = default is MISSING if required is None else required
    if default is MISSING:
        return field(metadata={"key": wire, "required": need})
    return field(default=default, metadata={"key": wire, "required": need})


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def _typed(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` if the record holds that type (an int is a valid float)."""
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ProtocolError(
            f"train instruction key '{key}' must be {_TYPE_NAMES[kind]}, "
            f"got {type(value).__name__} {value!r}"
        )
    return value


@dataclass(frozen=True)
class TrainInstruction:
    """Everything the server sends a factory with the global model, one field per record key.

    ``server_round`` is the true round of the run (a resumed run continues its count); the
    server builds the instruction once with 0 and Flower's strategies set the round on the
    record each round, so a parsed record must hold it. ``seed`` is the run's seed: the
    factory derives its per-round seed from it. ``epsilon``/``delta`` are the federation's
    default budget (a factory's own node config may set its own). ``data_dir``/``output_dir``
    are simulation hints that a factory with a node config never reads. The ``attack*``
    fields name a simulated attack and its malicious factories (robustness benches only; see
    :mod:`fl_client.attacks`); the parameters an attack does not use are ``None`` and absent
    from the record. ``record_sketch_required``: the server rejects a reply without the
    factory's record sketch (``validation.require_record_sketch``), so a factory that sends
    none declines before training instead of spending privacy budget on a rejected update.
    """

    task: str = _key("task")
    run_id: str = _key("run-id")
    planned_rounds: int = _key("planned-rounds")
    local_epochs: int = _key("local-epochs")
    batch_size: int = _key("batch-size")
    lr: float = _key("lr")
    momentum: float = _key("momentum")
    dp: bool = _key("dp")
    epsilon: float = _key("epsilon")
    delta: float = _key("delta")
    accountant: str = _key("accountant")
    max_grad_norm: float = _key("max-grad-norm")
    grad_sample_mode: str = _key("grad-sample-mode")
    seed: int = _key("seed")
    server_round: int = _key("server-round", 0, required=True)
    proximal_mu: float = _key("proximal-mu", 0.0)
    min_run_epsilon: float = _key("min-run-epsilon", 0.0)
    record_sketch_required: bool = _key("record-sketch-required", False)
    data_dir: str = _key("data-dir", "")
    output_dir: str = _key("output-dir", "")
    attack: str = _key("attack", "none")
    attack_factories: str = _key("attack-factories", "")
    attack_fraction: float | None = _key("attack-fraction", None)
    attack_factor: float | None = _key("attack-factor", None)
    attack_std: float | None = _key("attack-std", None)

    def to_record(self) -> ConfigRecord:
        """The instruction as the flat ConfigRecord Flower sends (``None`` fields left out)."""
        return ConfigRecord(
            {
                f.metadata["key"]: getattr(self, f.name)
                for f in fields(self)
                if getattr(self, f.name) is not None
            }
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainInstruction:
        """Parse the ``config`` record of a train message (a ConfigRecord or any mapping).

        Keys other than the instruction's are ignored (a strategy may add its own).

        Raises:
            ProtocolError: a required key is missing or a key holds the wrong type; the
                message names the key.
        """
        values: dict[str, Any] = {}
        missing = []
        for f in fields(cls):
            key = f.metadata["key"]
            if key not in record:
                if f.metadata["required"]:
                    missing.append(key)
                continue
            kind = _FIELD_TYPES[f.name]
            values[f.name] = _typed(key, record[key], kind)
        if missing:
            raise ProtocolError(
                f"train instruction lacks {', '.join(repr(k) for k in missing)} "
                f"(keys present: {', '.join(sorted(record)) or 'none'})"
            )
        return cls(**values)


#: The Python type each instruction field holds on the wire (``None`` is never sent).
_FIELD_TYPES: dict[str, type] = {
    f.name: {"int": int, "float": float, "str": str, "bool": bool}[
        str(f.type).split("|")[0].strip()
    ]
    for f in fields(TrainInstruction)
}


def _numeric_metrics(content: RecordDict) -> dict[str, float]:
    """Every int/float value of the reply's MetricRecords, as floats."""
    out: dict[str, float] = {}
    for record in content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, int | float):
                out[key] = float(value)
    return out


def claimed_factory_id(content: RecordDict) -> str | None:
    """The factory id a reply claims, or None when it carries no reply record."""
    info = content.config_records.get(REPLY_RECORD)
    if info is None or "factory-id" not in info:
        return None
    return str(info["factory-id"])


@dataclass
class TrainReply:
    """A factory's answer to one train message.

    ``factory_id`` is None only for a reply without a reply record (a plain Flower client);
    its status is then ``accepted``. ``arrays`` holds the trained weights of an accepted reply.
    ``metrics`` holds int/float values only (MetricRecord refuses numpy scalars and bools).

    The factory's privacy facts travel in the reply record, optional so that a factory that
    does not send them still speaks the protocol: ``epsilon_budget`` its own lifetime budget
    (its node config, or the federation's default it took), ``privacy_unit`` the name of the
    unit its epsilon counts and ``privacy_unit_rank`` where that unit stands among the task's
    units (``StandardTask.unit_names()``: 0 the declared unit, ``k`` the ``k``-th coarser one).
    They sit outside the MetricRecord, which Flower's strategies require to hold the same keys
    in every reply. So does ``record_sketch``, optional too: the keyed MinHash sketch of the
    records the factory trains on (:func:`~strategies.contribution.guards.record_fingerprint`,
    as :func:`encode_sketch` bytes), which lets the server group factories holding the same
    records without seeing any of them.
    """

    factory_id: str | None
    status: str
    reason: str = ""
    arrays: ArrayRecord | None = None
    metrics: dict[str, float | int] = field(default_factory=dict)
    epsilon_budget: float | None = None
    privacy_unit: str = ""
    privacy_unit_rank: int | None = None
    record_sketch: bytes = b""

    def to_record(self) -> RecordDict:
        """The reply's content: the reply record, ``arrays`` if any, and ``metrics``."""
        if self.status not in REPLY_STATUSES:
            raise ProtocolError(
                f"reply status must be one of {', '.join(REPLY_STATUSES)}, got {self.status!r}"
            )
        info: dict[str, Any] = {
            "factory-id": str(self.factory_id or ""),
            "status": self.status,
            "reason": self.reason,
        }
        if self.epsilon_budget is not None:
            info["epsilon-budget"] = float(self.epsilon_budget)
        if self.privacy_unit:
            info["privacy-unit"] = str(self.privacy_unit)
        if self.privacy_unit_rank is not None:
            info["privacy-unit-rank"] = int(self.privacy_unit_rank)
        if self.record_sketch:
            check_sketch(self.record_sketch)
            info[RECORD_SKETCH] = bytes(self.record_sketch)
        content = RecordDict({REPLY_RECORD: ConfigRecord(info)})
        if self.arrays is not None:
            content[ARRAYS_RECORD] = self.arrays
        content[METRICS_RECORD] = MetricRecord(dict(self.metrics))
        return content

    def to_message(self, request: Message) -> Message:
        """The reply message to ``request``."""
        return Message(self.to_record(), reply_to=request)

    @classmethod
    def from_record(cls, content: RecordDict) -> TrainReply:
        """Parse a reply's content; the metrics are every numeric value it reports.

        Raises:
            ProtocolError: an unknown status, or an accepted reply that does not hold exactly
                one ArrayRecord and one MetricRecord.
        """
        info = content.config_records.get(REPLY_RECORD, ConfigRecord())
        status = str(info.get("status", ACCEPTED))
        if status not in REPLY_STATUSES:
            raise ProtocolError(f"unknown status '{status}'")
        arrays = None
        if status == ACCEPTED:
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                raise ProtocolError("reply must hold one ArrayRecord and one MetricRecord")
            arrays = next(iter(content.array_records.values()))
        facts = _privacy_facts(info)
        sketch = info.get(RECORD_SKETCH)
        if sketch is not None:
            check_sketch(sketch)
        return cls(
            factory_id=claimed_factory_id(content),
            status=status,
            reason=str(info.get("reason", "")),
            arrays=arrays,
            metrics=_numeric_metrics(content),
            epsilon_budget=facts.get(EPSILON_BUDGET),
            privacy_unit=str(info.get("privacy-unit", "")),
            privacy_unit_rank=None if PRIVACY_UNIT_RANK not in facts else int(
                facts[PRIVACY_UNIT_RANK]
            ),
            record_sketch=b"" if sketch is None else bytes(sketch),
        )

    @classmethod
    def from_message(cls, msg: Message) -> TrainReply:
        """Parse the content of reply ``msg`` (which must not be an error reply)."""
        return cls.from_record(msg.content)


def _privacy_facts(info: Mapping[str, Any]) -> dict[str, float]:
    """``epsilon_budget`` and ``privacy_unit_rank`` of a reply record, where it holds them.

    Raises:
        ProtocolError: a value of the wrong type or out of range; the message names the key.
    """
    out: dict[str, float] = {}
    budget = info.get("epsilon-budget")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
            raise ProtocolError(f"reply key 'epsilon-budget' must be a positive number, got "
                                f"{budget!r}")
        out[EPSILON_BUDGET] = float(budget)
    rank = info.get("privacy-unit-rank")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ProtocolError(f"reply key 'privacy-unit-rank' must be an integer >= 0, got "
                                f"{rank!r}")
        out[PRIVACY_UNIT_RANK] = float(rank)
    return out


def reply_metrics(content: RecordDict) -> dict[str, float]:
    """The numeric metrics of any reply content, even one that breaks the protocol.

    The factory's privacy facts in the reply record are added as ``epsilon_budget`` and
    ``privacy_unit_rank`` when they are there and well formed (a malformed one is left out
    here; :meth:`TrainReply.from_record` names it).
    """
    out = _numeric_metrics(content)
    try:
        out.update(_privacy_facts(content.config_records.get(REPLY_RECORD, ConfigRecord())))
    except ProtocolError:
        pass
    return out
