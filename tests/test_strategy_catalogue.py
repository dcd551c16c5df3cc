"""Every strategy in ``conf/strategy/`` composes with Hydra and builds the right Flower class.

The catalogue reuses Flower's own strategies; these tests guard the YAML (targets, argument
names, interpolations) so a typo fails here rather than at the start of a federation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from flwr.serverapp import strategy as fl
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fl_server.config import CONF_DIR

STRATEGY_DIR = CONF_DIR / "strategy"
EXPECTED: dict[str, type] = {
    "fedavg": fl.FedAvg,
    "fedprox": fl.FedProx,
    "fedadam": fl.FedAdam,
    "fedyogi": fl.FedYogi,
    "fedavgm": fl.FedAvgM,
    "fedtrimmedavg": fl.FedTrimmedAvg,
    "fedmedian": fl.FedMedian,
    "krum": fl.Krum,
    "multikrum": fl.MultiKrum,
    "bulyan": fl.Bulyan,
}
BYZANTINE = ("krum", "multikrum", "bulyan")
FILES = sorted(STRATEGY_DIR.glob("*.yaml"))


def _attack_in_defaults() -> bool:
    """Whether ``conf/config.yaml`` already selects an attack (then no ``+`` is needed)."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml").get("defaults", [])
    return any(
        isinstance(entry, Mapping) and any(str(k).split()[-1] == "attack" for k in entry)
        for entry in defaults
    )


def _attack_override(name: str) -> str:
    """Select attack ``name``; quoted, since Hydra would read a bare ``nan`` as a float."""
    return f"attack='{name}'" if _attack_in_defaults() else f"+attack='{name}'"


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_catalogue_lists_every_expected_strategy() -> None:
    assert {p.stem for p in FILES} == set(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_strategy_composes_and_instantiates(path: Path) -> None:
    name = path.stem
    assert name in EXPECTED, f"add conf/strategy/{path.name} to EXPECTED"
    assert path.read_text().startswith("#"), "open the file with a comment citing the paper"
    cfg = _compose([f"strategy={name}", "federation.num_factories=5"])
    assert cfg.strategy.name == name
    strategy = instantiate(cfg.strategy.flower)
    assert type(strategy) is EXPECTED[name]
    # evaluation is central on the server; sampling follows the federation's size
    assert strategy.fraction_evaluate == 0.0 and strategy.min_evaluate_nodes == 0
    assert strategy.min_available_nodes == 5
    assert strategy.min_train_nodes == cfg.federation.min_factories


@pytest.mark.parametrize("name", BYZANTINE)
def test_byzantine_strategies_assume_the_attack_size(name: str) -> None:
    without = instantiate(_compose([f"strategy={name}"]).strategy.flower)
    assert without.num_malicious_nodes == 0
    cfg = _compose([f"strategy={name}", _attack_override("sign_flip"), "attack.num_malicious=1"])
    assert instantiate(cfg.strategy.flower).num_malicious_nodes == 1
    cfg = _compose([f"strategy={name}", _attack_override("none")])
    assert instantiate(cfg.strategy.flower).num_malicious_nodes == 0


def test_adaptive_and_robust_defaults() -> None:
    adam = instantiate(_compose(["strategy=fedadam"]).strategy.flower)
    assert (adam.eta, adam.tau) == (0.3, 0.03) and (adam.beta_1, adam.beta_2) == (0.9, 0.99)
    cfg = _compose(["strategy=fedyogi", "task=rul"])
    yogi = instantiate(cfg.strategy.flower)
    assert (yogi.eta, yogi.tau) == (0.3, 0.03) and yogi.eta_l == cfg.task.train.lr
    avgm = instantiate(_compose(["strategy=fedavgm"]).strategy.flower)
    assert avgm.server_learning_rate / (1 - avgm.server_momentum) == pytest.approx(1.0)
    trimmed = instantiate(_compose(["strategy=fedtrimmedavg"]).strategy.flower)
    assert 0 <= trimmed.beta < 0.5
    multikrum = instantiate(_compose(["strategy=multikrum"]).strategy.flower)
    assert multikrum.num_nodes_to_select >= 1


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_attack_composes_with_every_strategy(path: Path) -> None:
    for attack in sorted(p.stem for p in (CONF_DIR / "attack").glob("*.yaml")):
        cfg = _compose([f"strategy={path.stem}", _attack_override(attack)])
        assert cfg.attack.name == attack
        strategy = instantiate(cfg.strategy.flower)
        if path.stem in BYZANTINE:
            assert strategy.num_malicious_nodes == cfg.attack.num_malicious
