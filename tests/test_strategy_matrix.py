"""Every catalogue strategy, with and without contribution scoring, and Flower's engine alike.

The product runs a federation through Flower's simulation engine (``python -m experiments.run``:
``flwr run`` against a simulation-mode SuperLink, Ray underneath) with GTG-Shapley scoring and
end-of-run rewards on by default. The benchmarks run the same ServerApp and ClientApp code in
one process (:mod:`experiments.inprocess`) because Ray's start-up would dominate their
hundreds of short runs. Two things are checked here for the strategies in ``conf/strategy``
(5 factories, 2 rounds; Bulyan needs ``n >= 4f + 3`` and Krum ``n > 2f + 2``, with f = 0
without an attack group both hold for 5):

* every strategy finishes with scoring on, logs ``factory/<id>/contribution`` for every
  factory and round and registers a model version, and with ``contribution=none`` finishes
  without logging any contribution (in process: the ServerApp and ClientApp code that Flower's
  engine runs, without Ray's start-up for each of the 20 runs);
* for a fixed seed Flower's engine gives what the in-process run gives, for the plain mean and
  the rules that consume their input records: the same per-round validation metrics, test
  metrics, cumulative contributions and payouts, up to float32 rounding. Sample-level DP is
  off (``privacy=none``): its noise comes from OS entropy by design, so two DP runs never
  agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from experiments.inprocess import run_inprocess
from fl_server.config import CONF_DIR, compose_config, finalize

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STRATEGIES = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
#: Through Flower's engine as well: the plain mean and the rules that consume their input
#: records (the median, and Bulyan on top of it), where scoring once broke aggregation.
ENGINE = ("fedavg", "fedmedian", "bulyan")
NUM_FACTORIES = 5
NUM_ROUNDS = 2
#: Float32 rounding: Ray's workers run torch with another thread count, so sums are reduced in
#: another order (seen: a loss differing in its 7th digit).
CLOSE = {"rel": 1e-5, "abs": 1e-6}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder for the module: every run uses the same factories' files."""
    return tmp_path_factory.mktemp("data")


def _config(root: Path, data_root: Path, name: str, *overrides: str) -> DictConfig:
    cfg = compose_config(
        [
            f"federation.num_factories={NUM_FACTORIES}",
            f"federation.num_rounds={NUM_ROUNDS}",
            "privacy=none",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"tracking.artifact_root={root / 'artifacts'}",
            f"data_root={data_root}",
            f"run_name={name}",
            *overrides,
        ]
    )
    return finalize(cfg, base=root, output_dir=root / name)


def _check_finished(summary: dict, cfg: DictConfig, scored: bool) -> None:
    """The run trained, its MLflow run finished, contributions logged iff scored, model kept."""
    assert [r["round"] for r in summary["rounds"]] == list(range(NUM_ROUNDS + 1))
    assert summary["rounds"][-1] != summary["rounds"][0], "the global model never changed"
    assert not summary["failures"], summary["failures"]
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run_id = summary["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    factories = [f"factory_{i:03d}" for i in range(NUM_FACTORIES)]
    for fid in factories:
        steps = [m.step for m in client.get_metric_history(run_id, f"factory/{fid}/contribution")]
        assert steps == (list(range(1, NUM_ROUNDS + 1)) if scored else []), fid
    if scored:
        assert set(summary["contribution_cumulative"]) == set(factories)
        assert sum(summary["payout_cumulative"].values()) + summary["reward_carry"] > 0
    else:
        assert summary["contribution_cumulative"] == {}
    name = f"factoryfed-{cfg.task.name}"
    assert summary["registered_model"] == name and summary["model_version"] is not None
    assert client.get_model_version(name, summary["model_version"]).run_id == run_id


def _check_same(inprocess: dict, simulated: dict) -> None:
    """Same per-round metrics, test metrics, contributions and payouts (float32 rounding)."""
    assert len(inprocess["rounds"]) == len(simulated["rounds"])
    for ours, flowers in zip(inprocess["rounds"], simulated["rounds"], strict=True):
        assert ours == pytest.approx(flowers, **CLOSE)
    assert inprocess["test"] == pytest.approx(simulated["test"], **CLOSE)
    assert inprocess["contribution_cumulative"] == pytest.approx(
        simulated["contribution_cumulative"], **CLOSE
    )
    # Payouts are whole cents split from the contributions: a contribution that differs in its
    # 7th digit may move one cent between factories, never the total.
    assert inprocess["payout_cumulative"] == pytest.approx(simulated["payout_cumulative"], abs=1)
    assert sum(inprocess["payout_cumulative"].values()) + (inprocess["reward_carry"] or 0) == sum(
        simulated["payout_cumulative"].values()
    ) + (simulated["reward_carry"] or 0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("contribution", ["gtg", "none"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_with_and_without_scoring(
    strategy: str, contribution: str, tmp_path: Path, data_root: Path
) -> None:
    """The ServerApp and ClientApp of every catalogue strategy, in process (the same code
    Flower's engine runs, as the comparisons below check for representative rules)."""
    common = (f"strategy={strategy}", f"contribution={contribution}", "seed=3")
    cfg = _config(tmp_path, data_root, "inprocess", *common)
    _check_finished(run_inprocess(cfg, quiet=True), cfg, scored=contribution != "none")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ENGINE)
def test_flowers_engine_and_the_in_process_runner_agree(
    strategy: str, tmp_path: Path, data_root: Path
) -> None:
    """With scoring on, Flower's simulation engine gives what the in-process runner gives."""
    from experiments.run import run_simulation

    common = (f"strategy={strategy}", "contribution=gtg", "seed=3")
    simulated_cfg = _config(tmp_path, data_root, "simulation", *common)
    simulated = run_simulation(simulated_cfg)
    _check_finished(simulated, simulated_cfg, scored=True)

    inprocess_cfg = _config(tmp_path, data_root, "inprocess", *common)
    inprocess = run_inprocess(inprocess_cfg, quiet=True)
    _check_finished(inprocess, inprocess_cfg, scored=True)
    _check_same(inprocess, simulated)
