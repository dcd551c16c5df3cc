"""What a whole run leaves in MLflow for the operator, through the real server and client code.

Runs in this process (experiments.inprocess): a small run must end with its description, the
five plots, every factory's statement, failures.json, the model linked to the final round's
metrics and a described model version; a run in which every factory fails trains nothing and
must end FAILED, say why, and register no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from run_helpers import small_run_config

from experiments.inprocess import run_inprocess
from fl_server.data import ensure_data
from fl_server.report import PLOTS
from fl_server.server_app import NothingTrained
from fl_server.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, NOTE_TAG

#: The operator's records come from scoring and paying: exact Shapley values, paid per run.
SCORED = ("contribution=exact", "rewards=per_run")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_finished_run_tells_the_operator_everything(tmp_path: Path) -> None:
    summary = run_inprocess(small_run_config(tmp_path, "ok", *SCORED), quiet=True)
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["reward_currency"] == "EUR" and tags["privacy_unit"] == "shot"
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    note = tags[NOTE_TAG]
    assert note.startswith(f"**final {summary['main_metric']}** validation")
    assert "per shot" in note and "**accepted updates** 6" in note
    for fid in ("factory_000", "factory_001", "factory_002"):
        assert f"| {fid} | " in note
    assert note.count("| EUR ") == 3

    def listing(path: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run.info.run_id, path)}

    assert listing("plots") == {f"plots/{name}.png" for name in PLOTS}
    statements = listing("rewards/statements")
    assert {f"rewards/statements/factory_000-statement.{k}" for k in ("csv", "json", "png")} <= (
        statements
    )
    failures = client.download_artifacts(run.info.run_id, "failures.json", str(tmp_path))
    assert json.loads(Path(failures).read_text()) == []  # logged even when nothing failed

    # The model is linked to the final round's metrics, test scores included.
    metric = summary["main_metric"]
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1
    linked = {m.key: m for m in models[0].metrics or []}
    assert linked[f"test/{metric}"].value == pytest.approx(summary["test"][metric])
    assert {m.step for m in linked.values()} == {2}
    version = client.get_model_version(summary["registered_model"], summary["model_version"])
    assert summary["ledger_head"] in version.description
    assert version.tags["ledger_head"] == summary["ledger_head"]
    assert version.tags["task"] == "molding_quality"

    history = client.get_metric_history(run.info.run_id, "dashboard/accepted")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 3.0)]
    keys = set(run.data.metrics)
    assert not any(k.endswith(("/delta", "/dp")) for k in keys)
    assert "factory/factory_000/epsilon_remaining" in keys
    paid = sum(
        run.data.metrics[f"factory/{f}/payout_cumulative"] for f in summary["payout_cumulative"]
    )
    assert paid == pytest.approx(sum(summary["payout_cumulative"].values()) / 100)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_run_that_trains_nothing_fails_and_registers_no_model(tmp_path: Path) -> None:
    cfg = small_run_config(tmp_path, "nothing", *SCORED)
    data_dir, _ = ensure_data(cfg)
    for i in range(3):
        (data_dir / f"factory_{i:03d}.parquet").write_bytes(b"not a parquet file")

    with pytest.raises(NothingTrained, match="no round accepted an update"):
        run_inprocess(cfg, quiet=True)

    client = MlflowClient(tracking_uri=str(cfg.tracking.uri))
    (run,) = client.search_runs(
        [client.get_experiment_by_name(str(cfg.tracking.experiment)).experiment_id]
    )
    assert run.info.status == "FAILED"
    assert "no round accepted an update" in run.data.tags["failure_reason"]
    assert run.data.tags[NOTE_TAG].startswith("**FAILED: NothingTrained")
    failures = client.download_artifacts(run.info.run_id, "failures.json", str(tmp_path))
    assert {f["status"] for f in json.loads(Path(failures).read_text())} == {"data-error"}
    assert client.search_registered_models() == []
    assert not (tmp_path / "nothing" / "summary.json").exists()


def test_the_printed_summary_quotes_the_full_ledger_head(capsys) -> None:
    from omegaconf import OmegaConf

    from experiments.run import print_summary
    from fl_server.report import synthetic_summary

    summary = synthetic_summary(4, 3)
    head = "ab" * 32
    summary.update(
        wall_seconds=3.0,
        epsilon_budget=8.0,
        epsilon_client_level=None,
        ledger="x.sqlite",
        ledger_head=head,
        mlflow_run_id="r",
        tracking_uri="sqlite:///m.db",
    )
    print_summary(summary, OmegaConf.create({"tracking": {"artifact_root": "mlartifacts"}}))
    out = capsys.readouterr().out
    assert f"head {head}" in out and "--head <head>" in out
    assert out.count("EUR ") >= 4  # every factory's payout, in currency
