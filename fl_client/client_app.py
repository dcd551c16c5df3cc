"""The factory's ClientApp: local DP training on the factory's own data, one reply per round.

Where the data and the privacy ledger live is the factory's decision, set in its node config:

* ``data-path``: the factory's Parquet file;
* ``ledger-path``: its privacy ledger (JSON), kept across rounds and runs;
* ``factory-id``: the name the operator sees (defaults to ``factory_<partition-id>``);
* the factory's privacy policy (:mod:`fl_client.policy`): ``epsilon-budget``, ``delta``,
  ``accountant``, ``min-noise-multiplier``, ``max-round-epsilon``, ``min-grad-norm``,
  ``max-grad-norm`` and ``privacy-unit``;
* ``record-sketch-key``: the secret (16 to 64 bytes) the federation's factories agreed among
  themselves, without the operator, for record sketches (:mod:`fl_common.sketch`). With it,
  every accepted reply carries the keyed sketch of the factory's records, so the server can pay
  factories holding the same records as one; without it a deployed factory sends none.
  Simulated factories (no ``data-path``) all share a key derived from the run id, so the
  simulation runs the same code; there every factory is on the operator's machine anyway.

A deployed factory (node config with ``data-path``) requires DP and takes from the server's
instruction only what makes privacy stronger: an instruction that would weaken its policy is
answered ``declined`` with a reason starting ``privacy policy:`` that names the field, before
any data is read or the ledger touched. A simulated factory takes the server's privacy
settings (``privacy=none`` baselines included), with its node config budget when it sets one.

In simulation the runner passes ``data-dir`` and ``output-dir`` in the run config instead (the
ServerApp also adds them to the train config for ``flwr run`` without the runner) and each
simulated factory uses ``factory_<partition-id>.parquet`` and ``<output-dir>/privacy``.

Every failure is answered, never raised: the reply carries the factory id, a status
(``declined`` for budget or privacy policy, ``data-error`` for an unusable file, ``error``
otherwise) and the reason, so the server records it and the round goes on with the other factories.
Once the factory's site is known, every reply also states its own epsilon budget and the unit
its epsilon counts (:func:`privacy_facts`), so the operator counts its epsilon left against the
factory's budget rather than the federation's.

What the server sends and what the factory answers is defined once, in
:mod:`fl_common.protocol` (:class:`~fl_common.protocol.TrainInstruction`,
:class:`~fl_common.protocol.TrainReply`).

Robustness benches (simulation only): the instruction may name an attack and the malicious
factories (keys ``attack``, ``attack-factories``, ``attack-fraction``, ``attack-factor``,
``attack-std``; see :mod:`fl_client.attacks`). A named factory poisons its training labels or
its reply. A deployed factory (one whose node config sets ``data-path``) refuses such an
instruction and answers ``error``, so no operator can make a real plant poison the federation.
Once the attack keys parse (absent keys mean no attack), every reply carries the
metric ``malicious`` (1.0 or 0.0) so the benches can tell attackers apart. Factories not named,
and every factory when the config has no attack, train exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fl_client.attacks import AttackConfig
from fl_client.factory import FactorySite, run_factory_round
from fl_client.policy import PolicyDeclined, PrivacyPolicy, effective_settings
from fl_client.privacy import BudgetExhausted, PrivacyLedger
from fl_common.protocol import (
    ACCEPTED,
    ARRAYS_RECORD,
    CONFIG_RECORD,
    DATA_ERROR,
    DECLINED,
    EPSILON,
    ERROR,
    MALICIOUS,
    TrainInstruction,
    TrainReply,
    encode_sketch,
)
from fl_common.sketch import is_sketch_key
from standard_models.base import DataValidationError
from standard_models.datafiles import factory_path
from standard_models.registry import get_task

app = ClientApp()

_STATE_KEY = "privacy"


def factory_id_of(context: Context) -> str:
    """The factory's name: node config ``factory-id`` or ``factory_<partition-id>``."""
    nc = context.node_config
    if "factory-id" in nc:
        return str(nc["factory-id"])
    return f"factory_{int(nc.get('partition-id', 0)):03d}"


def paths_of(context: Context, factory_id: str, instruction: TrainInstruction) -> tuple[Path, Path]:
    """Data file and privacy-ledger file of this factory (see the module docstring).

    Precedence: the factory's node config, then the run config, then the simulation hints
    (``data-dir``/``output-dir``) the ServerApp adds to the instruction, which only simulated
    factories without any node config ever use. A deployed factory (``data-path`` in its node
    config) never takes a path from the operator: its ledger is ``ledger-path`` or sits next
    to its data file, so no run config can point it at a fresh, empty ledger.
    """
    nc, rc = context.node_config, context.run_config
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"]))
        ledger_path = Path(str(nc.get("ledger-path") or data_path.with_suffix(".privacy.json")))
        return data_path, ledger_path
    data_dir = str(rc.get("data-dir", "") or instruction.data_dir)
    out_dir = str(rc.get("output-dir", "") or instruction.output_dir)
    if data_dir:
        data_path = factory_path(Path(data_dir), int(nc.get("partition-id", 0)))
    else:
        raise DataValidationError("<node config>", "no 'data-path' in the node config")
    if "ledger-path" in nc:
        ledger_path = Path(str(nc["ledger-path"]))
    elif out_dir:
        ledger_path = Path(out_dir) / "privacy" / f"{factory_id}.json"
    else:
        ledger_path = data_path.with_suffix(".privacy.json")
    return data_path, ledger_path


#: Node-config key of the factories' shared secret for record sketches.
SKETCH_KEY = "record-sketch-key"


def sketch_key_of(context: Context, instruction: TrainInstruction) -> str | None:
    """The key this factory's record sketch is made with, or None to send no sketch.

    The node config's ``record-sketch-key`` (a deployed factory's opt-in); a simulated factory
    without one uses a key derived from the run id, the same for every factory of the run.

    Raises:
        ValueError: the node config's key is not a string of 16 to 64 bytes; names the key.
    """
    nc = context.node_config
    if SKETCH_KEY in nc:
        key = nc[SKETCH_KEY]
        if not is_sketch_key(key):
            size = f"{len(key.encode())} bytes" if isinstance(key, str) else type(key).__name__
            raise ValueError(
                f"node config {SKETCH_KEY}: must be a string of 16 to 64 bytes, got {size}"
            )
        return key
    if "data-path" in nc:
        return None
    return hashlib.blake2b(f"simulation/{instruction.run_id}".encode(), digest_size=16).hexdigest()


def site_of(context: Context, factory_id: str, instruction: TrainInstruction) -> FactorySite:
    """The factory's own facts: its paths and its privacy policy (node config first).

    Raises:
        fl_client.policy.PolicyError: a policy key of the node config is invalid.
    """
    policy = PrivacyPolicy.from_node_config(context.node_config)
    data_path, ledger_path = paths_of(context, factory_id, instruction)
    settings = effective_settings(policy, instruction)
    return FactorySite(
        factory_id=factory_id,
        data_path=data_path,
        ledger_path=ledger_path,
        epsilon_budget=settings.epsilon_budget,
        delta=settings.delta,
        accountant=settings.accountant if policy.deployed else None,
        epsilon_cap=settings.epsilon_cap if policy.deployed else None,
        privacy_unit=settings.privacy_unit,
        policy=policy if policy.deployed else None,
        sketch_key=sketch_key_of(context, instruction),
    )


def privacy_facts(site: FactorySite | None, instruction: TrainInstruction | None) -> dict[str, Any]:
    """What a reply tells the server about this factory's privacy, once the site is known.

    The factory's own lifetime budget (when finite) and the unit its epsilon counts, by name
    and by rank among the task's units (0: the declared unit; see
    :class:`~fl_common.protocol.TrainReply`). Empty before the site is known; the unit is left
    out when the task or the unit is unknown (that reply is an error anyway).
    """
    if site is None or instruction is None:
        return {}
    facts: dict[str, Any] = {}
    if math.isfinite(site.epsilon_budget) and site.epsilon_budget > 0:
        facts["epsilon_budget"] = float(site.epsilon_budget)
    try:
        task = get_task(instruction.task)
        unit = task.get_privacy_unit(site.privacy_unit).name
    except (KeyError, ValueError):
        return facts
    return {**facts, "privacy_unit": unit, "privacy_unit_rank": task.unit_names().index(unit)}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round with DP-SGD and reply with weights and metrics, or say why not.

    A factory the instruction names as malicious carries out the attack (simulation only,
    see the module docstring); a malformed instruction or attack config is answered with
    status ``error``.
    """
    factory_id = factory_id_of(context)
    site: FactorySite | None = None
    instruction: TrainInstruction | None = None
    marks: dict[str, float] = {}
    try:
        instruction = TrainInstruction.from_record(msg.content[CONFIG_RECORD])
        attack = AttackConfig.from_config(instruction.to_record())
        marks = {MALICIOUS: 1.0 if attack.is_malicious(factory_id) else 0.0}
        if marks[MALICIOUS] and "data-path" in context.node_config:
            raise PermissionError(
                f"factory {factory_id} was told to carry out attack '{attack.name}'; attacks "
                "are for simulated robustness benches, and a deployed factory (one with a "
                "data-path in its node config) refuses them"
            )
        site = site_of(context, factory_id, instruction)
        carried = None
        if _STATE_KEY in context.state:
            carried = json.loads(str(context.state[_STATE_KEY]["history"]))
        result = run_factory_round(
            task=get_task(instruction.task),
            instruction=instruction,
            site=site,
            global_state=msg.content[ARRAYS_RECORD].to_torch_state_dict(),
            carried_history=carried,
            attack=attack,
        )
    except PolicyDeclined as exc:
        facts = privacy_facts(site, instruction)
        return TrainReply(factory_id, DECLINED, str(exc), metrics=marks, **facts).to_message(msg)
    except DataValidationError as exc:
        facts = privacy_facts(site, instruction)
        return TrainReply(factory_id, DATA_ERROR, str(exc), metrics=marks, **facts).to_message(
            msg
        )
    except BudgetExhausted as exc:
        spent = dict(marks)
        if site is not None and instruction is not None and site.ledger_path.exists():
            ledger = PrivacyLedger.open(
                site.ledger_path,
                factory_id,
                site.epsilon_budget,
                site.delta,
                site.accountant or instruction.accountant,
            )
            spent[EPSILON] = ledger.spent_epsilon()
        facts = privacy_facts(site, instruction)
        return TrainReply(factory_id, DECLINED, str(exc), metrics=spent, **facts).to_message(msg)
    except Exception as exc:  # the factory answers with the reason instead of vanishing
        return TrainReply(factory_id, ERROR, f"{type(exc).__name__}: {exc}").to_message(msg)
    context.state[_STATE_KEY] = ConfigRecord({"history": json.dumps(result.history)})
    reply = TrainReply(
        factory_id,
        ACCEPTED,
        arrays=ArrayRecord(result.state_dict),
        metrics=result.metrics,
        record_sketch=encode_sketch(result.record_sketch) if result.record_sketch.size else b"",
        **privacy_facts(site, instruction),
    )
    return reply.to_message(msg)
