"""The whole config is validated up front: one line naming the key, the value and what is allowed.

Every bad config here used to reach the factories (or Flower) and fail there, late, inside
tracebacks, or not at all (a run that exits 0 and registers an untrained model).
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from fl_server.config import compose_config, finalize, load_from_run_config
from fl_server.config_schema import ConfigError, validate_config

CATALOGUE = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
)

# override(s) -> the key the error must name
BAD = [
    (["privacy.epsilon=-1"], "privacy.epsilon"),
    (["privacy.epsilon=0"], "privacy.epsilon"),
    (["privacy.delta=2"], "privacy.delta"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.accountant=foo"], "privacy.accountant"),
    (["privacy.accountant=gdp"], "privacy.accountant"),  # the ledger cannot compose it
    (["privacy.grad_sample_mode=fast"], "privacy.grad_sample_mode"),
    (["task.train.lr=abc"], "task.train.lr"),
    (["task.train.lr=0"], "task.train.lr"),
    (["task.train.batch_size=0"], "task.train.batch_size"),
    (["task.train.local_epochs=1.5"], "task.train.local_epochs"),
    (["federation.num_rounds=0"], "federation.num_rounds"),
    (["federation.num_rounds=two"], "federation.num_rounds"),
    (["federation.client_cpus=0"], "federation.client_cpus"),
    (["federation.round_timeout=-5"], "federation.round_timeout"),
    (["federation.num_factories=1"], "federation.min_factories"),
    (["federation.min_factories=5"], "federation.min_factories"),
    (["federation.min_available=9"], "federation.min_available"),
    (["rewards.amount=-1"], "rewards.amount"),
    (["rewards.amount=10.5"], "rewards.amount"),
    (["rewards.schedule=weekly"], "rewards.schedule"),
    (["contribution.within_tol=-1"], "contribution.within_tol"),
    (["contribution.max_permutations=0"], "contribution.max_permutations"),
    (["contribution.validation_examples=0"], "contribution.validation_examples"),
    (["contribution=exact", "federation.num_factories=20"], "contribution"),
    (["strategy=fedmedian", "contribution=linearised"], "contribution"),
    (
        ["attack=label_flip", "attack.num_malicious=5", "federation.num_factories=3"],
        "attack.num_malicious",
    ),
    (["attack=label_flip", "attack.fraction=1.5"], "attack.fraction"),
    (["attack=noise", "attack.std=-1"], "attack.std"),
    (["strategy=bulyan", "federation.num_factories=2"], "federation.num_factories"),
    (
        [
            "strategy=bulyan",
            "attack=sign_flip",
            "attack.num_malicious=2",
            "federation.num_factories=10",
        ],
        "federation.num_factories",
    ),
    (["strategy=krum", "attack=scale", "federation.num_factories=4"], "federation.num_factories"),
    (
        ["strategy=multikrum", "strategy.flower.num_nodes_to_select=9"],
        "strategy.flower.num_nodes_to_select",
    ),
    (["strategy=fedtrimmedavg", "strategy.flower.beta=0.5"], "strategy.flower.beta"),
    (["partition=dirichlet", "partition.alpha=0"], "partition.alpha"),
    (["client_dp=fixed", "client_dp.clipping_norm=0"], "client_dp"),
    (["validation.max_update_norm=-1"], "validation.max_update_norm"),
    (["seed=-1"], "seed"),
    (["task=rul", "task.train.dp_batch_size=0"], "task.train.dp_batch_size"),
    (["task=rul", "task.train.dp_lr=-0.1"], "task.train.dp_lr"),
    (["task.train.dp_lr=fast"], "task.train.dp_lr"),
    (["contribution.guards.noise_rule=coin"], "contribution.guards.noise_rule"),
    (["contribution.surrogate=both"], "contribution.surrogate"),
    (["contribution.guards.noise_placebos=1"], "contribution.guards.noise_placebos"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_config_is_refused_with_one_line_naming_the_key(overrides, key, tmp_path):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as info:
        finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")
    message = str(info.value)
    assert info.value.key == key
    assert message.startswith(f"config {key}=")
    assert "\n" not in message
    # The value the user gave is in the line.
    value = overrides[-1].split("=", 1)[1] if key != "contribution" else cfg.contribution.method
    assert value in message


def test_num_rounds_zero_names_the_federation_key_not_the_rewards_one(tmp_path):
    with pytest.raises(ConfigError, match=r"^config federation\.num_rounds=0: must be an integer"):
        finalize(compose_config(["federation.num_rounds=0"]), tmp_path, tmp_path / "o")


def test_a_single_factory_is_told_how_to_run(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.min_factories=1"):
        finalize(compose_config(["federation.num_factories=1"]), tmp_path, tmp_path / "o")
    cfg = finalize(
        compose_config(["federation.num_factories=1", "federation.min_factories=1"]),
        tmp_path,
        tmp_path / "o",
    )
    assert cfg.federation.num_factories == 1


@pytest.mark.parametrize("strategy", CATALOGUE)
@pytest.mark.parametrize("contribution", ["gtg", "none"])
def test_every_catalogue_strategy_is_valid_for_five_factories(strategy, contribution, tmp_path):
    cfg = compose_config(
        [f"strategy={strategy}", f"contribution={contribution}", "federation.num_factories=5"]
    )
    finalize(cfg, base=tmp_path, output_dir=tmp_path / "out")


@pytest.mark.parametrize("strategy", CATALOGUE)
def test_the_shipped_defaults_are_valid(strategy, tmp_path):
    finalize(compose_config([f"strategy={strategy}"]), base=tmp_path, output_dir=tmp_path / "o")


@pytest.mark.parametrize(
    "overrides",
    [
        ["privacy=none"],  # epsilon .inf is fine when DP is off
        ["contribution=exact", "federation.num_factories=12"],
        [
            "strategy=bulyan",
            "attack=sign_flip",
            "attack.num_malicious=1",
            "federation.num_factories=7",
        ],
        ["strategy=krum", "attack=scale", "attack.num_malicious=2", "federation.num_factories=5"],
        ["client_dp=fixed"],
        ["client_dp=adaptive"],
        ["attack='nan'"],
    ],
)
def test_good_edge_configs_pass(overrides, tmp_path):
    finalize(compose_config(overrides), base=tmp_path, output_dir=tmp_path / "o")


def test_the_serverapp_path_validates_a_config_file(tmp_path):
    cfg = finalize(compose_config(), base=tmp_path, output_dir=tmp_path / "o")
    cfg.privacy.epsilon = -1.0
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ConfigError, match=r"^config privacy\.epsilon=-1\.0"):
        load_from_run_config({"config-file": str(path)})


def test_the_serverapp_path_validates_its_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config privacy\.accountant='foo'"):
        load_from_run_config({"overrides": "privacy.accountant=foo"})


def test_validation_does_not_change_the_config(tmp_path):
    cfg = compose_config(["attack=label_flip"])
    before = OmegaConf.to_yaml(cfg)
    validate_config(cfg)
    assert OmegaConf.to_yaml(cfg) == before
    assert "factor" not in cfg.attack  # the schema's optional fields are not added


def test_allowed_names_are_those_of_the_modules_that_use_them():
    from fl_client.attacks import ATTACKS
    from fl_client.privacy import LEDGER_ACCOUNTANTS
    from fl_client.training import GRAD_SAMPLE_MODES
    from fl_server.config_schema import _allowed
    from fl_server.rewards.allocation import SCHEDULES
    from standard_models.registry import TASKS
    from strategies.client_dp import MODES
    from strategies.contribution.guards import NOISE_RULES
    from strategies.contribution.linearised import SURROGATES
    from strategies.contribution.scorer import METHODS

    allowed = _allowed()
    assert set(allowed["task.name"]) == set(TASKS)
    assert set(allowed["privacy.accountant"]) == set(LEDGER_ACCOUNTANTS)
    assert set(allowed["privacy.grad_sample_mode"]) == set(GRAD_SAMPLE_MODES)
    assert set(allowed["contribution.method"]) == set(METHODS)
    assert set(allowed["rewards.schedule"]) == set(SCHEDULES)
    assert set(allowed["attack.name"]) == set(ATTACKS)
    assert set(allowed["client_dp.mode"]) == set(MODES)
    assert set(allowed["contribution.guards.noise_rule"]) == set(NOISE_RULES)
    assert set(allowed["contribution.surrogate"]) == set(SURROGATES)
