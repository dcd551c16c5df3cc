"""How well each contribution estimator finds who helped, what it costs, and who gets paid.

Eight factories with planted behaviour train real federated rounds (the factory's DP-SGD,
FedAvg aggregation, the server's validation set), in one process so that many seeds fit in a
few minutes. Each round, exact Shapley, GTG-Shapley and leave-one-out score the same accepted
updates through the server's own :class:`~strategies.contribution.scorer.ContributionScorer`,
and each estimator's cumulative scores drive its own reward book.

Planted factories (IID shares of the task's data, so that only the planted behaviour differs):

========================  ===================================================================
``clean_a``, ``clean_b``  honest factories
``label_flip``            30% of its labels changed to a wrong class
``feature_noise``         Gaussian noise (std 1 on standardised inputs) on every feature
``free_rider_zero``       returns the global model unchanged, claims a normal data size
``free_rider_noise``      returns the global model plus noise as large as an honest update
``duplicate``             an exact copy of ``clean_a``'s data
``small``                 5% of a normal factory's data
========================  ===================================================================

Printed per task and estimator: Spearman rank correlation of per-round scores with exact
Shapley, utility evaluations as a fraction of exact's, each planted factory's mean rank, the
free-riders' payouts, the payout share of the duplicated pair against the original's share in
the same federation without the duplicate, and time per round. ``--scaling`` adds GTG's time
per round at 8 to 64 factories next to the round's training time.

    python -m experiments.bench_contribution                 # full benchmark (README table)
    python -m experiments.bench_contribution --quick         # 1 seed, 2 rounds, smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from torch.utils.data import Subset, TensorDataset

from fl_client.attacks import poison_labels
from fl_client.privacy import plan_noise_multiplier
from fl_client.training import LocalTrainConfig, sample_rate_for, steps_per_epoch, train_local
from fl_server.rewards.allocation import RewardBook, RewardPolicy
from standard_models.base import PartitionConfig, StandardTask
from standard_models.registry import get_task
from strategies.contribution.coalitions import WeightedMeanAggregator
from strategies.contribution.scorer import ContributionScorer
from strategies.contribution.utility import BatchedEvaluator
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
#: Estimators compared: label -> (method, options). GTG uses the conf/contribution/gtg.yaml values.
CONF = Path(__file__).resolve().parents[1] / "conf" / "contribution"


def shipped(method: str) -> tuple[str, dict]:
    """``method`` with the options the ``contribution`` config group ships for it."""
    options = OmegaConf.to_container(OmegaConf.load(CONF / f"{method}.yaml"), resolve=True)
    assert isinstance(options, dict)
    options.pop("method")
    return method, {k: v for k, v in options.items() if v is not None}


ESTIMATORS: dict[str, tuple[str, dict]] = {
    "exact": shipped("exact"),
    "gtg": shipped("gtg"),
    "loo": shipped("loo"),
}


def gtg_variants() -> dict[str, tuple[str, dict]]:
    """GTG settings traded between evaluations and accuracy (``--gtg-sweep``)."""
    base = shipped("gtg")[1]
    out = {}
    for within in (0.05, 0.1, 0.2):
        for perms in (8, 16):
            out[f"gtg w{within} p{perms}"] = (
                "gtg",
                {**base, "within_tol": within, "max_permutations": perms},
            )
    return out


TRAIN = {  # per task: the conf/task defaults
    "tep_fault": dict(local_epochs=5, batch_size=512, lr=0.2, momentum=0.9),
    "molding_quality": dict(local_epochs=2, batch_size=64, lr=0.05, momentum=0.9),
    "rul": dict(local_epochs=2, batch_size=64, lr=0.05, momentum=0.9),
}
POOL = 100_000  # minor units per run


@dataclass
class Factory:
    """One planted factory: its kind, its private data (None for free-riders), claimed size."""

    fid: str
    kind: str
    data: TensorDataset | Subset | None
    claimed: int


def _tensors(ds: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = ds.tensors
    return x.clone(), y.clone()


def planted_factories(
    task: StandardTask, seed: int, kinds: tuple[str, ...] = KINDS, extra_clean: int = 0
) -> tuple[list[Factory], TensorDataset]:
    """The planted federation of ``kinds`` (plus ``extra_clean`` honest ones) and validation."""
    n = len(kinds) + extra_clean
    data = task.generate(n, seed, PartitionConfig(scheme="iid", quantity_skew=0.0))
    sets = [task.to_dataset(df) for df in data.factories]
    gen = torch.Generator().manual_seed(seed)
    factories = []
    for i, kind in enumerate(kinds):
        x, y = _tensors(sets[i])
        fid = f"f{i}-{kind}"
        if kind == "label_flip":
            y = poison_labels(task, y, 0.3, gen)
        elif kind == "feature_noise":
            x = x + torch.randn(x.shape, generator=gen)
        elif kind == "duplicate":
            x, y = _tensors(sets[kinds.index("clean_a")])
        elif kind == "small":
            keep = torch.randperm(len(y), generator=gen)[: max(16, len(y) // 20)]
            x, y = x[keep], y[keep]
        ds = None if kind in FREE_RIDERS else TensorDataset(x, y)
        factories.append(Factory(fid, kind, ds, len(y)))
    for j in range(extra_clean):
        x, y = _tensors(sets[len(kinds) + j])
        factories.append(Factory(f"f{len(kinds) + j}-clean", "clean", TensorDataset(x, y), len(y)))
    return factories, task.to_dataset(data.validation)


def _delta_norm(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))


def federated_rounds(
    task: StandardTask,
    factories: list[Factory],
    validation: TensorDataset,
    rounds: int,
    seed: int,
    estimators: dict[str, tuple[str, dict]],
    epsilon: float | None,
) -> dict:
    """Run ``rounds`` FedAvg rounds and score each with every estimator; returns raw records."""
    torch.manual_seed(seed)
    model = task.build_model()
    global_state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    evaluator = BatchedEvaluator(task, task.build_model(), validation)
    scorers = {
        label: ContributionScorer(method, evaluator.scores, evaluator.sign, params, seed=seed)
        for label, (method, params) in estimators.items()
    }
    base = TRAIN[task.name]
    sigmas: dict[str, float | None] = {}
    for f in factories:
        if f.data is None or epsilon is None:
            sigmas[f.fid] = None
            continue
        rate = sample_rate_for(len(f.data), base["batch_size"])
        steps = rounds * base["local_epochs"] * steps_per_epoch(len(f.data), base["batch_size"])
        sigmas[f.fid] = plan_noise_multiplier(None, epsilon, 1e-5, rate, steps)
    records = []
    rng = np.random.default_rng(seed)
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        updates: dict[str, dict[str, np.ndarray]] = {}
        for k, f in enumerate(factories):
            if f.data is None:
                continue
            net = task.build_model()
            net.load_state_dict({n: torch.from_numpy(v.copy()) for n, v in global_state.items()})
            cfg = LocalTrainConfig(
                **base,
                dp=sigmas[f.fid] is not None,
                seed=seed * 1000 + r * 100 + k,
                reproducible_dp=True,
            )
            out = train_local(net, f.data, task.loss_fn(), cfg, noise_multiplier=sigmas[f.fid])
            updates[f.fid] = {n: v.detach().numpy().copy() for n, v in out.state_dict.items()}
        train_seconds = time.perf_counter() - t0
        honest_norm = float(np.median([_delta_norm(u, global_state) for u in updates.values()]))
        ordered = []
        for f in factories:
            if f.kind == "free_rider_zero":
                ordered.append({k: v.copy() for k, v in global_state.items()})
            elif f.kind == "free_rider_noise":
                noise = {k: rng.normal(size=v.shape) for k, v in global_state.items()}
                scale = honest_norm / max(_delta_norm(noise, dict.fromkeys(noise, 0.0)), 1e-12)
                ordered.append(
                    {
                        k: (global_state[k] + scale * noise[k]).astype(v.dtype)
                        for k, v in global_state.items()
                    }
                )
            else:
                ordered.append(updates[f.fid])
        # The server's own validation decides who is a player (the unchanged-model free-rider
        # is refused there); rejected factories are not scored and earn nothing this round.
        players = [
            (f, u)
            for f, u in zip(factories, ordered, strict=True)
            if validate_update(u, global_state, f.claimed, ValidationRules()) is None
        ]
        ids = [f.fid for f, _ in players]
        aggregator = WeightedMeanAggregator(
            [u for _, u in players], [f.claimed for f, _ in players]
        )
        scored = {}
        for name, scorer in scorers.items():
            rc = scorer.score_round(r, ids, aggregator, global_state)
            scored[name] = {
                "scores": rc.scores,
                "evaluations": rc.evaluations,
                "seconds": rc.seconds,
                "grand": rc.grand_utility,
                "truncated": rc.truncated,
            }
        global_state = aggregator.aggregate([frozenset(range(len(players)))])[0]
        metric = evaluator.scores([global_state])[0]
        records.append(
            {
                "round": r,
                "train_seconds": train_seconds,
                "metric": metric,
                "scored": scored,
                "rejected": [f.fid for f in factories if f.fid not in ids],
            }
        )
    return {"ids": [f.fid for f in factories], "rounds": records}


def payouts(run: dict, estimator: str, rounds: int) -> dict[str, int]:
    """Payouts of a run's factories from ``estimator``'s scores (the default end_of_run pool)."""
    book = RewardBook(RewardPolicy(POOL, "end_of_run", rounds))
    for rec in run["rounds"]:
        book.settle(rec["round"], rec["scored"][estimator]["scores"])
    return book.cumulative_payout


def _ranks(scores: dict[str, float]) -> dict[str, int]:
    order = sorted(scores, key=lambda f: (-scores[f], f))
    return {f: i + 1 for i, f in enumerate(order)}


def _kind(fid: str) -> str:
    return fid.split("-", 1)[1]


def summarise(task_name: str, runs: list[dict], solo_runs: list[dict], rounds: int) -> dict:
    """Per-estimator statistics over seeds."""
    out = {}
    for est in runs[0]["rounds"][0]["scored"]:
        rhos, evals, secs, ranks = [], [], [], {k: [] for k in KINDS}
        free_paid, pair_share, solo_share, flip_bottom2 = [], [], [], []
        shares = {k: [] for k in KINDS}
        for run, solo in zip(runs, solo_runs, strict=True):
            for rec in run["rounds"]:
                exact = rec["scored"]["exact"]
                mine = rec["scored"][est]
                a = [exact["scores"][f] for f in exact["scores"]]
                b = [mine["scores"][f] for f in exact["scores"]]
                if np.std(a) > 0 and np.std(b) > 0:
                    rhos.append(float(spearmanr(a, b).statistic))
                evals.append(mine["evaluations"] / exact["evaluations"])
                secs.append(mine["seconds"])
            cumulative = {f: 0.0 for f in run["ids"]}
            for rec in run["rounds"]:
                for f, v in rec["scored"][est]["scores"].items():
                    cumulative[f] += v
            rank = _ranks(cumulative)
            for f, r in rank.items():
                ranks[_kind(f)].append(r)
            flip_bottom2.append(rank[next(f for f in run["ids"] if "label_flip" in f)] >= 7)
            paid = payouts(run, est, rounds)
            for f, v in paid.items():
                shares[_kind(f)].append(v / POOL)
            free_paid.append(sum(paid[f] for f in paid if _kind(f) in FREE_RIDERS))
            total = max(sum(paid.values()), 1)
            pair_share.append(
                sum(paid[f] for f in paid if _kind(f) in ("clean_a", "duplicate")) / total
            )
            if est in solo["rounds"][0]["scored"]:
                solo_paid = payouts(solo, est, rounds)
                solo_share.append(
                    sum(solo_paid[f] for f in solo_paid if _kind(f) == "clean_a")
                    / max(sum(solo_paid.values()), 1)
                )
        out[est] = {
            "spearman_vs_exact": float(np.mean(rhos)) if rhos else float("nan"),
            "evaluations_vs_exact": float(np.mean(evals)),
            "seconds_per_round": float(np.mean(secs)),
            "mean_rank": {k: float(np.mean(v)) for k, v in ranks.items()},
            "mean_payout_share": {k: float(np.mean(v)) if v else 0.0 for k, v in shares.items()},
            "free_rider_payout_max": int(max(free_paid)),
            "seeds_free_riders_unpaid": int(sum(p == 0 for p in free_paid)),
            "label_flip_bottom2_fraction": float(np.mean(flip_bottom2)),
            "duplicate_pair_share": float(np.mean(pair_share)),
            "original_alone_share": float(np.mean(solo_share)) if solo_share else float("nan"),
        }
    return out


def scaling(sizes: list[int], seed: int, gtg: tuple[str, dict], epsilon: float | None) -> list:
    """GTG time per round against the round's training time as the federation grows."""
    task = get_task("molding_quality")
    rows = []
    for n in sizes:
        factories, validation = planted_factories(task, seed, kinds=("clean_a",), extra_clean=n - 1)
        run = federated_rounds(task, factories, validation, 2, seed, {"gtg": gtg}, epsilon)
        rec = run["rounds"][-1]
        rows.append(
            {
                "factories": n,
                "train_seconds": rec["train_seconds"],
                "train_seconds_per_factory": rec["train_seconds"] / n,
                "gtg_seconds": rec["scored"]["gtg"]["seconds"],
                "gtg_evaluations": rec["scored"]["gtg"]["evaluations"],
            }
        )
        print(
            f"  n={n:3d}: training {rec['train_seconds']:6.1f} s "
            f"({rec['train_seconds'] / n:.2f} s/factory), GTG {rows[-1]['gtg_seconds']:6.2f} s "
            f"({rows[-1]['gtg_evaluations']} evaluations), "
            f"GTG/training {rows[-1]['gtg_seconds'] / rec['train_seconds']:.2f}x",
            flush=True,
        )
    return rows


def _print(task_name: str, stats: dict, seeds: int) -> None:
    print(f"\n{task_name} ({seeds} seeds, 8 factories)")
    head = (
        f"{'estimator':<16} {'spearman':>8} {'evals':>7} {'s/round':>8} {'free-rider paid':>15} "
        f"{'flip bottom-2':>13} {'dup pair':>8} {'orig alone':>10}"
    )
    print(head)
    for est, s in stats.items():
        print(
            f"{est:<16} {s['spearman_vs_exact']:8.3f} {s['evaluations_vs_exact']:7.1%} "
            f"{s['seconds_per_round']:8.2f} {s['free_rider_payout_max']:>15d} "
            f"{s['label_flip_bottom2_fraction']:13.0%} {s['duplicate_pair_share']:8.1%} "
            f"{s['original_alone_share']:10.1%}"
        )
    print("mean rank by planted kind (1 = largest contribution):")
    print(f"{'estimator':<16} " + " ".join(f"{k:>16}" for k in KINDS))
    for est, s in stats.items():
        print(f"{est:<16} " + " ".join(f"{s['mean_rank'][k]:16.1f}" for k in KINDS))
    print("mean payout share by planted kind (of the run's pool):")
    for est, s in stats.items():
        print(f"{est:<16} " + " ".join(f"{s['mean_payout_share'][k]:16.1%}" for k in KINDS))


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=["tep_fault", "molding_quality"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epsilon", type=float, default=8.0, help="factory DP budget; 0 = off")
    parser.add_argument("--scaling", nargs="*", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 rounds, no scaling")
    parser.add_argument(
        "--gtg-sweep", action="store_true", help="also score with looser GTG settings"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_contribution.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.rounds, args.scaling = 1, 2, []
    epsilon = args.epsilon or None
    estimators = {**ESTIMATORS, **(gtg_variants() if args.gtg_sweep else {})}
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "tasks": {}}
    for task_name in args.tasks:
        task = get_task(task_name)
        runs, solos = [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            factories, validation = planted_factories(task, seed)
            runs.append(
                federated_rounds(
                    task, factories, validation, args.rounds, seed, estimators, epsilon
                )
            )
            solo = [f for f in factories if f.kind != "duplicate"]
            solos.append(
                federated_rounds(task, solo, validation, args.rounds, seed, ESTIMATORS, epsilon)
            )
            print(f"{task_name} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        stats = summarise(task_name, runs, solos, args.rounds)
        report["tasks"][task_name] = stats
        _print(task_name, stats, args.seeds)
    if args.scaling:
        print("\nGTG scaling (molding_quality, round 2; training is all factories in sequence):")
        report["scaling"] = scaling(args.scaling, 0, ESTIMATORS["gtg"], epsilon)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
