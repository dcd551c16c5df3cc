"""The factory's ClientApp: local DP training on the factory's own data, one reply per round.

Where the data and the privacy ledger live is the factory's decision, set in its node config:

* ``data-path``: the factory's Parquet file;
* ``ledger-path``: its privacy ledger (JSON), kept across rounds and runs;
* ``factory-id``: the name the operator sees (defaults to ``factory_<partition-id>``);
* ``epsilon-budget`` / ``delta``: the factory's own privacy budget (else the federation's).

In simulation the runner passes ``data-dir`` and ``output-dir`` in the run config instead (the
ServerApp also adds them to the train config for ``flwr run`` without the runner) and each
simulated factory uses ``factory_<partition-id>.parquet`` and ``<output-dir>/privacy``.

Every failure is answered, never raised: the reply carries the factory id, a status
(``declined`` for budget, ``data-error`` for an unusable file, ``error`` otherwise) and the
reason, so the server records it and the round goes on with the other factories.

Robustness benches (simulation only): the train config may name an attack and the malicious
factories (keys ``attack``, ``attack-factories``, ``attack-fraction``, ``attack-factor``,
``attack-std``; see :mod:`fl_client.attacks`). A named factory poisons its training labels or
its reply. A deployed factory (one whose node config sets ``data-path``) refuses such an
instruction and answers ``error``, so no operator can make a real plant poison the federation.
Once the attack keys parse (absent keys mean no attack), every reply carries the
metric ``malicious`` (1.0 or 0.0) so the benches can tell attackers apart. Factories not named,
and every factory when the config has no attack, train exactly as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_client.attacks import AttackConfig
from fl_client.factory import run_factory_round
from fl_client.privacy import BudgetExhausted, PrivacyLedger
from fl_client.training import LocalTrainConfig
from standard_models.base import DataValidationError
from standard_models.datafiles import factory_path
from standard_models.registry import get_task
from strategies.hooked import FACTORY_RECORD
from strategies.reports import ACCEPTED, DATA_ERROR, DECLINED, ERROR

app = ClientApp()

_STATE_KEY = "privacy"


def factory_id_of(context: Context) -> str:
    """The factory's name: node config ``factory-id`` or ``factory_<partition-id>``."""
    nc = context.node_config
    if "factory-id" in nc:
        return str(nc["factory-id"])
    return f"factory_{int(nc.get('partition-id', 0)):03d}"


def paths_of(context: Context, factory_id: str, config: ConfigRecord) -> tuple[Path, Path]:
    """Data file and privacy-ledger file of this factory (see the module docstring).

    Precedence: the factory's node config, then the run config, then the simulation hints
    (``data-dir``/``output-dir``) the ServerApp adds to the train config, which only simulated
    factories without any node config ever use.
    """
    nc, rc = context.node_config, context.run_config
    data_dir = str(rc.get("data-dir", "") or config.get("data-dir", ""))
    out_dir = str(rc.get("output-dir", "") or config.get("output-dir", ""))
    if "data-path" in nc:
        data_path = Path(str(nc["data-path"]))
    elif data_dir:
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


def _reply(
    msg: Message,
    factory_id: str,
    status: str,
    reason: str = "",
    arrays: ArrayRecord | None = None,
    metrics: dict | None = None,
) -> Message:
    content = RecordDict(
        {
            FACTORY_RECORD: ConfigRecord(
                {"factory-id": factory_id, "status": status, "reason": reason}
            )
        }
    )
    if arrays is not None:
        content["arrays"] = arrays
    content["metrics"] = MetricRecord(metrics or {})
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round with DP-SGD and reply with weights and metrics, or say why not.

    A factory the train config names as malicious carries out the attack (simulation only,
    see the module docstring); a malformed attack config is answered with status ``error``.
    """
    factory_id = factory_id_of(context)
    cfg = msg.content["config"]
    nc = context.node_config
    epsilon = float(nc.get("epsilon-budget", cfg["epsilon"]))
    delta = float(nc.get("delta", cfg["delta"]))
    accountant = str(cfg["accountant"])
    ledger_path: Path | None = None
    marks: dict[str, float] = {}
    try:
        attack = AttackConfig.from_config(cfg)
        marks = {"malicious": 1.0 if attack.is_malicious(factory_id) else 0.0}
        if marks["malicious"] and "data-path" in nc:
            raise PermissionError(
                f"factory {factory_id} was told to carry out attack '{attack.name}'; attacks "
                "are for simulated robustness benches, and a deployed factory (one with a "
                "data-path in its node config) refuses them"
            )
        data_path, ledger_path = paths_of(context, factory_id, cfg)
        task = get_task(str(cfg["task"]))
        train_cfg = LocalTrainConfig(
            local_epochs=int(cfg["local-epochs"]),
            batch_size=int(cfg["batch-size"]),
            lr=float(cfg["lr"]),
            momentum=float(cfg["momentum"]),
            max_grad_norm=float(cfg["max-grad-norm"]),
            proximal_mu=float(cfg.get("proximal-mu", 0.0)),
            dp=bool(cfg["dp"]),
            grad_sample_mode=str(cfg["grad-sample-mode"]),
            seed=int(cfg["seed"]) * 1000 + int(cfg["server-round"]),
        )
        carried = None
        if _STATE_KEY in context.state:
            carried = json.loads(str(context.state[_STATE_KEY]["history"]))
        result = run_factory_round(
            task=task,
            data_path=data_path,
            ledger_path=ledger_path,
            factory_id=factory_id,
            run_id=str(cfg["run-id"]),
            server_round=int(cfg["server-round"]),
            planned_rounds=int(cfg["planned-rounds"]),
            global_state=msg.content["arrays"].to_torch_state_dict(),
            train_cfg=train_cfg,
            epsilon_budget=epsilon,
            delta=delta,
            accountant=accountant,
            carried_history=carried,
            min_run_epsilon=float(cfg.get("min-run-epsilon", 0.0)),
            attack=attack,
        )
    except DataValidationError as exc:
        return _reply(msg, factory_id, DATA_ERROR, str(exc), metrics=marks)
    except BudgetExhausted as exc:
        spent = dict(marks)
        if ledger_path is not None and ledger_path.exists():
            ledger = PrivacyLedger.open(ledger_path, factory_id, epsilon, delta, accountant)
            spent["epsilon"] = ledger.spent_epsilon()
        return _reply(msg, factory_id, DECLINED, str(exc), metrics=spent)
    except Exception as exc:  # the factory answers with the reason instead of vanishing
        return _reply(msg, factory_id, ERROR, f"{type(exc).__name__}: {exc}")
    context.state[_STATE_KEY] = ConfigRecord({"history": json.dumps(result.history)})
    return _reply(
        msg, factory_id, ACCEPTED, arrays=ArrayRecord(result.state_dict), metrics=result.metrics
    )
