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


def test_a_deployment_can_start_rounds_without_every_factory(tmp_path):
    cfg = compose_config(["federation.num_factories=5", "federation.min_available=3"])
    cfg = finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")
    strategy = instantiate(cfg.strategy.flower)
    assert strategy.min_available_nodes == 3
    assert strategy.min_train_nodes == cfg.federation.min_factories == 2


@pytest.mark.parametrize(
    "override",
    ["federation.min_available=5", "federation.min_factories=0", "federation.min_factories=7"],
)
def test_a_federation_that_could_never_run_is_refused(override, tmp_path):
    cfg = compose_config(["federation.num_factories=4", override])
    field = override.split("=")[0]
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")


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


def test_malicious_factories_are_drawn_once_per_seed_or_named():
    from fl_server.config import malicious_factories
    from fl_server.server_app import train_instruction

    none = train_instruction(compose_config([]), "r")
    assert (none.attack, none.attack_factories, none.attack_factor) == ("none", "", None)
    cfg = compose_config(["attack=scale", "attack.num_malicious=3", "federation.num_factories=10"])
    chosen = malicious_factories(cfg)
    assert len(chosen) == 3 and chosen == malicious_factories(cfg)
    assert all(f.startswith("factory_0") for f in chosen)
    sent = train_instruction(cfg, "r")
    assert sent.attack_factories == ",".join(chosen) and sent.attack_factor == 10.0
    named = compose_config(["attack=sign_flip", "+attack.factories=[factory_003]"])
    assert malicious_factories(named) == ["factory_003"]
    with pytest.raises(ValueError, match="attack.num_malicious"):
        malicious_factories(compose_config(["attack=noise", "attack.num_malicious=9"]))
    # Hydra would read a bare nan as a number; the catalogue's nan attack still composes.
    assert train_instruction(compose_config(["attack=nan"]), "r").attack == "nan"


def test_validation_rules_come_from_the_config():
    from fl_server.server_app import validation_rules

    rules = validation_rules(compose_config(["validation.max_update_norm=5.0"]))
    assert rules.max_update_norm == 5.0 and rules.reject_unchanged
    assert validation_rules(compose_config([])).max_update_norm is None


def test_a_federation_that_requires_sketches_says_so_in_its_instruction():
    from fl_server.server_app import train_instruction, validation_rules

    default = compose_config([])
    assert not validation_rules(default).require_record_sketch
    assert not train_instruction(default, "r").record_sketch_required
    required = compose_config(["validation.require_record_sketch=true"])
    assert validation_rules(required).require_record_sketch
    sent = train_instruction(required, "r")
    assert sent.record_sketch_required and sent.to_record()["record-sketch-required"] is True
