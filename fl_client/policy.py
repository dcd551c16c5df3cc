"""A factory's own privacy policy, and the rule that the server may only make it stricter.

A deployed factory (one whose node config names its ``data-path``) owns its privacy: its
budget, the accountant that counts it, how little noise and how large a clipping bound it
accepts, and the unit its epsilon protects. All of it lives in the factory's node config
(TOML values, e.g. ``--node-config 'data-path="/data/f.parquet" epsilon-budget=3.0'``):

=======================  ==================================================================
node-config key          meaning
=======================  ==================================================================
``epsilon-budget``       lifetime epsilon of the factory's ledger (default 8.0 when deployed)
``delta``                delta of every epsilon the ledger reports (default 1e-5)
``accountant``           ``rdp`` or ``prv`` (default ``rdp``); the server's is ignored
``min-noise-multiplier`` optional floor on the run's planned noise multiplier
``max-round-epsilon``    optional ceiling on the epsilon of one round on its own
``min-grad-norm``        smallest clipping bound accepted (default: none)
``max-grad-norm``        largest clipping bound accepted (default: none)
``privacy-unit``         the unit epsilon protects, when coarser than the task's declared one
=======================  ==================================================================

The server's :class:`~fl_common.protocol.TrainInstruction` may only make privacy stronger.
For a deployed factory :func:`refusal` names the first field of an instruction that would
weaken the policy (``dp`` off, a clipping bound outside the range, an ``epsilon`` above the
budget, a ``delta`` other than the ledger's) and :func:`plan_refusal` checks the noise the
instruction's rounds, epochs and batch size would plan against the floor and the ceiling. The
factory declines such an instruction before it reads any data or touches its ledger. What
passes is trained with :func:`effective_settings`: the stricter of policy and instruction.

The choices, and why:

* ``epsilon``: a lower epsilon from the server is taken for the run (the ledger enforces it as
  the session's budget); a higher one is declined rather than silently lowered, so the operator
  learns that its run cannot spend what it planned.
* ``delta``: the ledger keeps every run's spend at one delta, so that its cumulative epsilon
  means one thing; a higher delta would weaken it and a lower delta cannot be honoured without
  restating the spend of earlier runs. Both are declined with the ledger's delta in the reason.
* ``max-grad-norm``: the noise is scaled to the clipping bound, so the bound does not change
  epsilon; a firm that wants to limit it anyway (how much one record can move the model before
  noise) sets a range, and no range means any bound is accepted.
* ``accountant``: the factory's own is used and the server's is ignored, not declined: the
  accountant decides how spend is counted on the factory's disk, not how much is spent.

A simulated factory (no ``data-path``) keeps taking the server's privacy settings, so research
baselines can run without DP (``privacy=none``); its node config ``epsilon-budget``/``delta``
still replace the federation's budget, as before. Every key is validated in both modes.

Pure logic: no Flower, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fl_common.protocol import TrainInstruction

#: Prefix of every refusal reason (the server records it as the reason of a ``declined`` reply).
POLICY_PREFIX = "privacy policy: "
#: What a deployed factory assumes when its node config is silent (``conf/privacy/dp.yaml``).
DEFAULT_EPSILON_BUDGET = 8.0
DEFAULT_DELTA = 1e-5
DEFAULT_ACCOUNTANT = "rdp"
#: Accountants a factory's ledger can keep (``fl_client.privacy.LEDGER_ACCOUNTANTS``).
POLICY_ACCOUNTANTS = ("rdp", "prv")

#: Node-config keys of the policy.
POLICY_KEYS = (
    "epsilon-budget",
    "delta",
    "accountant",
    "min-noise-multiplier",
    "max-round-epsilon",
    "min-grad-norm",
    "max-grad-norm",
    "privacy-unit",
)


class PolicyError(ValueError):
    """A node-config value of the privacy policy is invalid; the message names the key."""


class PolicyDeclined(RuntimeError):
    """An instruction would weaken the factory's privacy policy; nothing was read or spent.

    ``field`` is the instruction's record key at fault; ``str(exc)`` is the reply's reason and
    starts with :data:`POLICY_PREFIX`.
    """

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason)
        self.field = field


def _number(node_config: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    """The node-config value of ``key`` as a float in ``(low, high)``, or None when absent."""
    if key not in node_config:
        return None
    value = node_config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(
            f"node config '{key}' must be a number, got {type(value).__name__} {value!r}"
        )
    value = float(value)
    if not (low < value < high) or not math.isfinite(value):
        upper = "" if math.isinf(high) else f" and below {high:g}"
        raise PolicyError(f"node config '{key}' must be above {low:g}{upper}, got {value!r}")
    return value


@dataclass(frozen=True)
class PrivacyPolicy:
    """What a factory's node config says about its privacy (see the module docstring).

    ``deployed``: the node config names a ``data-path``; only then is the policy enforced and
    DP required. ``None`` means the node config is silent and (in simulation) the server's
    value is used. A deployed policy always has a budget, a delta and an accountant (the
    defaults above when the node config is silent).
    """

    deployed: bool
    epsilon_budget: float | None = None
    delta: float | None = None
    accountant: str | None = None
    min_noise_multiplier: float | None = None
    max_round_epsilon: float | None = None
    min_grad_norm: float | None = None
    max_grad_norm: float | None = None
    privacy_unit: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> PrivacyPolicy:
        """Parse and validate the policy keys of a node config.

        Raises:
            PolicyError: a key holds a value of the wrong type or out of range; the message
                names the node-config key, the value and what is allowed.
        """
        deployed = "data-path" in node_config
        budget = _number(node_config, "epsilon-budget", 0.0, math.inf)
        delta = _number(node_config, "delta", 0.0, 1.0)
        accountant = node_config.get("accountant")
        if accountant is not None and accountant not in POLICY_ACCOUNTANTS:
            raise PolicyError(
                f"node config 'accountant' must be one of {', '.join(POLICY_ACCOUNTANTS)}, "
                f"got {accountant!r}"
            )
        floor = _number(node_config, "min-noise-multiplier", 0.0, math.inf)
        ceiling = _number(node_config, "max-round-epsilon", 0.0, math.inf)
        low = _number(node_config, "min-grad-norm", 0.0, math.inf)
        high = _number(node_config, "max-grad-norm", 0.0, math.inf)
        if low is not None and high is not None and low > high:
            raise PolicyError(
                f"node config 'min-grad-norm' ({low:g}) must not exceed 'max-grad-norm' "
                f"({high:g})"
            )
        unit = node_config.get("privacy-unit")
        if unit is not None and (not isinstance(unit, str) or not unit.strip()):
            raise PolicyError(
                f"node config 'privacy-unit' must be a non-empty string naming a unit of the "
                f"task, got {unit!r}"
            )
        if deployed:
            budget = DEFAULT_EPSILON_BUDGET if budget is None else budget
            delta = DEFAULT_DELTA if delta is None else delta
            accountant = accountant or DEFAULT_ACCOUNTANT
        return cls(
            deployed=deployed,
            epsilon_budget=budget,
            delta=delta,
            accountant=accountant,
            min_noise_multiplier=floor,
            max_round_epsilon=ceiling,
            min_grad_norm=low,
            max_grad_norm=high,
            privacy_unit=unit.strip() if unit else None,
        )

    @property
    def limits_noise(self) -> bool:
        """Whether the policy bounds the planned noise (a floor or a per-round ceiling)."""
        return self.deployed and (
            self.min_noise_multiplier is not None or self.max_round_epsilon is not None
        )


@dataclass(frozen=True)
class EffectiveSettings:
    """The privacy settings a round runs with: the stricter of policy and instruction.

    ``epsilon_budget`` is the ledger's lifetime budget (the factory's); ``epsilon_cap`` the
    cumulative epsilon this session may reach (lower when the server asked for less).
    """

    dp: bool
    epsilon_budget: float
    epsilon_cap: float
    delta: float
    accountant: str
    max_grad_norm: float
    privacy_unit: str | None


def _reason(key: str, text: str) -> PolicyDeclined:
    return PolicyDeclined(f"{POLICY_PREFIX}'{key}' {text}", key)


def refusal(policy: PrivacyPolicy, instruction: TrainInstruction) -> PolicyDeclined | None:
    """Why a deployed factory declines ``instruction`` under ``policy``, or None.

    Checks the fields the server could use to weaken the policy, in record order: ``dp``,
    ``epsilon``, ``delta``, ``max-grad-norm``. A simulated factory never declines here.
    Noise floor and per-round ceiling need the planned noise: see :func:`plan_refusal`.
    """
    if not policy.deployed:
        return None
    assert policy.epsilon_budget is not None and policy.delta is not None
    if not instruction.dp:
        return _reason("dp", "is off; this factory trains only with DP-SGD")
    if not instruction.epsilon <= policy.epsilon_budget:
        return _reason(
            "epsilon",
            f"= {instruction.epsilon:g} is above this factory's budget "
            f"{policy.epsilon_budget:g} (node config 'epsilon-budget'); ask for at most that",
        )
    if instruction.delta != policy.delta:
        how = "above" if instruction.delta > policy.delta else "other than"
        return _reason(
            "delta",
            f"= {instruction.delta:g} is {how} the delta {policy.delta:g} this factory's "
            "ledger is kept at (node config 'delta'); ask for exactly that",
        )
    low, high = policy.min_grad_norm, policy.max_grad_norm
    norm = instruction.max_grad_norm
    if (low is not None and norm < low) or (high is not None and norm > high):
        allowed = f"[{low or 0:g}, {high:g}]" if high is not None else f">= {low:g}"
        return _reason(
            "max-grad-norm",
            f"= {norm:g} is outside the clipping bounds this factory accepts {allowed} "
            "(node config 'min-grad-norm'/'max-grad-norm')",
        )
    return None


def plan_refusal(
    policy: PrivacyPolicy, noise_multiplier: float, round_epsilon: float
) -> PolicyDeclined | None:
    """Why the planned noise breaks the policy's floor or per-round ceiling, or None.

    ``noise_multiplier`` is what the ledger would plan for the run (or has planned) and
    ``round_epsilon`` the epsilon of one round of it on its own. The instruction fields that
    set them are ``planned-rounds``, ``local-epochs`` and ``batch-size``: the reason names them.
    """
    if not policy.deployed:
        return None
    floor, ceiling = policy.min_noise_multiplier, policy.max_round_epsilon
    fields = "'planned-rounds', 'local-epochs' and 'batch-size'"
    if floor is not None and noise_multiplier < floor:
        return PolicyDeclined(
            f"{POLICY_PREFIX}{fields} plan noise multiplier {noise_multiplier:.4g}, below this "
            f"factory's floor {floor:g} (node config 'min-noise-multiplier'); plan fewer "
            "rounds or epochs, or a smaller batch",
            "planned-rounds",
        )
    if ceiling is not None and round_epsilon > ceiling:
        return PolicyDeclined(
            f"{POLICY_PREFIX}{fields} plan a round epsilon of {round_epsilon:.4g}, above this "
            f"factory's ceiling {ceiling:g} (node config 'max-round-epsilon'); plan more "
            "rounds, fewer epochs per round, or a smaller batch",
            "planned-rounds",
        )
    return None


def effective_settings(
    policy: PrivacyPolicy, instruction: TrainInstruction
) -> EffectiveSettings:
    """The stricter of ``policy`` and ``instruction``, for an instruction :func:`refusal` passed.

    Deployed: DP on, the factory's budget, delta and accountant (the server's accountant is
    ignored), the smaller epsilon as the session's cap, the instruction's clipping bound (in
    range). Simulated: the server's settings, with the node config's budget and delta when set.
    """
    if policy.deployed:
        assert policy.epsilon_budget is not None and policy.delta is not None
        assert policy.accountant is not None
        return EffectiveSettings(
            dp=True,
            epsilon_budget=policy.epsilon_budget,
            epsilon_cap=min(policy.epsilon_budget, instruction.epsilon),
            delta=policy.delta,
            accountant=policy.accountant,
            max_grad_norm=instruction.max_grad_norm,
            privacy_unit=policy.privacy_unit,
        )
    budget = instruction.epsilon if policy.epsilon_budget is None else policy.epsilon_budget
    return EffectiveSettings(
        dp=instruction.dp,
        epsilon_budget=budget,
        epsilon_cap=budget,
        delta=instruction.delta if policy.delta is None else policy.delta,
        accountant=instruction.accountant,
        max_grad_norm=instruction.max_grad_norm,
        privacy_unit=policy.privacy_unit,
    )
