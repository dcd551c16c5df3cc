"""Building a factory round's inputs in tests: the server's instruction and the factory's site.

Tests describe local training with a :class:`~fl_client.training.LocalTrainConfig`; a round
takes the server's :class:`~fl_common.protocol.TrainInstruction` instead, whose per-round seed
the factory derives (:func:`fl_client.factory.local_seed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fl_client.attacks import AttackConfig
from fl_client.factory import FactoryRoundResult, FactorySite, run_factory_round
from fl_client.training import LocalTrainConfig
from fl_common.protocol import TrainInstruction
from standard_models.base import StandardTask


def instruction_for(
    cfg: LocalTrainConfig,
    run_id: str = "run",
    server_round: int = 1,
    planned_rounds: int = 1,
    **fields: Any,
) -> TrainInstruction:
    """The instruction a server would send for local training ``cfg`` (``fields`` override)."""
    values: dict[str, Any] = {
        "task": "tep_fault",
        "run_id": run_id,
        "server_round": server_round,
        "planned_rounds": planned_rounds,
        "local_epochs": cfg.local_epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "momentum": cfg.momentum,
        "proximal_mu": cfg.proximal_mu,
        "dp": cfg.dp,
        "epsilon": 0.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "max_grad_norm": cfg.max_grad_norm,
        "grad_sample_mode": cfg.grad_sample_mode,
        "seed": cfg.seed,
    }
    values.update(fields)
    return TrainInstruction(**values)


def run_round(
    task: StandardTask,
    cfg: LocalTrainConfig,
    data_path: str | Path,
    ledger_path: str | Path,
    global_state: dict[str, torch.Tensor],
    epsilon_budget: float,
    delta: float = 1e-5,
    run_id: str = "run",
    server_round: int = 1,
    planned_rounds: int = 1,
    factory_id: str = "f0",
    carried: list | None = None,
    attack: AttackConfig | None = None,
    **fields: Any,
) -> FactoryRoundResult:
    """One factory round with local training ``cfg`` (``fields``: other instruction fields)."""
    instruction = instruction_for(cfg, run_id, server_round, planned_rounds, delta=delta, **fields)
    site = FactorySite(factory_id, Path(data_path), Path(ledger_path), epsilon_budget, delta)
    return run_factory_round(
        task,
        instruction,
        site,
        global_state,
        carried_history=carried,
        attack=attack,
        reproducible_dp=cfg.reproducible_dp,
    )
