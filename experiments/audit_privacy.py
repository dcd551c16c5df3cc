"""Empirical privacy audit: membership inference on a factory's DP-SGD model, per privacy unit.

Usage::

    python -m experiments.audit_privacy [--tasks tep_fault rul] [--epsilons 1 3 8]
        [--repeats 3] [--members 300] [--epochs 100] [--shadows 0] [--unit NAME]

For each task, one generated factory's training set is built exactly as the factory builds it
(``StandardTask.to_train_dataset``: one item per privacy unit, so the units share no raw
record). In each repeat its units are shuffled and split into ``--members`` members and as many
non-members. A model is trained on the members only, through the product's training code
(``fl_client.training.train_local`` with the task's network, loss and batch size, ``--epochs``
local epochs), once without DP and once per epsilon in ``--epsilons``, with the noise multiplier
the factory would plan for that budget (``fl_client.privacy.plan_noise_multiplier``, delta
``1e-5``). The attacks then try to tell members from non-members:

* ``loss``: the loss-threshold attack (Yeom et al., 2018): a unit is called a member when the
  model's loss on it (the mean over its examples) is low;
* ``lira`` (with ``--shadows K > 0``): offline LiRA (Carlini et al., 2022): ``K`` shadow models
  are trained the same way on random halves of the pool; for every unit a Gaussian is fitted to
  its losses under the shadow models that did not train on it, and the unit is scored by how
  far below that distribution the target model's loss lies.

The table prints, per task, attack and epsilon, the ROC AUC and the true-positive rate at a 1%
false-positive rate as mean ± standard deviation over the repeats. An AUC of 0.5 is a coin
toss; DP-SGD at epsilon bounds the TPR at FPR ``a`` by ``e^eps * a + delta``, and the audit shows
how far below that bound a concrete attack stays. Without DP the AUC shows the attack's power;
an audit in which the attack has none says nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.utils.data import Dataset, TensorDataset

from fl_client.privacy import plan_noise_multiplier
from fl_client.training import (
    LocalTrainConfig,
    PerSampleLoss,
    sample_rate_for,
    steps_per_epoch,
    train_local,
)
from fl_server.config import compose_config
from standard_models.base import PartitionConfig, StandardTask, UnitDataset
from standard_models.registry import get_task

DELTA = 1e-5
DATA_SEED = 0
NUM_FACTORIES = 4


def subset(dataset: Dataset, units: np.ndarray) -> Dataset:
    """The privacy units ``units`` (item indices) of a training set, as a training set."""
    if isinstance(dataset, UnitDataset):
        x, y, group = dataset.__getitems__([int(u) for u in units])
        return UnitDataset(x, y, group, unit=dataset.unit)
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(units, dtype=torch.long)
        return TensorDataset(*(t[idx] for t in dataset.tensors))
    raise TypeError(f"cannot audit a training set of type {type(dataset).__name__}")


def pool_units(
    task: StandardTask,
    frames: Sequence[pd.DataFrame],
    first: int,
    unit: str | None,
    wanted: int,
) -> tuple[Dataset, list[int]]:
    """Privacy units of factory ``first``, then of the next factories until ``wanted`` are held.

    Each factory's units are built from its own frame, so no unit spans two factories.
    Returns the pooled training set and the factories used.
    """
    order = [first, *(i for i in range(len(frames)) if i != first)]
    parts: list[Dataset] = []
    used: list[int] = []
    for i in order:
        parts.append(task.to_train_dataset(frames[i], unit))
        used.append(i)
        if sum(len(p) for p in parts) >= wanted:  # type: ignore[arg-type]
            break
    if isinstance(parts[0], UnitDataset):
        units = [p for p in parts if isinstance(p, UnitDataset)]
        offset = 0
        groups = []
        for p in units:
            groups.append(torch.repeat_interleave(torch.arange(len(p)), p.counts) + offset)
            offset += len(p)
        return (
            UnitDataset(
                torch.cat([p.x for p in units]),
                torch.cat([p.y for p in units]),
                torch.cat(groups),
                unit=units[0].unit,
            ),
            used,
        )
    tensors = [p.tensors for p in parts if isinstance(p, TensorDataset)]
    return TensorDataset(*(torch.cat(ts) for ts in zip(*tensors, strict=True))), used


@torch.no_grad()
def unit_losses(task: StandardTask, model: torch.nn.Module, dataset: Dataset) -> np.ndarray:
    """The model's loss on every privacy unit of ``dataset`` (mean over the unit's examples)."""
    criterion = PerSampleLoss(task.loss_fn())
    criterion.reduction = "none"
    model.eval()
    if isinstance(dataset, UnitDataset):
        losses = criterion(model(dataset.x), dataset.y)
        unit_of = torch.repeat_interleave(torch.arange(len(dataset)), dataset.counts)
        sums = torch.zeros(len(dataset)).index_add_(0, unit_of, losses.float())
        return (sums / dataset.counts).numpy()
    assert isinstance(dataset, TensorDataset)
    x, y = dataset.tensors
    return criterion(model(x), y).float().numpy()


@dataclass(frozen=True)
class AuditPlan:
    """How every model of the audit is trained."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    max_grad_norm: float


def train_model(
    task: StandardTask,
    dataset: Dataset,
    plan: AuditPlan,
    epsilon: float | None,
    seed: int,
) -> torch.nn.Module:
    """A fresh model trained on ``dataset`` the way a factory trains (``epsilon=None``: no DP)."""
    torch.manual_seed(seed)
    model = task.build_model()
    n = len(dataset)  # type: ignore[arg-type]
    sigma = None
    if epsilon is not None:
        q = sample_rate_for(n, plan.batch_size)
        steps = plan.epochs * steps_per_epoch(n, plan.batch_size)
        sigma = plan_noise_multiplier([], epsilon, DELTA, q, steps)
    cfg = LocalTrainConfig(
        local_epochs=plan.epochs,
        batch_size=plan.batch_size,
        lr=plan.lr,
        momentum=plan.momentum,
        max_grad_norm=plan.max_grad_norm,
        dp=epsilon is not None,
        seed=seed,
        reproducible_dp=True,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        train_local(model, dataset, task.loss_fn(), cfg, noise_multiplier=sigma)
    return model


def attack_metrics(member_scores: np.ndarray, other_scores: np.ndarray) -> tuple[float, float]:
    """ROC AUC and TPR at 1% FPR of scores where higher means 'member'."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(other_scores))]
    scores = np.r_[member_scores, other_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(roc_auc_score(labels, scores)), float(np.interp(0.01, fpr, tpr))


def lira_scores(target: np.ndarray, shadow_losses: np.ndarray, shadow_in: np.ndarray) -> np.ndarray:
    """Offline LiRA: how far below its OUT-model loss distribution each unit's loss lies.

    ``shadow_losses[k, i]`` is unit ``i``'s loss under shadow ``k``; ``shadow_in[k, i]`` whether
    shadow ``k`` trained on it. Losses are mapped to ``log(loss)`` (the logit-confidence scaling
    of LiRA for a loss), a Gaussian is fitted to each unit's OUT values, and the score is the
    one-sided z-statistic of the target's value (higher: more likely a member).
    """
    tiny = 1e-12
    logs = np.log(np.maximum(shadow_losses, tiny))
    out = np.where(shadow_in, np.nan, logs)
    mean = np.nanmean(out, axis=0)
    std = np.nanstd(out, axis=0)
    global_std = float(np.nanstd(out))
    std = np.where(np.isfinite(std) & (std > 0), std, global_std)
    mean = np.where(np.isfinite(mean), mean, float(np.nanmean(out)))
    return (mean - np.log(np.maximum(target, tiny))) / std


def audit_task(
    task_name: str,
    epsilons: Sequence[float],
    repeats: int,
    members: int,
    epochs: int,
    shadows: int,
    unit: str | None,
    factory: int,
) -> list[tuple[str, str, str, list[float], list[float]]]:
    """Rows ``(task, attack, epsilon label, AUCs, TPRs@1%FPR)`` of one task's audit."""
    cfg = compose_config([f"task={task_name}"])
    task = get_task(task_name)
    data = task.generate(NUM_FACTORIES, DATA_SEED, PartitionConfig())
    pool, used = pool_units(task, data.factories, factory, unit, 2 * members)
    n_units = len(pool)  # type: ignore[arg-type]
    members = min(members, n_units // 2)
    if members < 20:
        raise SystemExit(
            f"{task_name}: the generated factories hold only {n_units} privacy units "
            f"({task.get_privacy_unit(unit).name}); an audit needs at least 40"
        )
    train = cfg.task.train
    plan = AuditPlan(
        epochs=epochs,
        batch_size=int(train.batch_size),
        lr=float(train.lr),
        momentum=float(train.momentum),
        max_grad_norm=float(cfg.privacy.max_grad_norm),
    )
    levels: list[float | None] = [None, *epsilons]
    results: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        chosen = rng.permutation(n_units)[: 2 * members]
        is_member = np.zeros(2 * members, dtype=bool)
        is_member[:members] = True
        audit_set = subset(pool, chosen)
        for eps in levels:
            label = "no DP" if eps is None else f"{eps:g}"
            model = train_model(task, subset(pool, chosen[:members]), plan, eps, seed=r)
            losses = unit_losses(task, model, audit_set)
            auc, tpr = attack_metrics(-losses[is_member], -losses[~is_member])
            aucs, tprs = results.setdefault(("loss", label), ([], []))
            aucs.append(auc)
            tprs.append(tpr)
            print(
                f"{task_name} repeat {r + 1}/{repeats} epsilon {label}: loss AUC {auc:.3f}",
                file=sys.stderr,
                flush=True,
            )
            if shadows > 0:
                shadow_losses = np.zeros((shadows, 2 * members))
                shadow_in = np.zeros((shadows, 2 * members), dtype=bool)
                for k in range(shadows):
                    half = rng.permutation(2 * members)[:members]
                    shadow_in[k, half] = True
                    shadow = train_model(
                        task, subset(pool, chosen[half]), plan, eps, seed=100 * (r + 1) + k
                    )
                    shadow_losses[k] = unit_losses(task, shadow, audit_set)
                scores = lira_scores(losses, shadow_losses, shadow_in)
                auc, tpr = attack_metrics(scores[is_member], scores[~is_member])
                aucs, tprs = results.setdefault(("lira", label), ([], []))
                aucs.append(auc)
                tprs.append(tpr)
    unit_name = task.get_privacy_unit(unit).name
    factories = ",".join(str(i) for i in used)
    return [
        (
            f"{task_name} ({unit_name}; factories {factories}; {members}+{members})",
            attack,
            label,
            aucs,
            tprs,
        )
        for (attack, label), (aucs, tprs) in results.items()
    ]


def _fmt(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the audit and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["tep_fault", "rul"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--repeats", type=int, default=3, help="member/non-member splits")
    parser.add_argument("--members", type=int, default=300, help="members (= non-members)")
    parser.add_argument("--epochs", type=int, default=100, help="local epochs per model")
    parser.add_argument("--shadows", type=int, default=0, help="LiRA shadow models (0: off)")
    parser.add_argument("--unit", default=None, help="privacy unit (default: the task's)")
    parser.add_argument(
        "--factory",
        type=int,
        default=0,
        help="generated factory to audit (the next ones are added when it holds too few units)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    started = time.perf_counter()
    rows = []
    for name in args.tasks:
        rows += audit_task(
            name,
            args.epsilons,
            args.repeats,
            args.members,
            args.epochs,
            args.shadows,
            args.unit,
            args.factory,
        )
    print(
        f"Membership inference on privacy units (members+non-members), {args.epochs} local "
        f"epochs, {args.repeats} repeats (mean ± sd), delta {DELTA:g}"
    )
    print("| task (unit) | attack | epsilon | ROC AUC | TPR @ 1% FPR |")
    print("|---|---|---|---|---|")
    for task, attack, label, aucs, tprs in rows:
        print(f"| {task} | {attack} | {label} | {_fmt(aucs)} | {_fmt(tprs)} |")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
