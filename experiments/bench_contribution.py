"""How well each contribution estimator finds who helped, what it costs, and who gets paid.

Factories with planted behaviour train real federated rounds through the product's factory code
(:func:`fl_client.factory.run_factory_round`: the factory's Parquet file, its privacy ledger,
the run's planned noise multiplier, DP-SGD with the product's defaults), the server's
:func:`~strategies.validation.validate_update` decides which replies are accepted, and FedAvg
aggregates them. Each round, every estimator scores *the same accepted updates* through the
server's own coalition models and validation utility
(:class:`~strategies.contribution.utility.CoalitionUtility`), so the estimators are compared on
identical games. The rounds run in one process so that many seeds fit in a few minutes.

Planted factories (IID shares of the task's data, so that only the planted behaviour differs):

========================  ===================================================================
``clean_a``, ``clean_b``  honest factories
``label_flip``            30% of its labels changed to a wrong class (the product's
                          ``label_flip`` attack, applied inside the factory round)
``feature_noise``         Gaussian noise (one column standard deviation) on every feature
``free_rider_zero``       returns the global model unchanged, claims a normal data size
``free_rider_noise``      returns the global model plus isotropic noise as large as the
                          median honest update, claims a normal data size
``duplicate``             an exact copy of ``clean_a``'s file
``small``                 5% of a normal factory's data
========================  ===================================================================

Pay follows the default ``end_of_run`` rule (the pool split by positive cumulative scores), with
and without the guards of :mod:`strategies.contribution.guards` (no pay for updates that cannot
be told from noise; duplicate groups paid as one factory). "Guarded" pay of the estimators in
``--product-guards`` (default ``linearised``) is the product's: the server's
:class:`~strategies.contribution.scorer.ContributionScorer` with its default guards (the noise
test included, by the product's rule or ``--noise-rule``) scores each round with the record
sketches the factories' rounds made (a duplicate group found from them or from the updates is
merged into one player before scoring; a label ending in ``:updates`` scores as if no factory
sent a sketch) and the last round's withheld factories take no part in the split, as the payout
desk does; its line also counts the honest factories (and the small one)
the noise test withheld and the noise free-riders it let through. The other estimators' guarded
pay splits the group's scores after the fact, uses the factories' record sketches and the
alignment noise rule on the recorded updates (:func:`guard_outcome`).

Printed: per task and estimator, the Spearman rank correlation of per-round scores with exact
Shapley, evaluations as a fraction of exact's, seconds per round, the free-riders' pay, the
duplicate pair's share over the original's share in the same federation without the copy
(scored there by ``linearised`` only), the
flipped-label factory's rank (and, in the runs where the flip hurt the main metric by the
reference's scores, how often it is in the last two); then the guards' error rates; then the
scaling case (32 and 100 factories on ``molding_quality``: seconds per round against the
round's training, evaluations, and Spearman against a high-budget KernelSHAP reference).

One job, comparing the estimators on identical rounds; its length is what that takes: the
planted factories, the rounds they train and the summaries printed above.

    python -m experiments.bench_contribution                 # everything, 5 seeds (hours)
    python -m experiments.bench_contribution --tasks molding_quality --seeds 3 --scaling
    python -m experiments.bench_contribution --quick         # 1 seed, 2 rounds, no scaling
    # exact Shapley at 12 scored factories (5 clean shares more, 1,000 rows each)
    python -m experiments.bench_contribution --extra-clean 5 --rows 1000 --seeds 3 \
        --estimators exact linearised linearised_members gtg --no-solo --scaling
    # the noise test through the product path only: 5 seeds, no copy-free federations
    python -m experiments.bench_contribution --tasks molding_quality --estimators linearised \
        --product-guards linearised --no-solo --scaling
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from torch.utils.data import Dataset

from fl_client.attacks import AttackConfig
from fl_client.factory import FactorySite, run_factory_round
from fl_common.protocol import TrainInstruction
from fl_server.config import compose_config
from fl_server.rewards.allocation import allocate
from fl_server.server_app import train_instruction
from standard_models.base import PartitionConfig, StandardTask
from standard_models.registry import get_task
from strategies.contribution.coalitions import (
    WeightedMeanAggregator,
    group_players,
    merge_players,
)
from strategies.contribution.estimators import estimate
from strategies.contribution.guards import (
    DEFAULT_PLACEBOS,
    NOISE_RULES,
    GuardConfig,
    alignment_statistic,
    duplicate_groups,
    duplicate_pairs,
    fingerprint_groups,
    flat_deltas,
    merge_groups,
    noise_test,
    split_group_credit,
    withhold_unproven,
)
from strategies.contribution.scorer import ContributionScorer
from strategies.contribution.utility import BatchedEvaluator, CoalitionUtility, scoring_subset
from strategies.validation import ValidationRules, validate_update

KINDS = (
    "clean_a",
    "clean_b",
    "label_flip",
    "feature_noise",
    "free_rider_zero",
    "free_rider_noise",
    "duplicate",
    "small",
)
FREE_RIDERS = ("free_rider_zero", "free_rider_noise")
HONEST = ("clean_a", "clean_b", "small", "clean")
CONF = Path(__file__).resolve().parents[1] / "conf" / "contribution"
ROOT = Path(__file__).resolve().parents[1] / "conf"


def shipped(method: str) -> tuple[str, dict]:
    """``method`` with the options the ``contribution`` config group ships for it."""
    options = OmegaConf.to_container(OmegaConf.load(CONF / f"{method}.yaml"), resolve=True)
    assert isinstance(options, dict)
    name = str(options.pop("method"))
    options.pop("guards", None)  # the guards are the scorer's, not the estimator's
    options.pop("validation_examples", None)  # so is its share of the validation set
    options.pop("defaults", None)  # Hydra's composition list (the guards' group)
    return name, {k: v for k, v in options.items() if v is not None}


ESTIMATORS: dict[str, tuple[str, dict]] = {
    "exact": shipped("exact"),
    "gtg": shipped("gtg"),
    "loo": shipped("loo"),
    "kernel": shipped("kernel"),
    "linearised": shipped("linearised"),
    # the one-sided linearised game (the factories' own models only), for comparison
    "linearised_members": ("linearised", {**shipped("linearised")[1], "surrogate": "members"}),
}
#: Estimators also run on the federation without the copy (for the duplicate pair's gain).
SOLO_ESTIMATORS = {k: ESTIMATORS[k] for k in ("linearised",)}
POOL = 100_000  # minor units per run
FINGERPRINT_KEY = "federation-secret-key"  # shared by the factories, not by the operator
UPDATES_ONLY = ":updates"  # product-guards label suffix: factories that send no record sketch


def product_instruction(
    task_name: str, seed: int, rounds: int, epsilon: float, workdir: Path
) -> TrainInstruction:
    """The instruction the ServerApp sends for this task and seed, from ``conf/`` as a run
    composes it (:func:`fl_server.server_app.train_instruction`), at budget ``epsilon``."""
    cfg = compose_config([f"task={task_name}", f"seed={seed}", f"federation.num_rounds={rounds}"])
    OmegaConf.set_struct(cfg, False)
    cfg.data_dir = cfg.output_dir = str(workdir)
    return replace(train_instruction(cfg, f"bench-{seed}"), epsilon=float(epsilon))


def product_validation_examples() -> int | None:
    """``contribution.validation_examples`` of the default config."""
    value = compose_config([]).contribution.get("validation_examples")
    return None if value is None else int(value)


def _examples(text: str) -> int | None:
    """``--validation-examples``: a positive count, or ``all``."""
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive count or 'all', got {text}")
    return value


@dataclass
class Planted:
    """One planted factory: its kind, its data file (None for free-riders), claimed size."""

    fid: str
    kind: str
    path: Path | None
    claimed: int


def _noisy_features(task: StandardTask, df: pd.DataFrame, gen: np.random.Generator) -> pd.DataFrame:
    out = df.copy()
    for col in task.schema.columns:
        if col.dtype == "float":
            values = out[col.name].to_numpy(dtype=np.float64)
            noisy = values + gen.normal(scale=float(np.std(values)) or 1.0, size=values.shape)
            if col.low is not None or col.high is not None:
                noisy = np.clip(noisy, col.low, col.high)
            out[col.name] = noisy.astype(df[col.name].dtype)
    return out


def planted_factories(
    task: StandardTask,
    seed: int,
    workdir: Path,
    kinds: tuple[str, ...] = KINDS,
    extra_clean: int = 0,
    rows: int | None = None,
    absent: tuple[str, ...] = (),
) -> tuple[list[Planted], Dataset]:
    """Write the planted federation's files under ``workdir``; returns it and the validation set.

    ``rows`` keeps only the first rows of each factory's share (the scaling case, so that a
    hundred factories train in minutes); ``None`` keeps the task's full shares. Factories of
    the kinds in ``absent`` stay out of the federation while everyone else keeps the data, id
    and random streams they have with them (the counterfactual federation without the copy).
    """
    n = len(kinds) + extra_clean
    data = task.generate(n, seed, PartitionConfig(scheme="iid", quantity_skew=0.0))
    gen = np.random.default_rng(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    factories = []
    all_kinds = list(kinds) + ["clean"] * extra_clean
    for i, kind in enumerate(all_kinds):
        if kind in absent:
            continue
        df = data.factories[i] if rows is None else data.factories[i].head(rows)
        fid = f"f{i}-{kind}"
        if kind == "feature_noise":
            df = _noisy_features(task, df, gen)
        elif kind == "duplicate":
            df = data.factories[kinds.index("clean_a")]
            df = df if rows is None else df.head(rows)
        elif kind == "small":
            df = df.head(max(len(df) // 20, 64))  # contiguous rows keep time windows whole
        if kind in FREE_RIDERS:
            factories.append(Planted(fid, kind, None, len(task.to_dataset(df))))
            continue
        path = workdir / f"{fid}.parquet"
        df.to_parquet(path)
        factories.append(Planted(fid, kind, path, len(task.to_dataset(df))))
    return factories, task.to_dataset(data.validation)


@dataclass
class AcceptedRound:
    """One round's accepted updates (numpy dicts), as the server's scoring gets them."""

    round: int
    ids: list[str]
    updates: list[dict[str, np.ndarray]]
    weights: list[int]
    global_state: dict[str, np.ndarray]
    reports: dict[str, dict] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    #: The record sketches the accepted factories' rounds made (the reply's ``record-sketch``).
    sketches: dict[str, np.ndarray] = field(default_factory=dict)
    train_seconds: float = 0.0


def _delta_norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))


def train_round(
    task: StandardTask,
    factories: list[Planted],
    global_state: dict[str, np.ndarray],
    server_round: int,
    rounds: int,
    seed: int,
    workdir: Path,
    rng: np.random.Generator,
    epsilon: float,
) -> AcceptedRound:
    """Every factory's round through the product's factory code, then the server's validation."""
    base = product_instruction(task.name, seed, rounds, epsilon, workdir)
    instruction = replace(base, server_round=server_round)
    flip = [f.fid for f in factories if f.kind == "label_flip"]
    attack = AttackConfig("label_flip", frozenset(flip), fraction=0.3, seed=seed) if flip else None
    sent = {k: torch.from_numpy(v.copy()) for k, v in global_state.items()}
    t0 = time.perf_counter()
    trained: dict[str, tuple[dict[str, np.ndarray], dict]] = {}
    sketches: dict[str, np.ndarray] = {}
    for f in factories:
        if f.path is None:
            continue
        site = FactorySite(
            f.fid,
            f.path,
            workdir / "ledgers" / f"{f.fid}.json",
            epsilon,
            instruction.delta,
            sketch_key=FINGERPRINT_KEY,  # as every simulated factory does
        )
        result = run_factory_round(
            task,
            instruction,
            site,
            sent,
            attack=attack if f.kind == "label_flip" else None,
            reproducible_dp=True,
        )
        state = {n: v.detach().numpy().copy() for n, v in result.state_dict.items()}
        trained[f.fid] = (state, dict(result.metrics))
        sketches[f.fid] = result.record_sketch
    train_seconds = time.perf_counter() - t0
    honest_norm = float(np.median([_delta_norm(u, global_state) for u, _ in trained.values()]))
    typical = next(iter(trained.values()))[1]
    out = AcceptedRound(server_round, [], [], [], global_state, train_seconds=train_seconds)
    for f in factories:
        if f.kind == "free_rider_zero":
            update, report = {k: v.copy() for k, v in global_state.items()}, dict(typical)
        elif f.kind == "free_rider_noise":
            noise = {k: rng.normal(size=v.shape) for k, v in global_state.items()}
            scale = honest_norm / max(_delta_norm(noise, dict.fromkeys(noise, 0.0)), 1e-12)
            update = {
                k: (global_state[k] + scale * noise[k]).astype(v.dtype)
                for k, v in global_state.items()
            }
            report = dict(typical)  # it claims to have trained like an honest factory
        else:
            update, report = trained[f.fid]
        claimed = f.claimed if f.kind in FREE_RIDERS else int(report["num-examples"])
        if validate_update(update, global_state, claimed, ValidationRules()) is not None:
            out.rejected.append(f.fid)
            continue
        out.ids.append(f.fid)
        out.updates.append(update)
        out.weights.append(claimed)
        out.reports[f.fid] = report
        if f.fid in sketches:
            out.sketches[f.fid] = sketches[f.fid]
    return out


def score(
    method: str,
    params: dict,
    accepted: AcceptedRound,
    evaluator: BatchedEvaluator,
    seed: int,
) -> dict:
    """One estimator's scores of a round, the way the server's scorer computes them."""
    start = time.perf_counter()
    aggregator = WeightedMeanAggregator(accepted.updates, accepted.weights)
    baseline = evaluator.scores([accepted.global_state])[0]
    utility = CoalitionUtility(
        aggregator, evaluator.scores, baseline, evaluator.sign, evaluator=evaluator
    )
    options = dict(params)
    if method in ("gtg", "kernel", "linearised"):
        options["seed"] = seed * 1_000_003 + accepted.round
    result = estimate(method, len(accepted.ids), utility, **options)
    return {
        "scores": dict(zip(accepted.ids, map(float, result.scores), strict=True)),
        "evaluations": int(result.evaluations),
        "seconds": time.perf_counter() - start,
        "grand": float(result.grand_utility),
    }


def federated_run(
    task: StandardTask,
    seed: int,
    rounds: int,
    estimators: dict[str, tuple[str, dict]],
    epsilon: float,
    kinds: tuple[str, ...] = KINDS,
    extra_clean: int = 0,
    rows: int | None = None,
    product_guards: tuple[str, ...] = (),
    absent: tuple[str, ...] = (),
    noise_placebos: int = DEFAULT_PLACEBOS,
    validation_examples: int | None = None,
    noise_rule: str | None = None,
) -> dict:
    """Run ``rounds`` FedAvg rounds and score each with every estimator; returns raw records.

    ``absent``: kinds left out of the federation, the others unchanged (:func:`planted_factories`).
    ``noise_placebos``, ``noise_rule``: the product scorers' ``contribution.guards`` keys
    (``noise_rule`` None: the product's default).
    ``validation_examples``: ``contribution.validation_examples``, the validation examples
    every estimator scores coalitions on (:func:`scoring_subset`; None: all).

    Estimators named in ``product_guards`` also score every round through the server's scorer
    with its default guards (records' ``guarded``), handed the record sketches the factories'
    rounds made, as the server is; a name ending in ``:updates`` switches the sketch rule off
    (``record_sketches=False``: factories that send none), so copies are looked for in the
    updates only.
    """
    with tempfile.TemporaryDirectory(prefix="bench-contribution-") as tmp:
        workdir = Path(tmp)
        factories, validation = planted_factories(
            task, seed, workdir, kinds, extra_clean, rows, absent
        )
        torch.manual_seed(seed)
        model = task.build_model()
        global_state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        evaluator = BatchedEvaluator(
            task, task.build_model(), scoring_subset(validation, validation_examples)
        )
        rng = np.random.default_rng(seed)
        records = []
        sketches: dict[str, np.ndarray] = {}  # each factory's latest, as its rounds made them
        scorers = {}
        for label in product_guards:
            base = label.removesuffix(UPDATES_ONLY)
            if base not in estimators:
                continue
            scorers[label] = ContributionScorer(
                estimators[base][0],
                evaluator.scores,
                evaluator.sign,
                params=estimators[base][1],
                seed=seed,
                evaluator=evaluator,
                guards=GuardConfig(
                    noise_test=True,
                    noise_rule=noise_rule or GuardConfig.noise_rule,
                    noise_placebos=noise_placebos,
                    record_sketches=not label.endswith(UPDATES_ONLY),
                ),
            )
        for r in range(1, rounds + 1):
            accepted = train_round(
                task, factories, global_state, r, rounds, seed, workdir, rng, epsilon
            )
            sketches.update(accepted.sketches)
            scored = {
                label: score(method, params, accepted, evaluator, seed)
                for label, (method, params) in estimators.items()
            }
            guarded = {}
            for label, scorer in scorers.items():
                got = scorer.score_round(
                    r,
                    accepted.ids,
                    WeightedMeanAggregator(accepted.updates, accepted.weights),
                    global_state,
                    accepted.sketches,
                )
                guarded[label] = {
                    "scores": got.scores,
                    "withheld": list(got.withheld),
                    "noise_round": got.alignment,
                    "noise_z": got.noise_z,
                    "groups": [list(g) for g in got.groups],
                    "seconds": got.seconds,
                    "evaluations": got.evaluations,
                }
            deltas = flat_deltas(accepted.updates, global_state)
            z = alignment_statistic(deltas, accepted.weights)
            pairs = duplicate_pairs(deltas)
            # The product's real aggregation: the duplicate groups the (first) product scorer
            # merged enter once, as it scored them (coalitions.once_per_group).
            groups = next(iter(guarded.values()))["groups"] if guarded else []
            players = group_players(accepted.ids, groups)
            kept = merge_players(
                WeightedMeanAggregator(accepted.updates, accepted.weights), players
            )
            global_state = kept.aggregate([frozenset(range(len(players)))])[0]
            records.append(
                {
                    "round": r,
                    "ids": accepted.ids,
                    "train_seconds": accepted.train_seconds,
                    "metric": evaluator.scores([global_state])[0],
                    "scored": scored,
                    "guarded": guarded,
                    "alignment": dict(zip(accepted.ids, map(float, z), strict=True)),
                    "duplicate_pairs": [(accepted.ids[i], accepted.ids[j]) for i, j in pairs],
                    "rejected": accepted.rejected,
                }
            )
    return {
        "ids": [f.fid for f in factories],
        "rounds": records,
        "fingerprint_groups": [sorted(g) for g in fingerprint_groups(sketches)],
    }


def guard_outcome(run: dict) -> tuple[dict, list[frozenset[str]]]:
    """The run's noise-test verdicts and duplicate groups (by updates or by data sketches)."""
    round_z: dict[str, list[float]] = {f: [] for f in run["ids"]}
    round_pairs = []
    for rec in run["rounds"]:
        for f, z in rec["alignment"].items():
            round_z[f].append(z)
        index = {f: i for i, f in enumerate(rec["ids"])}
        round_pairs.append((rec["ids"], [(index[a], index[b]) for a, b in rec["duplicate_pairs"]]))
    by_data = [frozenset(g) for g in run.get("fingerprint_groups", [])]
    return noise_test(round_z), merge_groups([], duplicate_groups(round_pairs) + by_data)


def payouts(run: dict, estimator: str, guarded: bool) -> dict[str, int]:
    """End-of-run pay from ``estimator``'s cumulative scores, with or without the guards.

    Guarded pay of an estimator scored through the product's scorer is the product's (merged
    duplicate groups, the last round's withheld factories out of the split).
    """
    cumulative = {f: 0.0 for f in run["ids"]}
    if guarded and estimator in run["rounds"][0].get("guarded", {}):
        for rec in run["rounds"]:
            for f, v in rec["guarded"][estimator]["scores"].items():
                cumulative[f] += v
        held = set(run["rounds"][-1]["guarded"][estimator]["withheld"])
        paid = allocate(POOL, {f: v for f, v in cumulative.items() if f not in held})
        return {f: paid.get(f, 0) for f in cumulative}
    for rec in run["rounds"]:
        for f, v in rec["scored"][estimator]["scores"].items():
            cumulative[f] += v
    if guarded:
        verdicts, groups = guard_outcome(run)
        cumulative = split_group_credit(withhold_unproven(cumulative, verdicts), groups)
    return allocate(POOL, cumulative)


def _ranks(scores: dict[str, float]) -> dict[str, int]:
    order = sorted(scores, key=lambda f: (-scores[f], f))
    return {f: i + 1 for i, f in enumerate(order)}


def _kind(fid: str) -> str:
    return fid.split("-", 1)[1]


def _share(paid: dict[str, int], kinds: tuple[str, ...]) -> float:
    return sum(v for f, v in paid.items() if _kind(f) in kinds) / max(sum(paid.values()), 1)


def summarise(runs: list[dict], solo_runs: list[dict], reference: str = "exact") -> dict:
    """Per-estimator statistics over seeds (scores compared with ``reference``'s; the first
    estimator's when ``reference`` was not run)."""
    out = {}
    if reference not in runs[0]["rounds"][0]["scored"]:
        reference = next(iter(runs[0]["rounds"][0]["scored"]))
    for est in runs[0]["rounds"][0]["scored"]:
        rhos, evals, secs, flip_rank, flip_trained = [], [], [], [], []
        flip_hurts: list[bool] = []  # by the reference's cumulative score: negative
        stats: dict[str, list] = {
            "free_paid": [],
            "free_paid_guarded": [],
            "pair": [],
            "pair_guarded": [],
            "solo": [],
            "solo_guarded": [],
        }
        for run, solo in zip(runs, solo_runs, strict=True):
            for rec in run["rounds"]:
                ref = rec["scored"][reference]["scores"]
                mine = rec["scored"][est]["scores"]
                a, b = [ref[f] for f in ref], [mine[f] for f in ref]
                if np.std(a) > 0 and np.std(b) > 0:
                    rhos.append(float(spearmanr(a, b).statistic))
                evals.append(
                    rec["scored"][est]["evaluations"] / rec["scored"][reference]["evaluations"]
                )
                secs.append(rec["scored"][est]["seconds"])
            cumulative = {f: 0.0 for f in run["ids"]}
            for rec in run["rounds"]:
                for f, v in rec["scored"][est]["scores"].items():
                    cumulative[f] += v
            flip = next((f for f in run["ids"] if _kind(f) == "label_flip"), None)
            if flip is not None:
                flip_rank.append(_ranks(cumulative)[flip])
                # Among the factories that trained (the free-riders take the last places).
                trained = {f: v for f, v in cumulative.items() if _kind(f) not in FREE_RIDERS}
                flip_trained.append(_ranks(trained)[flip] >= len(trained) - 1)
                flip_hurts.append(
                    sum(rec["scored"][reference]["scores"][flip] for rec in run["rounds"]) < 0
                )
            for guarded, suffix in ((False, ""), (True, "_guarded")):
                paid = payouts(run, est, guarded)
                stats["free_paid" + suffix].append(
                    sum(v for f, v in paid.items() if _kind(f) in FREE_RIDERS)
                )
                stats["pair" + suffix].append(_share(paid, ("clean_a", "duplicate")))
                if solo is not None and est in solo["rounds"][0]["scored"]:
                    stats["solo" + suffix].append(_share(payouts(solo, est, guarded), ("clean_a",)))
        row = {
            "spearman": float(np.mean(rhos)) if rhos else float("nan"),
            "spearman_min": float(np.min(rhos)) if rhos else float("nan"),
            "evaluations_vs_reference": float(np.mean(evals)),
            "evaluations": float(
                np.mean([r["scored"][est]["evaluations"] for run in runs for r in run["rounds"]])
            ),
            "seconds_per_round": float(np.mean(secs)),
            "flip_rank_mean": float(np.mean(flip_rank)) if flip_rank else float("nan"),
            "flip_bottom2": float(np.mean([r >= 7 for r in flip_rank])) if flip_rank else 0.0,
            "flip_bottom2_trained": float(np.mean(flip_trained)) if flip_trained else 0.0,
            # where the flip hurt the main metric (the reference scores it below zero over the
            # run): in how many runs, and the share of them with the flipped factory in the last
            # two of the factories that trained
            "flip_hurts": int(sum(flip_hurts)),
            "flip_bottom2_where_hurts": (
                float(np.mean([t for t, h in zip(flip_trained, flip_hurts, strict=True) if h]))
                if any(flip_hurts)
                else float("nan")
            ),
        }
        for key, values in stats.items():
            if key.startswith("free"):
                row[key + "_max"] = int(max(values)) if values else 0
                row[key + "_seeds"] = int(sum(v > 0 for v in values))
            else:
                row[key] = float(np.mean(values)) if values else float("nan")
        for suffix in ("", "_guarded"):
            solo = row["solo" + suffix]
            row["dup_gain" + suffix] = row["pair" + suffix] / solo if solo else float("nan")
        out[est] = row
    return out


def product_withheld(runs: list[dict], label: str) -> dict:
    """The product scorer's noise test after each run's last round: honest factories (and the
    small one among them) withheld, noise free-riders paid (not withheld), out of how many."""
    counts = dict.fromkeys(("honest", "held", "small", "small_held", "free", "free_passed"), 0)
    detail = []
    for run in runs:
        last = run["rounds"][-1]["guarded"][label]
        held, seen = set(last["withheld"]), set(last["noise_z"])
        for f in sorted(seen):
            kind = _kind(f)
            if kind in HONEST:
                counts["honest"] += 1
                counts["held"] += f in held
                if f in held:  # what it would have been paid on: its cumulative score
                    total = sum(r["guarded"][label]["scores"].get(f, 0.0) for r in run["rounds"])
                    rounds_z = [r["guarded"][label]["noise_round"].get(f) for r in run["rounds"]]
                    detail.append(
                        {
                            "factory": f,
                            "cumulative": total,
                            "z": last["noise_z"][f],
                            "round_z": rounds_z,
                        }
                    )
                if kind == "small":
                    counts["small"] += 1
                    counts["small_held"] += f in held
            if kind == "free_rider_noise":
                counts["free"] += 1
                counts["free_passed"] += f not in held
    return {
        "honest_withheld": f"{counts['held']}/{counts['honest']}",
        "small_withheld": f"{counts['small_held']}/{counts['small']}",
        "noise_free_rider_passed": f"{counts['free_passed']}/{counts['free']}",
        "honest_withheld_detail": detail,
    }


def product_rows(runs: list[dict], solo_runs: list[dict | None]) -> dict:
    """Pay through the server's guarded scorer (``--product-guards``): the duplicate pair's
    share against the original's alone, the noise free-rider's pay per seed, groups found,
    and the noise test's misses on honest factories."""
    out = {}
    for label in runs[0]["rounds"][0].get("guarded", {}):
        pair, solo, free, found = [], [], [], 0
        for run, alone in zip(runs, solo_runs, strict=True):
            paid = payouts(run, label, True)
            pair.append(_share(paid, ("clean_a", "duplicate")))
            free.append(sum(v for f, v in paid.items() if _kind(f) in FREE_RIDERS))
            found += any(rec["guarded"][label]["groups"] for rec in run["rounds"])
            if alone is not None and label in alone["rounds"][0].get("guarded", {}):
                solo.append(_share(payouts(alone, label, True), ("clean_a",)))
        row = {
            "pair": float(np.mean(pair)),
            "solo": float(np.mean(solo)) if solo else float("nan"),
            "free_paid_max": int(max(free)),
            "free_paid": [int(v) for v in free],
            "runs_with_group": f"{found}/{len(runs)}",
            **product_withheld(runs + [r for r in solo_runs if r is not None], label),
        }
        row["dup_gain"] = row["pair"] / row["solo"] if solo else float("nan")
        out[label] = row
        print(
            f"product path {label:<18} pair {row['pair']:.1%} vs original alone "
            f"{row['solo']:.1%}: {row['dup_gain']:.2f}x; noise free-rider paid "
            f"{row['free_paid']} per seed; copy merged in {row['runs_with_group']} runs; "
            f"noise test: honest withheld {row['honest_withheld']} (small "
            f"{row['small_withheld']}), noise free-rider passed {row['noise_free_rider_passed']}",
            flush=True,
        )
        for held in row["honest_withheld_detail"]:
            print(
                f"  withheld honest {held['factory']}: cumulative score "
                f"{held['cumulative']:+.4f}, noise z {held['z']:.2f}, per round "
                f"{[round(z, 2) for z in held['round_z'] if z is not None]}",
                flush=True,
            )
    return out


def guard_rates(runs: list[dict]) -> dict:
    """Noise-test misses on honest factories and duplicate flags on honest pairs."""
    honest, withheld, small_total, small_withheld, free_total, free_paid = 0, 0, 0, 0, 0, 0
    pairs, false_pairs, copies, copies_found = 0, 0, 0, 0
    for run in runs:
        verdicts, groups = guard_outcome(run)
        for f, v in verdicts.items():
            kind = _kind(f)
            if kind in HONEST and v.rounds:
                honest += 1
                withheld += not v.paid
                if kind == "small":
                    small_total += 1
                    small_withheld += not v.paid
            if kind == "free_rider_noise" and v.rounds:
                free_total += 1
                free_paid += v.paid
        grouped = {f for g in groups for f in g}
        clean = [f for f in run["ids"] if _kind(f) in ("clean_a", "clean_b", "clean")]
        for i, a in enumerate(clean):
            for b in clean[i + 1 :]:
                pairs += 1
                false_pairs += any({a, b} <= g for g in groups)
        dup = [f for f in run["ids"] if _kind(f) == "duplicate"]
        for d in dup:
            copies += 1
            copies_found += d in grouped and any(
                d in g and any(_kind(m) == "clean_a" for m in g) for g in groups
            )
    return {
        "honest_withheld": f"{withheld}/{honest}",
        "small_withheld": f"{small_withheld}/{small_total}",
        "noise_free_rider_paid": f"{free_paid}/{free_total}",
        "honest_pairs_flagged": f"{false_pairs}/{pairs}",
        "copies_found": f"{copies_found}/{copies}",
    }


def _print_table(title: str, stats: dict) -> None:
    print(f"\n{title}")
    print(
        f"{'estimator':<8} {'spearman':>8} {'(min)':>6} {'evals':>6} {'% exact':>7} "
        f"{'s/round':>7} {'free paid':>9} {'guarded':>7} {'dup gain':>8} {'guarded':>7} "
        f"{'flip rank':>9} {'flip last 2 of trained':>22} {'(where it hurts)':>16}"
    )
    for est, s in stats.items():
        print(
            f"{est:<8} {s['spearman']:8.3f} {s['spearman_min']:6.2f} {s['evaluations']:6.0f} "
            f"{s['evaluations_vs_reference']:7.1%} {s['seconds_per_round']:7.2f} "
            f"{s['free_paid_max']:9d} {s['free_paid_guarded_max']:7d} {s['dup_gain']:8.2f} "
            f"{s['dup_gain_guarded']:7.2f} {s['flip_rank_mean']:9.1f} "
            f"{s['flip_bottom2_trained']:22.0%} "
            f"{s['flip_bottom2_where_hurts']:9.0%} of {s['flip_hurts']:>3d}",
            flush=True,
        )


def scaling(
    sizes: list[int],
    seed: int,
    rounds: int,
    epsilon: float,
    reference_per_player: int,
    factory_rows: int,
    validation_examples: int | None = None,
) -> list[dict]:
    """Cost and fidelity at larger federations (``molding_quality``, planted + clean factories).

    Exact Shapley is out of reach, so each round is also scored by KernelSHAP with
    ``reference_per_player`` coalitions per factory as the reference; GTG runs up to 32
    factories only (at 100 it takes minutes a round). Each factory keeps ``factory_rows`` rows.
    """
    task = get_task("molding_quality")
    rows = []
    kernel_ref = (
        "kernel",
        {
            **ESTIMATORS["kernel"][1],
            "per_player": reference_per_player,
            "max_evaluations": reference_per_player * max(sizes),
        },
    )
    for n in sizes:
        estimators = {
            "reference": kernel_ref,
            "linearised": ESTIMATORS["linearised"],
            "kernel": ESTIMATORS["kernel"],
            "loo": ESTIMATORS["loo"],
        }
        if n <= 32:
            estimators["gtg"] = ESTIMATORS["gtg"]
        t0 = time.perf_counter()
        run = federated_run(
            task,
            seed,
            rounds,
            estimators,
            epsilon,
            KINDS,
            n - len(KINDS),
            factory_rows,
            validation_examples=validation_examples,
        )
        stats = summarise([run], [None], reference="reference")
        train = float(np.mean([r["train_seconds"] for r in run["rounds"]]))
        rates = guard_rates([run])
        for est, s in stats.items():
            if est == "reference":
                continue
            rows.append({"factories": n, "estimator": est, "train_seconds": train, **s, **rates})
            print(
                f"  n={n:3d} {est:<10}: {s['seconds_per_round']:6.2f} s/round vs training "
                f"{train:6.1f} s ({s['seconds_per_round'] / train:.2f}x), "
                f"{s['evaluations']:.0f} evaluations, spearman vs reference {s['spearman']:.3f}, "
                f"free-rider paid {s['free_paid_guarded_max']} (guarded), "
                f"dup pair {s['pair_guarded']:.1%} (guarded)",
                flush=True,
            )
        print(f"  n={n:3d} guards: {rates} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=["tep_fault", "molding_quality"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0, help="each factory's DP budget")
    parser.add_argument("--scaling", nargs="*", type=int, default=[32, 100])
    parser.add_argument("--scaling-rounds", type=int, default=1)
    parser.add_argument("--scaling-rows", type=int, default=500, help="rows per factory")
    parser.add_argument("--reference-per-player", type=int, default=16)
    parser.add_argument(
        "--extra-clean",
        type=int,
        default=0,
        help="clean IID factories added to the planted ones (exact Shapley up to "
        "contribution.max_players scored factories)",
    )
    parser.add_argument(
        "--rows", type=int, default=None, help="rows per factory (default: equal shares)"
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, no scaling")
    parser.add_argument(
        "--estimators", nargs="*", default=list(ESTIMATORS), help="estimators to run"
    )
    parser.add_argument(
        "--product-guards",
        nargs="*",
        default=["linearised"],
        help="estimators whose guarded pay goes through the server's scorer, with the record "
        f"sketches the factories made ({UPDATES_ONLY}: without them, copies looked for in the "
        "updates only); the first one's duplicate groups decide how the "
        "model is aggregated, as the product's one scorer does, so measure another's copy "
        "gain in a run of its own",
    )
    parser.add_argument(
        "--no-solo",
        action="store_true",
        help="skip the federations without the copy (no duplicate-pair gain; half the time)",
    )
    parser.add_argument(
        "--noise-rule",
        choices=NOISE_RULES,
        default=None,
        help="the product's noise test rule, contribution.guards.noise_rule (default: the "
        "product's)",
    )
    parser.add_argument(
        "--noise-placebos",
        type=int,
        default=DEFAULT_PLACEBOS,
        help="placebo scores the product's noise test compares each round's score with "
        f"(default {DEFAULT_PLACEBOS})",
    )
    parser.add_argument(
        "--validation-examples",
        type=_examples,
        default=product_validation_examples(),
        help="validation examples coalitions are scored on (default: the product's "
        "contribution.validation_examples; 'all' for the whole set)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_contribution.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.rounds, args.scaling = 1, 2, []
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "tasks": {}}
    chosen = {k: ESTIMATORS[k] for k in args.estimators}
    solo_chosen = {k: v for k, v in chosen.items() if k in SOLO_ESTIMATORS}
    product = tuple(args.product_guards)
    for task_name in args.tasks:
        task = get_task(task_name)
        runs, solos = [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            runs.append(
                federated_run(
                    task,
                    seed,
                    args.rounds,
                    chosen,
                    args.epsilon,
                    extra_clean=args.extra_clean,
                    rows=args.rows,
                    product_guards=product,
                    noise_placebos=args.noise_placebos,
                    noise_rule=args.noise_rule,
                    validation_examples=args.validation_examples,
                )
            )
            # The same federation without the copy: every other factory keeps its data, id and
            # DP noise, so the pair's share is compared with the original's on the same draws.
            solos.append(
                None
                if args.no_solo
                else federated_run(
                    task,
                    seed,
                    args.rounds,
                    solo_chosen,
                    args.epsilon,
                    extra_clean=args.extra_clean,
                    rows=args.rows,
                    product_guards=product,
                    absent=("duplicate",),
                    noise_placebos=args.noise_placebos,
                    noise_rule=args.noise_rule,
                    validation_examples=args.validation_examples,
                )
            )
            print(f"{task_name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        stats = summarise(runs, solos)
        rates = guard_rates(runs + [r for r in solos if r is not None])
        product_stats = product_rows(runs, solos)
        report["tasks"][task_name] = {
            "estimators": stats,
            "guards": rates,
            "product": product_stats,
        }
        size = len(KINDS) + args.extra_clean
        _print_table(f"{task_name} ({args.seeds} seeds, {size} factories)", stats)
        print(f"guards by the alignment rule (records): {rates}")
    if args.scaling:
        print("\nScaling (molding_quality, seed 0; training is all factories in sequence):")
        report["scaling"] = scaling(
            args.scaling,
            0,
            args.scaling_rounds,
            args.epsilon,
            args.reference_per_player,
            args.scaling_rows,
            args.validation_examples,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
