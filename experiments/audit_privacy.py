"""Empirical privacy audit: membership inference on a factory's DP-SGD model, per privacy unit.

One job (the audit); its length is the two ways of drawing members, the two attacks (loss
threshold and offline LiRA) and the null model that says what a draw alone gives.

Usage::

    python -m experiments.audit_privacy [--tasks tep_fault rul] [--epsilons 1 3 8]
        [--repeats 3] [--members 300] [--epochs 100] [--shadows 0] [--unit NAME]
        [--split paired|random] [--generate 4] [--jobs 1]

For each task, generated factories' training sets are built exactly as a factory builds them
(``StandardTask.to_train_dataset``: one item per privacy unit, so units share no raw record),
factory ``--factory`` first and the next ones until ``2 * --members`` units are held. In each
repeat the units are split into members and as many non-members. A model is trained on the
members only, through the product's training code (``fl_client.training.train_local`` with the
task's network, loss and batch size, ``--epochs`` local epochs), once without DP and once per
epsilon in ``--epsilons``, with the noise multiplier the factory would plan for that budget
(``fl_client.privacy.plan_noise_multiplier``, delta ``1e-5``).

How members and non-members are drawn decides what the audit measures (``--split``):

* ``paired`` (default): where a unit is a stretch of one recording (the ``window`` unit of the
  time-series tasks), the training windows of every recording are taken in time order in
  consecutive pairs and one window of each pair, at random, is a member. Members and
  non-members then come from the same recordings (runs, machines) in equal numbers and from
  the same stage of each recording, so the attack must tell a window from its neighbour in the
  same machine's life: exactly what window-level DP claims. Non-overlapping windows share no
  raw sample. Where a unit is a whole recording (``machine``, ``run``) or a row, whole units
  are split at random.
* ``random``: units are split uniformly at random, whatever recording they come from. Each
  split then leaves members and non-members with different mixes of life stages and machines,
  an imbalance that a loss attack reads as membership.

The attacks then try to tell members from non-members:

* ``loss``: the loss-threshold attack (Yeom et al., 2018): a unit is called a member when the
  model's loss on it (the mean over its examples) is low;
* ``null``: the same attack on a model trained, the same way, on as many units of the server's
  validation recordings, which are neither members nor non-members. Its AUC is what the split
  alone gives (differences in difficulty between the two sets): the level the ``loss`` AUC is
  to be read against, 0.5 for a balanced split;
* ``lira`` (with ``--shadows K > 0``): offline LiRA (Carlini et al., 2022): ``K`` shadow models
  are trained the same way on random halves of the members and non-members; for every unit a
  Gaussian is fitted to its losses under the shadow models that did not train on it, and the
  unit is scored by how far below that distribution the target model's loss lies.

The table prints, per task, attack and epsilon, the ROC AUC and the true-positive rate at a 1%
false-positive rate as mean ± standard deviation over the repeats. An AUC of 0.5 is a coin
toss; DP-SGD at epsilon bounds the TPR at FPR ``a`` by ``e^eps * a + delta``, and the audit shows
how far below that bound a concrete attack stays. Without DP the AUC shows the attack's power;
an audit in which the attack has none says nothing. ``--jobs N`` trains N models at a time in
separate processes (one thread each).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

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
from fl_server.config import compose_config, train_recipe
from standard_models.base import PartitionConfig, StandardTask, UnitDataset, WindowedTask
from standard_models.registry import get_task

DELTA = 1e-5
DATA_SEED = 0
NUM_FACTORIES = 4
SPLITS = ("paired", "random")


def subset(dataset: Dataset, units: np.ndarray) -> Dataset:
    """The privacy units ``units`` (item indices) of a training set, as a training set."""
    if isinstance(dataset, UnitDataset):
        x, y, group = dataset.__getitems__([int(u) for u in units])
        return UnitDataset(x, y, group, unit=dataset.unit)
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(np.asarray(units), dtype=torch.long)
        return TensorDataset(*(t[idx] for t in dataset.tensors))
    raise TypeError(f"cannot audit a training set of type {type(dataset).__name__}")


def unit_recordings(task: StandardTask, frame: pd.DataFrame, unit: str | None) -> np.ndarray:
    """For every unit of ``task.to_train_dataset(frame, unit)``, the recording it comes from.

    A recording is one run or one machine's history (``recording_units`` of a
    :class:`~standard_models.base.WindowedTask`). A whole-recording unit is its own recording;
    a window unit is found among its recording's stride-1 windows (the non-overlapping
    training windows are a subset of them, built by the same code, so they match exactly). For
    tasks without recordings every unit is its own. Recordings are numbered ``0..r-1`` in the
    order the training set holds them, and a recording's windows keep their time order.
    """
    dataset = task.to_train_dataset(frame, unit)
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, UnitDataset) or not isinstance(task, WindowedTask):
        return np.arange(n)
    whole = task.recording_units(frame, task.window)
    recording_of = torch.repeat_interleave(torch.arange(len(whole)), whole.counts).numpy()
    index = {row.tobytes(): int(r) for row, r in zip(whole.x.numpy(), recording_of, strict=True)}
    assert isinstance(dataset, TensorDataset)
    found = [index.get(row.tobytes()) for row in dataset.tensors[0].numpy()]
    if any(r is None for r in found):
        raise RuntimeError(f"{task.name}: a training window matches no recording's window")
    return np.asarray(found, dtype=np.int64)


def pool_units(
    task: StandardTask,
    frames: Sequence[pd.DataFrame],
    first: int,
    unit: str | None,
    wanted: int,
) -> tuple[Dataset, list[int], np.ndarray]:
    """Privacy units of factory ``first``, then of the next factories until ``wanted`` are held.

    Each factory's units are built from its own frame, so no unit spans two factories.
    Returns the pooled training set, the factories used and every unit's recording
    (:func:`unit_recordings`, numbered across the pool).
    """
    order = [first, *(i for i in range(len(frames)) if i != first)]
    parts: list[Dataset] = []
    recordings: list[np.ndarray] = []
    used: list[int] = []
    offset = 0
    for i in order:
        parts.append(task.to_train_dataset(frames[i], unit))
        rec = unit_recordings(task, frames[i], unit)
        recordings.append(rec + offset)
        offset += int(rec.max()) + 1
        used.append(i)
        if sum(len(p) for p in parts) >= wanted:  # type: ignore[arg-type]
            break
    recording = np.concatenate(recordings)
    if isinstance(parts[0], UnitDataset):
        units = [p for p in parts if isinstance(p, UnitDataset)]
        offset = 0
        groups = []
        for p in units:
            groups.append(torch.repeat_interleave(torch.arange(len(p)), p.counts) + offset)
            offset += len(p)
        pooled: Dataset = UnitDataset(
            torch.cat([p.x for p in units]),
            torch.cat([p.y for p in units]),
            torch.cat(groups),
            unit=units[0].unit,
        )
        return pooled, used, recording
    tensors = [p.tensors for p in parts if isinstance(p, TensorDataset)]
    pooled = TensorDataset(*(torch.cat(ts) for ts in zip(*tensors, strict=True)))
    return pooled, used, recording


def draw_split(
    recording: np.ndarray, members: int, split: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Member and non-member units (indices), ``members`` of each (fewer if the pool is short).

    ``recording[i]`` is unit ``i``'s recording, units of one recording in time order.
    ``paired``: consecutive units of every recording form pairs (a recording's last unit is
    left out when its count is odd), ``members`` pairs are drawn at random and one unit of each,
    by a fair coin, is the member, the other the non-member; when no recording holds two
    units (whole-recording or row units) this is the ``random`` split. ``random``: a uniform
    permutation of all units, the first ``members`` members and the next as many non-members.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    n = len(recording)
    if split == "paired" and len(np.unique(recording)) < n:
        firsts = []
        for rec in np.unique(recording):
            idx = np.flatnonzero(recording == rec)
            firsts.extend(idx[0 : len(idx) - 1 : 2])
        pairs = np.asarray(firsts, dtype=np.int64)
        pairs = pairs[rng.permutation(len(pairs))[:members]]
        second = rng.random(len(pairs)) < 0.5
        inside = np.where(second, pairs + 1, pairs)
        outside = np.where(second, pairs, pairs + 1)
        return np.sort(inside), np.sort(outside)
    m = min(members, n // 2)
    order = rng.permutation(n)
    return np.sort(order[:m]), np.sort(order[m : 2 * m])


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
    """How every model of the audit is trained: with DP at the task's DP-SGD recipe
    (``dp_batch_size``, ``dp_lr``), without DP at its plain settings, as a factory would."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    max_grad_norm: float
    dp_batch_size: int
    dp_lr: float


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
    batch_size, lr = plan.batch_size, plan.lr
    if epsilon is not None:
        batch_size, lr = plan.dp_batch_size, plan.dp_lr
        q = sample_rate_for(n, batch_size)
        steps = plan.epochs * steps_per_epoch(n, batch_size)
        sigma = plan_noise_multiplier([], epsilon, DELTA, q, steps)
    cfg = LocalTrainConfig(
        local_epochs=plan.epochs,
        batch_size=batch_size,
        lr=lr,
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a unit no OUT model saw
        mean = np.nanmean(out, axis=0)
        std = np.nanstd(out, axis=0)
    global_std = float(np.nanstd(out))
    std = np.where(np.isfinite(std) & (std > 0), std, global_std)
    mean = np.where(np.isfinite(mean), mean, float(np.nanmean(out)))
    return (mean - np.log(np.maximum(target, tiny))) / std


@dataclass(frozen=True)
class AuditData:
    """What one task's audit draws from: the pooled units and the null model's units."""

    task: StandardTask
    pool: Dataset
    recording: np.ndarray
    used: list[int]
    reference: Dataset  # units of the server's validation recordings (for the null model)
    plan: AuditPlan


@lru_cache(maxsize=4)
def audit_data(
    task_name: str, unit: str | None, factory: int, wanted: int, generate: int, epochs: int
) -> AuditData:
    """Build (once per process) the pool of ``wanted`` units and the reference units."""
    cfg = compose_config([f"task={task_name}"])
    task = get_task(task_name)
    data = task.generate(generate, DATA_SEED, PartitionConfig())
    pool, used, recording = pool_units(task, data.factories, factory, unit, wanted)
    train = cfg.task.train
    batch_size, lr = train_recipe(train, dp=False)
    dp_batch_size, dp_lr = train_recipe(train, dp=True)
    plan = AuditPlan(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        dp_batch_size=dp_batch_size,
        dp_lr=dp_lr,
        momentum=float(train.momentum),
        max_grad_norm=float(cfg.privacy.max_grad_norm),
    )
    reference = task.to_train_dataset(data.validation, unit)
    return AuditData(task, pool, recording, used, reference, plan)


@dataclass(frozen=True)
class Job:
    """Train one model and return its losses on the audit set (members, then non-members).

    ``source`` is ``pool`` (train on ``units`` of the pool) or ``reference`` (train on
    ``units`` of the validation recordings).
    """

    task_name: str
    unit: str | None
    factory: int
    wanted: int
    generate: int
    epochs: int
    source: str
    units: tuple[int, ...]
    audit: tuple[int, ...]
    epsilon: float | None
    seed: int


def run_job(job: Job) -> np.ndarray:
    """Losses of the model ``job`` describes on its audit units (runs in a worker process)."""
    d = audit_data(job.task_name, job.unit, job.factory, job.wanted, job.generate, job.epochs)
    train_set = subset(d.pool if job.source == "pool" else d.reference, np.asarray(job.units))
    model = train_model(d.task, train_set, d.plan, job.epsilon, job.seed)
    return unit_losses(d.task, model, subset(d.pool, np.asarray(job.audit)))


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Optimal order is the")


def audit_task(
    task_name: str,
    epsilons: Sequence[float],
    repeats: int,
    members: int,
    epochs: int,
    shadows: int,
    unit: str | None,
    factory: int,
    split: str = "paired",
    generate: int = NUM_FACTORIES,
    jobs: int = 1,
    null: bool = True,
) -> list[tuple[str, str, str, list[float], list[float]]]:
    """Rows ``(task, attack, epsilon label, AUCs, TPRs@1%FPR)`` of one task's audit.

    ``generate`` factories are generated; ``jobs`` models are trained at a time; ``null``
    adds the null model's row.
    """
    # a pair takes two units, and a recording with an odd count leaves one out
    wanted = 5 * members // 2 if split == "paired" else 2 * members
    d = audit_data(task_name, unit, factory, wanted, generate, epochs)
    n_ref = len(d.reference)  # type: ignore[arg-type]
    levels: list[float | None] = [None, *epsilons]
    splits = []
    shadow_halves: list[list[np.ndarray]] = []
    planned: list[tuple[int, str, str, int, Job]] = []  # repeat, attack, label, shadow k, job
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        inside, outside = draw_split(d.recording, members, split, rng)
        if len(inside) < 20:
            raise SystemExit(
                f"{task_name}: the generated factories hold only {len(d.recording)} privacy "
                f"units ({d.task.get_privacy_unit(unit).name}); an audit needs at least 20 "
                "members and 20 non-members (raise --generate)"
            )
        audit = np.r_[inside, outside]
        splits.append((inside, outside))
        base = dict(
            task_name=task_name, unit=unit, factory=factory, wanted=wanted,
            generate=generate, epochs=epochs, audit=tuple(int(a) for a in audit),
        )
        reference = rng.permutation(n_ref)[: min(len(inside), n_ref)]
        halves = [rng.permutation(len(audit))[: len(inside)] for _ in range(shadows)]
        shadow_halves.append(halves)
        for eps in levels:
            label = "no DP" if eps is None else f"{eps:g}"
            planned.append((r, "loss", label, -1, Job(
                source="pool", units=tuple(int(u) for u in inside), epsilon=eps, seed=r, **base
            )))
            if null:
                planned.append((r, "null", label, -1, Job(
                    source="reference", units=tuple(int(u) for u in reference), epsilon=eps,
                    seed=r, **base,
                )))
            for k, half in enumerate(halves):
                planned.append((r, "lira", label, k, Job(
                    source="pool", units=tuple(int(u) for u in audit[half]), epsilon=eps,
                    seed=100 * (r + 1) + k, **base,
                )))
    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(1,)) as executor:
            losses = list(executor.map(run_job, [p[4] for p in planned]))
    else:
        losses = [run_job(p[4]) for p in planned]
    by_key = {(p[0], p[1], p[2], p[3]): loss for p, loss in zip(planned, losses, strict=True)}
    results: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for r, (inside, _) in enumerate(splits):
        m = len(inside)
        for eps in levels:
            label = "no DP" if eps is None else f"{eps:g}"
            target = by_key[(r, "loss", label, -1)]
            scores = {"loss": -target}
            if null:
                scores["null"] = -by_key[(r, "null", label, -1)]
            if shadows > 0:
                shadow_in = np.zeros((shadows, len(target)), dtype=bool)
                for k, half in enumerate(shadow_halves[r]):
                    shadow_in[k, half] = True
                stacked = np.stack([by_key[(r, "lira", label, k)] for k in range(shadows)])
                scores["lira"] = lira_scores(target, stacked, shadow_in)
            for attack, score in scores.items():
                auc, tpr = attack_metrics(score[:m], score[m:])
                aucs, tprs = results.setdefault((attack, label), ([], []))
                aucs.append(auc)
                tprs.append(tpr)
            seen = ", ".join(f"{a} AUC {results[(a, label)][0][-1]:.3f}" for a in scores)
            print(
                f"{task_name} repeat {r + 1}/{repeats} epsilon {label}: {seen}; mean loss "
                f"members {target[:m].mean():.4f} non-members {target[m:].mean():.4f}",
                file=sys.stderr,
                flush=True,
            )
    unit_name = d.task.get_privacy_unit(unit).name
    factories = ",".join(str(i) for i in d.used)
    m = len(splits[0][0])
    order = {"loss": 0, "null": 1, "lira": 2}
    return [
        (
            f"{task_name} ({unit_name}; {split}; factories {factories}; {m}+{m})",
            attack,
            label,
            aucs,
            tprs,
        )
        for (attack, label), (aucs, tprs) in sorted(
            results.items(), key=lambda kv: (order[kv[0][0]], levels_index(kv[0][1], levels))
        )
    ]


def levels_index(label: str, levels: Sequence[float | None]) -> int:
    """Position of an epsilon label (``no DP`` first) in ``levels``."""
    labels = ["no DP" if e is None else f"{e:g}" for e in levels]
    return labels.index(label)


def _fmt(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the audit and print its table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["tep_fault", "rul"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--repeats", type=int, default=3, help="member/non-member splits")
    parser.add_argument("--members", type=int, default=300, help="members (= non-members)")
    parser.add_argument("--epochs", type=int, default=100, help="local epochs per model")
    parser.add_argument("--shadows", type=int, default=0, help="LiRA shadow models (0: off)")
    parser.add_argument("--unit", default=None, help="privacy unit (default: the task's)")
    parser.add_argument("--split", choices=SPLITS, default="paired",
                        help="how members and non-members are drawn (see the module docstring)")
    parser.add_argument("--generate", type=int, default=NUM_FACTORIES,
                        help="factories generated (the pool takes what it needs from them)")
    parser.add_argument("--jobs", type=int, default=1, help="models trained at a time")
    parser.add_argument("--no-null", dest="null", action="store_false",
                        help="leave out the null model (the split's own AUC)")
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
            split=args.split,
            generate=args.generate,
            jobs=args.jobs,
            null=args.null,
        )
    print(
        f"Membership inference on privacy units (members+non-members), {args.epochs} local "
        f"epochs, {args.repeats} repeats (mean ± sd), delta {DELTA:g}"
    )
    print("| task (unit; split; factories; members+non-members) | attack | epsilon | ROC AUC "
          "| TPR @ 1% FPR |")
    print("|---|---|---|---|---|")
    for task, attack, label, aucs, tprs in rows:
        print(f"| {task} | {attack} | {label} | {_fmt(aucs)} | {_fmt(tprs)} |")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
