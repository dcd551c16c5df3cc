"""The Hydra config tree composes, accepts the documented overrides, and instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fl_server.config import (
    compose_config,
    data_dir_for,
    finalize,
    flat_params,
    load_from_run_config,
)


def test_defaults_compose():
    cfg = compose_config()
    assert cfg.task.name == "tep_fault"
    assert cfg.strategy.name == "fedavg"
    assert cfg.privacy.enabled is True
    assert cfg.federation.num_factories >= 3


@pytest.mark.parametrize("task", ["tep_fault", "molding_quality", "rul"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_documented_overrides(task, strategy, tmp_path):
    cfg = compose_config(
        [
            f"task={task}",
            f"strategy={strategy}",
            "privacy.epsilon=3",
            "privacy.delta=1e-6",
            "federation.num_factories=6",
            "federation.num_rounds=7",
            "tracking.uri=sqlite:///x.db",
            "seed=5",
        ]
    )
    cfg = finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")
    assert cfg.task.name == task and cfg.strategy.name == strategy
    assert cfg.privacy.epsilon == 3 and cfg.privacy.delta == 1e-6
    assert cfg.federation.num_rounds == 7 and cfg.seed == 5
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'x.db'}"
    assert Path(cfg.data_dir).is_absolute() and task in cfg.data_dir
    strategy_obj = instantiate(cfg.strategy.flower)
    assert type(strategy_obj).__name__ == {"fedavg": "FedAvg", "fedprox": "FedProx"}[strategy]
    assert strategy_obj.min_available_nodes == 6
    assert "privacy.epsilon" in flat_params(cfg)


def test_data_dir_depends_on_partition():
    a = compose_config(["partition=dirichlet", "partition.alpha=0.1"])
    b = compose_config(["partition=dirichlet", "partition.alpha=10"])
    assert data_dir_for(a) != data_dir_for(b)


def test_server_reads_runner_file_or_composes(tmp_path, monkeypatch):
    cfg = finalize(compose_config(["task=rul"]), base=tmp_path, output_dir=tmp_path / "o")
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    assert load_from_run_config({"config-file": str(path)}) == cfg
    monkeypatch.chdir(tmp_path)
    composed = load_from_run_config(
        {
            "config-file": "",
            "overrides": "task=molding_quality federation.num_rounds=2",
            "output-dir": str(tmp_path / "x"),
        }
    )
    assert composed.task.name == "molding_quality" and composed.federation.num_rounds == 2
    assert composed.output_dir == str(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="config-file"):
        load_from_run_config({"config-file": str(tmp_path / "missing.yaml")})
