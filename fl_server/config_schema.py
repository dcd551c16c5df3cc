"""The whole experiment config checked up front, in one place, before anything expensive starts.

One job (config validation): its length is the schema and one check per config group.

:func:`validate_config` is called by :func:`fl_server.config.finalize` and
:func:`fl_server.config.load_from_run_config`, so ``python -m experiments.run`` and a ServerApp
started by ``flwr run`` refuse the same bad configs, before data is generated, before Ray or
Flower start and before an MLflow run exists. A bad config raises :class:`ConfigError`, whose
message is one line naming the key, the value and what is allowed.

Checks are made in three passes:

1. **Types**: the config is merged onto the structured schema below (OmegaConf dataclasses),
   so ``task.train.lr=abc`` fails with the key's name instead of deep inside a factory.
2. **Ranges** of single values (``privacy.epsilon > 0``, ``federation.num_rounds >= 1``...).
3. **Combinations** that only fail together: robust strategies' minimum federation sizes (the
   formulas Flower's own strategies use), exact Shapley above its ``max_players``, more
   attackers than factories, ``min_factories`` above the federation size.

The schema is used for checking only: the config the caller keeps is not changed by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Allowed names. They mirror constants of the modules that consume them (named beside each;
# a test keeps them equal), copied rather than imported so that checking a config costs
# milliseconds instead of importing torch, Opacus and Flower.
_ALLOWED: dict[str, tuple[str, ...]] = {
    # standard_models.registry.TASKS
    "task.name": ("tep_fault", "molding_quality", "rul", "cell_defect"),
    # The factories' privacy ledger composes spend across runs with these accountants only.
    "privacy.accountant": ("rdp", "prv"),  # fl_client.privacy.LEDGER_ACCOUNTANTS
    "privacy.grad_sample_mode": ("bk", "ghost", "hooks", "functorch"),  # fl_client.training
    "partition.scheme": ("natural", "dirichlet", "iid"),  # standard_models.base.PartitionConfig
    # strategies.contribution.scorer.METHODS
    "contribution.method": ("none", "exact", "gtg", "loo", "kernel", "linearised", "auto"),
    # fl_server.rewards.allocation.SCHEDULES
    "rewards.schedule": ("per_round", "per_run", "end_of_run"),
    "attack.name": (
        "none",
        "label_flip",
        "sign_flip",
        "scale",
        "noise",
        "nan",
    ),  # fl_client.attacks
    "client_dp.mode": ("none", "fixed", "adaptive"),  # strategies.client_dp.MODES
    # strategies.contribution.guards.NOISE_RULES
    "contribution.guards.noise_rule": ("gradient", "placebo", "alignment"),
    "contribution.surrogate": ("two_sided", "members"),  # strategies.contribution.linearised
}


def _allowed() -> dict[str, tuple[str, ...]]:
    """The allowed names of every enumerated key."""
    return _ALLOWED


class ConfigError(ValueError):
    """A config value that cannot run; ``str()`` is one line: key, value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config {key}={_show(value)}: {allowed}")


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# --- 1. the structured schema (types) -------------------------------------------------------


@dataclass
class TrainSchema:
    local_epochs: int = 1
    batch_size: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    dp_batch_size: int | None = None
    dp_lr: float | None = None


@dataclass
class TaskSchema:
    name: str = "tep_fault"
    train: TrainSchema = field(default_factory=TrainSchema)


@dataclass
class StrategySchema:
    name: str = "fedavg"
    flower: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrivacySchema:
    enabled: bool = True
    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "bk"
    min_run_epsilon: float = 0.1


@dataclass
class FederationSchema:
    num_factories: int = 4
    num_rounds: int = 1
    min_factories: int = 1
    min_available: int | None = None
    client_cpus: float = 1.0
    round_timeout: float = 600.0


@dataclass
class PartitionSchema:
    scheme: str = "natural"
    alpha: float = 0.5
    quantity_skew: float = 0.0
    feature_shift: float = 0.0


@dataclass
class TrackingSchema:
    uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "factoryfed"
    register_model: bool = True


@dataclass
class GuardsSchema:
    noise_test: bool = True
    noise_rule: str = "gradient"
    noise_alpha: float = 0.001
    noise_placebos: int = 12
    merge_duplicates: bool = True
    duplicate_min_excess: float = 0.05
    duplicate_alpha: float = 0.001
    duplicate_min_fraction: float = 0.5
    record_sketches: bool = True
    sketch_min_similarity: float = 0.5
    disjoint_sketches_clear: bool = True


@dataclass
class ContributionSchema:
    method: str = "auto"
    guards: GuardsSchema = field(default_factory=GuardsSchema)
    max_players: int | None = None
    validation_examples: int | None = None
    within_tol: float | None = None
    between_tol: float | None = None
    convergence_tol: float | None = None
    max_permutations: int | None = None
    # kernel
    per_player: int | None = None
    max_evaluations: int | None = None
    budget: int | None = None
    # linearised
    surrogate_evaluations: int | None = None
    surrogate: str | None = None


@dataclass
class RewardsSchema:
    amount: int = 0
    currency: str = "EUR"
    schedule: str = "end_of_run"


@dataclass
class AttackSchema:
    name: str = "none"
    num_malicious: int = 0
    fraction: float | None = None
    factor: float | None = None
    std: float | None = None
    factories: list[str] | None = None


@dataclass
class ClientDPSchema:
    mode: str = "none"
    noise_multiplier: float | None = None
    clipping_norm: float | None = None
    initial_clipping_norm: float | None = None
    target_clipped_quantile: float | None = None
    clip_norm_lr: float | None = None
    clipped_count_stddev: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    num_sampled_clients: int | None = None


@dataclass
class UpdateValidationSchema:
    max_update_norm: float | None = None
    max_num_examples: int | None = None
    reject_unchanged: bool = True
    require_record_sketch: bool = False


@dataclass
class ConfigSchema:
    """The experiment config tree of ``conf/`` (types only; ranges are checked below)."""

    task: TaskSchema = field(default_factory=TaskSchema)
    strategy: StrategySchema = field(default_factory=StrategySchema)
    privacy: PrivacySchema = field(default_factory=PrivacySchema)
    federation: FederationSchema = field(default_factory=FederationSchema)
    partition: PartitionSchema = field(default_factory=PartitionSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    contribution: ContributionSchema = field(default_factory=ContributionSchema)
    rewards: RewardsSchema = field(default_factory=RewardsSchema)
    attack: AttackSchema | None = None
    client_dp: ClientDPSchema | None = None
    validation: UpdateValidationSchema = field(default_factory=UpdateValidationSchema)
    seed: int = 0
    run_name: str | None = None
    data_root: str = "data"
    data_dir: str | None = None
    output_dir: str | None = None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _schema_type(key: str) -> str:
    """What the schema expects at dotted ``key`` (for the error line)."""
    import typing

    node: Any = ConfigSchema
    for part in key.split("."):
        hints = typing.get_type_hints(node) if isinstance(node, type) else {}
        if part not in hints:
            return "a value of the documented type"
        node = hints[part]
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if args and typing.get_origin(node) is not dict:
            node = args[0]
    return _TYPE_WORDS.get(node, "a value of the documented type")


def check_types(cfg: DictConfig) -> None:
    """Merge ``cfg`` onto :class:`ConfigSchema`; a value of the wrong type raises ConfigError.

    Keys the schema does not know are let through (they are checked by whoever reads them);
    missing groups keep the schema's defaults, so older resolved configs still load.
    """
    schema = OmegaConf.structured(ConfigSchema)
    OmegaConf.set_struct(schema, False)
    try:
        OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "") or "?"
        value = getattr(exc, "value", None)
        raise ConfigError(key, value, f"must be {_schema_type(key)}") from None


# --- 2. and 3. ranges and combinations ------------------------------------------------------


def _get(cfg: DictConfig, key: str, default: Any = None) -> Any:
    return OmegaConf.select(cfg, key, default=default)


def _number(cfg: DictConfig, key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, value, "must be a number")
    return float(value)


def _positive(cfg: DictConfig, key: str, *, finite: bool = True) -> float:
    value = _number(cfg, key)
    if not value > 0 or (finite and math.isinf(value)):
        raise ConfigError(key, value, "must be a number > 0" + (" and finite" if finite else ""))
    return value


def _at_least(cfg: DictConfig, key: str, low: int, why: str = "") -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, value, f"must be an integer >= {low}{why}")
    return int(value)


def _one_of(cfg: DictConfig, key: str) -> str:
    allowed = _allowed()[key]
    value = _get(cfg, key)
    if value not in allowed:
        raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")
    return str(value)


def _in_range(cfg: DictConfig, key: str, low: float, high: float, text: str) -> float:
    value = _number(cfg, key)
    if not low <= value <= high:
        raise ConfigError(key, value, f"must be in {text}")
    return value


def _check_task(cfg: DictConfig) -> None:
    _one_of(cfg, "task.name")
    _at_least(cfg, "task.train.local_epochs", 1)
    _at_least(cfg, "task.train.batch_size", 1)
    _positive(cfg, "task.train.lr")
    _in_range(cfg, "task.train.momentum", 0.0, 1.0, "[0, 1)")
    if _number(cfg, "task.train.momentum") >= 1.0:
        raise ConfigError("task.train.momentum", _get(cfg, "task.train.momentum"), "must be < 1")
    # The DP-SGD recipe (fl_server.config.train_recipe); null: the plain settings.
    if _get(cfg, "task.train.dp_batch_size") is not None:
        _at_least(cfg, "task.train.dp_batch_size", 1, " or null (the same as batch_size)")
    if _get(cfg, "task.train.dp_lr") is not None:
        _positive(cfg, "task.train.dp_lr")


def _check_privacy(cfg: DictConfig) -> None:
    delta = _number(cfg, "privacy.delta")
    if not 0.0 < delta < 1.0:
        raise ConfigError("privacy.delta", delta, "must be in (0, 1), e.g. 1e-5")
    _one_of(cfg, "privacy.accountant")
    _one_of(cfg, "privacy.grad_sample_mode")
    _positive(cfg, "privacy.max_grad_norm")
    min_run = _number(cfg, "privacy.min_run_epsilon")
    if min_run < 0:
        raise ConfigError("privacy.min_run_epsilon", min_run, "must be >= 0")
    if bool(_get(cfg, "privacy.enabled")):
        eps = _positive(cfg, "privacy.epsilon")
        if min_run > eps:
            raise ConfigError(
                "privacy.min_run_epsilon", min_run, f"must not exceed privacy.epsilon ({eps})"
            )


def _check_federation(cfg: DictConfig) -> int:
    n = _at_least(cfg, "federation.num_factories", 1)
    _at_least(cfg, "federation.num_rounds", 1)
    _positive(cfg, "federation.client_cpus")
    _positive(cfg, "federation.round_timeout")
    for key in ("federation.min_factories", "federation.min_available"):
        value = _get(cfg, key)
        if value is None and key.endswith("min_available"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n:
            hint = ""
            if key.endswith("min_factories") and n == 1:
                hint = " (a single factory needs federation.min_factories=1)"
            raise ConfigError(
                key, value, f"must be between 1 and federation.num_factories ({n}){hint}"
            )
    return n


def _check_partition(cfg: DictConfig) -> None:
    _one_of(cfg, "partition.scheme")
    _positive(cfg, "partition.alpha")
    _in_range(cfg, "partition.quantity_skew", 0.0, math.inf, "[0, inf)")
    _in_range(cfg, "partition.feature_shift", 0.0, math.inf, "[0, inf)")


def _check_contribution(cfg: DictConfig, n: int) -> None:
    method = _one_of(cfg, "contribution.method")
    for key in ("within_tol", "between_tol", "convergence_tol"):
        if _get(cfg, f"contribution.{key}") is not None:
            _in_range(cfg, f"contribution.{key}", 0.0, math.inf, "[0, inf)")
    for key in (
        "max_permutations",
        "per_player",
        "max_evaluations",
        "budget",
        "surrogate_evaluations",
        "validation_examples",
    ):
        if _get(cfg, f"contribution.{key}") is not None:
            _at_least(cfg, f"contribution.{key}", 1)
    for key in ("noise_alpha", "duplicate_alpha"):  # strategies.contribution.guards.GuardConfig
        if _get(cfg, f"contribution.guards.{key}") is not None:
            value = _number(cfg, f"contribution.guards.{key}")
            if not 0 < value < 1:
                raise ConfigError(f"contribution.guards.{key}", value, "must be in (0, 1)")
    if _get(cfg, "contribution.surrogate") is not None:
        _one_of(cfg, "contribution.surrogate")
    if _get(cfg, "contribution.guards.noise_rule") is not None:
        _one_of(cfg, "contribution.guards.noise_rule")
    if _get(cfg, "contribution.guards.noise_placebos") is not None:
        _at_least(cfg, "contribution.guards.noise_placebos", 2)
    for key in ("duplicate_min_fraction", "sketch_min_similarity"):
        if _get(cfg, f"contribution.guards.{key}") is not None:
            _in_range(cfg, f"contribution.guards.{key}", 0.0, 1.0, "(0, 1]")
            if _number(cfg, f"contribution.guards.{key}") == 0:
                raise ConfigError(f"contribution.guards.{key}", 0, "must be in (0, 1]")
    if _get(cfg, "contribution.guards.duplicate_min_excess") is not None:
        _in_range(cfg, "contribution.guards.duplicate_min_excess", 0.0, math.inf, "[0, inf)")
    if method == "exact":
        cap = _at_least(cfg, "contribution.max_players", 1)
        if n > cap:
            raise ConfigError(
                "contribution",
                "exact",
                f"exact Shapley over federation.num_factories={n} needs 2**{n} - 1 coalition "
                f"models a round, above contribution.max_players={cap}; use contribution=gtg",
            )
    if method == "linearised":
        target = str(_get(cfg, "strategy.flower._target_") or "")
        if target.rsplit(".", 1)[-1] not in ("FedAvg", "FedProx"):
            raise ConfigError(
                "contribution",
                "linearised",
                f"the linearised estimator mixes the factories' outputs like a weighted mean, "
                f"which only FedAvg and FedProx aggregate (strategy.flower._target_={target}); "
                "use contribution=gtg or contribution=kernel",
            )


def _check_rewards(cfg: DictConfig) -> None:
    _at_least(cfg, "rewards.amount", 0, " (minor currency units)")
    _one_of(cfg, "rewards.schedule")
    currency = _get(cfg, "rewards.currency")
    if not isinstance(currency, str) or not currency.strip():
        raise ConfigError("rewards.currency", currency, "must be a currency code such as EUR")


def _check_attack(cfg: DictConfig, n: int) -> int:
    if _get(cfg, "attack") is None:
        return 0
    name = _one_of(cfg, "attack.name")
    if name == "none":
        return 0
    explicit = _get(cfg, "attack.factories")
    k = len(explicit) if explicit else _at_least(cfg, "attack.num_malicious", 0)
    if k > n:
        raise ConfigError(
            "attack.num_malicious", k, f"must be between 0 and federation.num_factories ({n})"
        )
    if _get(cfg, "attack.fraction") is not None:
        _in_range(cfg, "attack.fraction", 0.0, 1.0, "[0, 1]")
    if _get(cfg, "attack.factor") is not None:
        factor = _number(cfg, "attack.factor")
        if not math.isfinite(factor) or (name == "sign_flip" and factor < 0):
            raise ConfigError("attack.factor", factor, "must be finite (and >= 0 for sign_flip)")
    if _get(cfg, "attack.std") is not None:
        _in_range(cfg, "attack.std", 0.0, math.inf, "[0, inf)")
    return k


def _check_strategy(cfg: DictConfig, n: int) -> None:
    """Flower's robust rules, refused where Flower would skip or silently change them."""
    name = str(_get(cfg, "strategy.name"))
    flower = _get(cfg, "strategy.flower")
    if not isinstance(flower, Mapping) or not flower.get("_target_"):
        raise ConfigError("strategy.flower._target_", None, "must name a Flower strategy class")
    f_key = "strategy.flower.num_malicious_nodes"
    if name in ("krum", "multikrum", "bulyan"):
        f = _at_least(cfg, f_key, 0)
        if name == "bulyan" and n < 4 * f + 3:
            # Flower's Bulyan skips aggregation below 4f + 3 replies: nothing would train.
            raise ConfigError(
                "federation.num_factories",
                n,
                f"strategy=bulyan with {f_key}={f} needs at least 4 * {f} + 3 = {4 * f + 3} "
                "factories (Flower skips aggregation below that); add factories or lower "
                "num_malicious_nodes",
            )
        if name in ("krum", "multikrum") and n < f + 3:
            # Krum scores each reply by its n - f - 2 nearest neighbours; Flower clamps a
            # count below 1 to 1, i.e. the rule would no longer be the one configured.
            raise ConfigError(
                "federation.num_factories",
                n,
                f"strategy={name} with {f_key}={f} needs at least {f} + 3 = {f + 3} factories "
                "(each reply is scored by its n - f - 2 nearest neighbours)",
            )
    if name == "multikrum":
        m = _at_least(cfg, "strategy.flower.num_nodes_to_select", 1)
        if m > n:
            raise ConfigError(
                "strategy.flower.num_nodes_to_select",
                m,
                f"must be between 1 and federation.num_factories ({n})",
            )
    if name == "fedtrimmedavg":
        beta = _number(cfg, "strategy.flower.beta")
        if not 0.0 <= beta < 0.5:
            raise ConfigError("strategy.flower.beta", beta, "must be in [0, 0.5)")
    for key in ("fraction_train", "fraction_evaluate"):
        if key in flower:
            _in_range(cfg, f"strategy.flower.{key}", 0.0, 1.0, "[0, 1]")
    if "min_train_nodes" in flower:
        value = _get(cfg, "strategy.flower.min_train_nodes")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
            raise ConfigError(
                "strategy.flower.min_train_nodes",
                value,
                f"must be between 0 and federation.num_factories ({n})",
            )


def _check_client_dp(cfg: DictConfig, n: int) -> None:
    options = _get(cfg, "client_dp")
    if options is None or _get(cfg, "client_dp.mode") == "none":
        return
    _one_of(cfg, "client_dp.mode")
    from strategies.client_dp import parse_client_dp

    try:
        parse_client_dp(OmegaConf.to_container(options, resolve=True), n)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError("client_dp", _get(cfg, "client_dp.mode"), str(exc)) from None


def _check_update_validation(cfg: DictConfig) -> None:
    if _get(cfg, "validation.max_update_norm") is not None:
        _positive(cfg, "validation.max_update_norm")
    if _get(cfg, "validation.max_num_examples") is not None:
        _at_least(cfg, "validation.max_num_examples", 1)


def validate_config(cfg: DictConfig) -> None:
    """Refuse a config that cannot run, with one line naming the key, value and what is allowed.

    ``cfg`` is a composed (and, for interpolated values, resolvable) experiment config.

    Raises:
        ConfigError: the first problem found: a wrong type, a value out of range, or a
            combination that Flower or the federation cannot run.
    """
    try:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", "") or "?")
        raise ConfigError(
            key, getattr(exc, "value", None), f"cannot be resolved: {exc.msg}"
        ) from None
    check_types(cfg)
    _check_task(cfg)
    _check_privacy(cfg)
    n = _check_federation(cfg)
    _check_partition(cfg)
    _check_contribution(cfg, n)
    _check_rewards(cfg)
    _check_attack(cfg, n)
    _check_strategy(cfg, n)
    _check_client_dp(cfg, n)
    _check_update_validation(cfg)
    if _get(cfg, "seed") is not None:
        _at_least(cfg, "seed", 0)
