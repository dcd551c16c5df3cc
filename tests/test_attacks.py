"""Simulated attacks: parsing the train config, label flips, update poisoning, and the wiring
through a factory round and the ClientApp (real local training on tiny generated data)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from omegaconf import OmegaConf
from round_helpers import run_round
from tiny_task import TinyTask as BaseTinyTask
from tiny_task import make_frame, molding_frame
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fl_client.attacks import (
    ATTACKS,
    AttackConfig,
    AttackConfigError,
    label_kind,
    poison_dataset,
    poison_labels,
    poison_update,
)
from fl_client.factory import FactoryRoundResult
from fl_client.training import LocalTrainConfig
from fl_server.config import CONF_DIR
from standard_models.registry import get_task

# ------------------------------------------------------------------ parsing


def _config(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "attack": "label_flip",
        "attack-factories": "factory_000,factory_002",
        "attack-fraction": 0.5,
        "attack-factor": 3.0,
        "attack-std": 0.1,
        "seed": 7,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_no_attack_keys_mean_no_attack() -> None:
    attack = AttackConfig.from_config({"seed": 1, "lr": 0.1})
    assert attack.name == "none" and not attack.active
    assert not attack.is_malicious("factory_000")


def test_full_config_parses_from_a_config_record() -> None:
    attack = AttackConfig.from_config(ConfigRecord(_config()))
    assert attack.name == "label_flip" and attack.active
    assert attack.factories == {"factory_000", "factory_002"}
    assert (attack.fraction, attack.factor, attack.std, attack.seed) == (0.5, 3.0, 0.1, 7)
    assert attack.is_malicious("factory_000") and attack.is_malicious("factory_002")
    assert not attack.is_malicious("factory_001")


def test_factory_list_tolerates_blanks_and_empty() -> None:
    attack = AttackConfig.from_config(_config(**{"attack-factories": " f1, ,f2 ,"}))
    assert attack.factories == {"f1", "f2"}
    nobody = AttackConfig.from_config(_config(**{"attack-factories": ""}))
    assert not nobody.active and not nobody.is_malicious("")


def test_none_never_marks_a_factory_malicious() -> None:
    attack = AttackConfig.from_config({"attack": "none", "attack-factories": "f1"})
    assert not attack.is_malicious("f1") and not attack.active
    assert AttackConfig.from_config({"attack": "none"}).name == "none"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"attack": "backdoor"}, "'attack'"),
        ({"attack": 3}, "'attack'"),
        ({"attack-factories": None}, "'attack-factories'"),
        ({"attack-factories": 5}, "'attack-factories'"),
        ({"attack-fraction": None}, "'attack-fraction'"),
        ({"attack-fraction": 1.5}, "'attack-fraction'"),
        ({"attack-fraction": "0.5"}, "'attack-fraction'"),
        ({"attack-fraction": True}, "'attack-fraction'"),
        ({"attack": "scale", "attack-factor": None}, "'attack-factor'"),
        ({"attack": "scale", "attack-factor": float("inf")}, "'attack-factor'"),
        ({"attack": "sign_flip", "attack-factor": -1.0}, "'attack-factor'"),
        ({"attack": "noise", "attack-std": None}, "'attack-std'"),
        ({"attack": "noise", "attack-std": -0.5}, "'attack-std'"),
        ({"attack": "noise", "attack-std": float("nan")}, "'attack-std'"),
        ({"seed": "x"}, "'seed'"),
    ],
)
def test_missing_or_bad_keys_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(AttackConfigError, match=key):
        AttackConfig.from_config(_config(**overrides))


def test_only_the_attacks_own_parameter_is_required() -> None:
    cfg = {"attack": "nan", "attack-factories": "f1"}
    assert AttackConfig.from_config(cfg).is_malicious("f1")
    cfg = {"attack": "sign_flip", "attack-factories": "f1", "attack-factor": 2}
    assert AttackConfig.from_config(cfg).factor == 2.0


@pytest.mark.parametrize("path", sorted((CONF_DIR / "attack").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_attack_config_becomes_a_valid_train_config(path: Path) -> None:
    """What the server will send, built from each conf/attack file, parses cleanly."""
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and cfg.name in ATTACKS
    assert isinstance(cfg.num_malicious, int) and cfg.num_malicious >= 0
    assert (cfg.num_malicious == 0) == (cfg.name == "none")
    ids = ",".join(f"factory_{i:03d}" for i in range(cfg.num_malicious))
    train_config = {
        "attack": cfg.name,
        "attack-factories": ids,
        "attack-fraction": float(cfg.get("fraction", 1.0)),
        "attack-factor": float(cfg.get("factor", 1.0)),
        "attack-std": float(cfg.get("std", 1.0)),
    }
    attack = AttackConfig.from_config(train_config)
    assert attack.is_malicious("factory_000") == (cfg.name != "none")
    expected = {"label_flip": "fraction", "sign_flip": "factor", "scale": "factor", "noise": "std"}
    if cfg.name in expected:
        assert expected[cfg.name] in cfg


# ------------------------------------------------------------------ label flips


def _changed(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return before != after


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_class_labels_flip_exactly_the_fraction_and_never_to_themselves(fraction: float) -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 22, (1000,), generator=gen)
    before = y.clone()
    out = poison_labels("tep_fault", y, fraction, torch.Generator().manual_seed(1))
    assert torch.equal(y, before)  # the input is untouched
    assert out.dtype == torch.int64 and out.shape == y.shape
    # every chosen label moved: exactly round(fraction * n) differ, none stayed in place
    assert int(_changed(y, out).sum()) == round(fraction * 1000)
    assert int(out.min()) >= 0 and int(out.max()) <= 21


def test_class_flips_are_uniform_over_the_other_classes() -> None:
    y = torch.full((21_000,), 5, dtype=torch.long)
    out = poison_labels(get_task("tep_fault"), y, 1.0, torch.Generator().manual_seed(3))
    counts = torch.bincount(out, minlength=22)
    assert counts[5] == 0
    others = counts[torch.arange(22) != 5].double()
    # 21 classes, 1000 expected each (sd ~31): all within 5 sd
    assert float((others - 1000).abs().max()) < 160


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_binary_labels_become_one_minus_y(dtype: torch.dtype) -> None:
    y = (torch.arange(400) % 3 == 0).to(dtype)
    out = poison_labels("molding_quality", y, 0.25, torch.Generator().manual_seed(0))
    changed = _changed(y, out)
    assert int(changed.sum()) == 100 and out.dtype == dtype
    assert torch.equal(out[changed], 1 - y[changed])
    assert torch.equal(out[~changed], y[~changed])


def test_rul_targets_become_one_minus_y() -> None:
    y = torch.rand(300, generator=torch.Generator().manual_seed(0)) * 0.4  # never 0.5
    out = poison_labels(get_task("rul"), y, 0.1, torch.Generator().manual_seed(0))
    changed = _changed(y, out)
    assert int(changed.sum()) == 30 and out.dtype == torch.float32
    torch.testing.assert_close(out[changed], 1 - y[changed])
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_label_kinds_follow_the_tasks() -> None:
    assert label_kind("tep_fault").kind == "classes"
    assert label_kind("tep_fault").num_classes == get_task("tep_fault").num_classes == 22
    assert label_kind(get_task("molding_quality")).kind == "binary"
    assert label_kind("rul").kind == "unit"
    with pytest.raises(ValueError, match="unknown_task"):
        label_kind("unknown_task")


def test_bad_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="integers"):
        poison_labels("tep_fault", torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 21\]"):
        poison_labels("tep_fault", torch.tensor([0, 22]), 1.0)
    with pytest.raises(ValueError, match="0 or 1"):
        poison_labels("molding_quality", torch.tensor([0, 2]), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        poison_labels("rul", torch.tensor([0.5, 1.5]), 1.0)
    with pytest.raises(ValueError, match="fraction"):
        poison_labels("rul", torch.tensor([0.5]), 1.1)


def test_label_flip_is_reproducible_per_factory() -> None:
    attack = AttackConfig.from_config(_config())
    y = torch.randint(0, 22, (500,), generator=torch.Generator().manual_seed(0))
    a = poison_labels("tep_fault", y, 0.5, attack.label_generator("factory_000"))
    b = poison_labels("tep_fault", y, 0.5, attack.label_generator("factory_000"))
    c = poison_labels("tep_fault", y, 0.5, attack.label_generator("factory_002"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_poison_dataset_keeps_inputs_and_the_original() -> None:
    x, y = torch.randn(10, 3), torch.ones(10, dtype=torch.long)
    ds = TensorDataset(x, y)
    poisoned = poison_dataset("molding_quality", ds, 1.0)
    assert poisoned.tensors[0] is x and torch.equal(poisoned.tensors[1], torch.zeros(10).long())
    assert torch.equal(ds.tensors[1], torch.ones(10).long())
    with pytest.raises(TypeError):
        poison_dataset("molding_quality", TensorDataset(x), 1.0)


# ------------------------------------------------------------------ update poisoning

GLOBAL = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5]), "n": torch.tensor(4)}
LOCAL = {"w": torch.tensor([2.0, 2.0, 1.0]), "b": torch.tensor([1.0]), "n": torch.tensor(5)}
# delta: w [1, 0, -2], b [0.5]


@pytest.mark.parametrize(
    ("attack", "factor", "w", "b"),
    [
        ("sign_flip", 1.0, [0.0, 2.0, 5.0], [0.0]),
        ("sign_flip", 2.0, [-1.0, 2.0, 7.0], [-0.5]),
        ("scale", 10.0, [11.0, 2.0, -17.0], [5.5]),
        ("scale", 1.0, [2.0, 2.0, 1.0], [1.0]),
    ],
)
def test_sign_flip_and_scale_change_the_delta_as_specified(
    attack: str, factor: float, w: list[float], b: list[float]
) -> None:
    out = poison_update(GLOBAL, LOCAL, attack, {"factor": factor})
    torch.testing.assert_close(out["w"], torch.tensor(w))
    torch.testing.assert_close(out["b"], torch.tensor(b))
    assert torch.equal(out["n"], LOCAL["n"])  # integer tensors are not weights
    assert torch.equal(LOCAL["w"], torch.tensor([2.0, 2.0, 1.0]))  # inputs untouched


def test_noise_adds_gaussian_noise_of_the_given_std_to_the_delta() -> None:
    g = {"w": torch.zeros(200_000)}
    local = {"w": torch.full((200_000,), 0.25)}
    out = poison_update(g, local, "noise", {"std": 0.5}, torch.Generator().manual_seed(0))
    added = out["w"] - local["w"]
    assert abs(float(added.mean())) < 0.005
    assert abs(float(added.std()) - 0.5) < 0.005
    same = poison_update(g, local, "noise", {"std": 0.5}, torch.Generator().manual_seed(0))
    assert torch.equal(same["w"], out["w"])
    zero = poison_update(g, local, "noise", {"std": 0.0}, torch.Generator().manual_seed(0))
    assert torch.equal(zero["w"], local["w"])


def test_nan_poisons_every_floating_tensor() -> None:
    out = poison_update(GLOBAL, LOCAL, "nan", {})
    assert torch.isnan(out["w"]).all() and torch.isnan(out["b"]).all()
    assert torch.equal(out["n"], LOCAL["n"])


@pytest.mark.parametrize("attack", ["sign_flip", "scale", "noise", "nan"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtypes_and_shapes_are_kept(attack: str, dtype: torch.dtype) -> None:
    g = {"w": torch.zeros(3, 4, dtype=dtype)}
    local = {"w": torch.ones(3, 4, dtype=dtype)}
    out = poison_update(g, local, attack, {"factor": 2.0, "std": 1.0})
    assert out["w"].dtype == dtype and out["w"].shape == (3, 4)


def test_update_poisoning_refuses_unknown_attacks_and_missing_weights() -> None:
    with pytest.raises(ValueError, match="label_flip"):
        poison_update(GLOBAL, LOCAL, "label_flip", {})
    with pytest.raises(ValueError, match="factor"):
        poison_update(GLOBAL, LOCAL, "scale", {})
    with pytest.raises(KeyError, match="'b'"):
        poison_update({"w": GLOBAL["w"]}, LOCAL, "scale", {"factor": 2.0})


# ------------------------------------------------------------------ through a factory round

class TinyTask(BaseTinyTask):
    """The tiny two-class task; its label kind comes from ``num_classes``."""

    name = "tiny_attack"
    num_classes = 2

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        outputs, target = self.predict(model, dataset)
        return self.output_metrics(outputs, target)


TASK = TinyTask()
_LEDGERS = itertools.count()


def _global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in TASK.build_model().state_dict().items()}


def _round(
    tmp_path: Path, attack: AttackConfig | None, dp: bool = False, factory_id: str = "f0"
) -> FactoryRoundResult:
    data = tmp_path / "f0.parquet"
    if not data.exists():
        make_frame(400, 0).to_parquet(data)
    cfg = LocalTrainConfig(
        local_epochs=3, batch_size=32, lr=0.5, dp=dp, reproducible_dp=True, seed=11
    )
    return run_round(
        TASK,
        cfg,
        data,
        tmp_path / f"ledger-{next(_LEDGERS)}.json",  # a fresh ledger each round
        _global_state(),
        epsilon_budget=50.0,
        planned_rounds=3,
        factory_id=factory_id,
        attack=attack,
    )


def _attack(name: str, factories: str = "f0", **params: float) -> AttackConfig:
    cfg = {"attack": name, "attack-factories": factories, "seed": 3}
    cfg.update({f"attack-{k}": v for k, v in params.items()})
    return AttackConfig.from_config(cfg)


def _accuracy(state: dict[str, torch.Tensor]) -> float:
    model = TASK.build_model()
    model.load_state_dict(state)
    return TASK.evaluate(model, TASK.to_dataset(make_frame(500, 99)))["accuracy"]


@pytest.mark.parametrize("dp", [False, True])
def test_factories_not_named_train_exactly_as_before(tmp_path: Path, dp: bool) -> None:
    honest = _round(tmp_path, None, dp)
    for attack in (
        _attack("label_flip", "f1,f2", fraction=1.0),
        _attack("scale", "f1", factor=10.0),
        _attack("nan", ""),
        AttackConfig(),
    ):
        other = _round(tmp_path, attack, dp)
        for key in honest.state_dict:
            assert torch.equal(other.state_dict[key], honest.state_dict[key]), attack.name
        assert other.metrics["malicious"] == 0.0
        assert {k: v for k, v in other.metrics.items() if k not in ("malicious", "train_time")} == {
            k: v for k, v in honest.metrics.items() if k != "train_time"
        }
    assert "malicious" not in honest.metrics  # without an attack config the metrics are as before


def test_label_flip_changes_the_trained_update(tmp_path: Path) -> None:
    honest = _round(tmp_path, None)
    before = pd.read_parquet(tmp_path / "f0.parquet")
    flipped = _round(tmp_path, _attack("label_flip", "f0", fraction=1.0))
    assert flipped.metrics["malicious"] == 1.0
    assert flipped.metrics["num-examples"] == honest.metrics["num-examples"]
    assert any(
        not torch.allclose(flipped.state_dict[k], honest.state_dict[k]) for k in honest.state_dict
    )
    # the honest model learns the rule, the poisoned one its inverse
    assert _accuracy(honest.state_dict) > 0.9
    assert _accuracy(flipped.state_dict) < 0.1
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f0.parquet"), before)


def test_label_flip_under_dp_accounts_like_an_honest_round(tmp_path: Path) -> None:
    honest = _round(tmp_path, None, dp=True)
    flipped = _round(tmp_path, _attack("label_flip", "f0", fraction=0.5), dp=True)
    assert flipped.metrics["epsilon"] == honest.metrics["epsilon"] > 0
    assert flipped.metrics["steps"] == honest.metrics["steps"]
    assert any(
        not torch.equal(flipped.state_dict[k], honest.state_dict[k]) for k in honest.state_dict
    )


@pytest.mark.parametrize("dp", [False, True])
def test_update_attacks_poison_the_trained_weights(tmp_path: Path, dp: bool) -> None:
    g = _global_state()
    honest = _round(tmp_path, None, dp).state_dict
    flipped = _round(tmp_path, _attack("sign_flip", "f0", factor=1.0), dp)
    scaled = _round(tmp_path, _attack("scale", "f0", factor=10.0), dp)
    for key in honest:
        delta = honest[key] - g[key]
        torch.testing.assert_close(flipped.state_dict[key], g[key] - delta)
        torch.testing.assert_close(scaled.state_dict[key], g[key] + 10 * delta)
    assert flipped.metrics["malicious"] == scaled.metrics["malicious"] == 1.0
    broken = _round(tmp_path, _attack("nan", "f0"), dp).state_dict
    assert all(torch.isnan(v).all() for v in broken.values())


# ------------------------------------------------------------------ through the ClientApp


@pytest.fixture
def as_node(train_as_node):
    """Build a train message from the server and answer it as node 5 (Flower's identities)."""
    return train_as_node


def test_client_app_poisons_named_factories_and_marks_every_reply(
    tmp_path: Path, as_node
) -> None:
    task = get_task("molding_quality")
    data = tmp_path / "factory_000.parquet"
    molding_frame(300, 0).to_parquet(data)
    torch.manual_seed(0)
    arrays = ArrayRecord(task.build_model().state_dict())
    train_config = {
        "task": "molding_quality", "run-id": "r", "planned-rounds": 2, "server-round": 1,
        "local-epochs": 1, "batch-size": 64, "lr": 0.05, "momentum": 0.0, "dp": False,
        "epsilon": 0.0, "delta": 1e-5, "accountant": "rdp", "max-grad-norm": 1.0,
        "grad-sample-mode": "bk", "seed": 0, "data-dir": str(tmp_path),
        "attack": "nan", "attack-factories": "bad", "attack-fraction": 1.0,
        "attack-factor": 1.0, "attack-std": 1.0,
    }  # fmt: skip

    def node(fid: str) -> dict:  # a simulated factory: data from the run's data-dir
        return {"factory-id": fid, "partition-id": 0, "ledger-path": str(tmp_path / fid)}

    bad = as_node(train_config, arrays, node("bad"))
    good = as_node(train_config, arrays, node("good"))
    assert bad.content["factory"]["status"] == good.content["factory"]["status"] == "accepted"
    assert bad.content["metrics"]["malicious"] == 1.0
    assert good.content["metrics"]["malicious"] == 0.0
    bad_state = bad.content["arrays"].to_torch_state_dict()
    good_state = good.content["arrays"].to_torch_state_dict()
    assert all(torch.isnan(v).all() for v in bad_state.values())
    assert all(torch.isfinite(v).all() for v in good_state.values())

    flipped = as_node({**train_config, "attack": "label_flip"}, arrays, node("bad"))
    assert flipped.content["metrics"]["malicious"] == 1.0
    flipped_state = flipped.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(flipped_state[k], good_state[k]) for k in good_state)

    plain = {k: v for k, v in train_config.items() if not k.startswith("attack")}
    before = as_node(plain, arrays, node("good"))  # a server that predates attacks
    assert before.content["metrics"]["malicious"] == 0.0
    for key, value in before.content["arrays"].to_torch_state_dict().items():
        assert torch.equal(value, good_state[key])

    broken = as_node({**train_config, "attack-std": "loud"}, arrays, node("good"))
    assert broken.content["factory"]["status"] == "error"
    assert "'attack-std'" in broken.content["factory"]["reason"]


def test_a_deployed_factory_refuses_to_attack(tmp_path: Path, as_node) -> None:
    """A factory with its own data-path is a real plant: no operator can make it poison."""
    task = get_task("molding_quality")
    data = tmp_path / "plant.parquet"
    molding_frame(200, 1).to_parquet(data)
    config = {
        "task": "molding_quality", "run-id": "r", "planned-rounds": 1, "server-round": 1,
        "local-epochs": 1,
        "batch-size": 64, "lr": 0.05, "momentum": 0.0, "dp": False, "epsilon": 0.0,
        "delta": 1e-5, "accountant": "rdp", "max-grad-norm": 1.0, "grad-sample-mode": "bk",
        "seed": 0, "attack": "sign_flip", "attack-factories": "plant", "attack-factor": 1.0,
    }  # fmt: skip
    node = {"factory-id": "plant", "data-path": str(data), "ledger-path": str(tmp_path / "l")}
    reply = as_node(config, ArrayRecord(task.build_model().state_dict()), node)
    assert reply.content["factory"]["status"] == "error"
    assert "refuses" in reply.content["factory"]["reason"]
    assert "arrays" not in reply.content
