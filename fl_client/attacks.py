"""Simulated poisoning attacks by malicious factories, for robustness benches.

**Simulation-only research feature.** The operator's benches pick an attack from the Hydra
group ``conf/attack/`` and the server names the malicious factories in each round's train
config; those factories then poison their training labels or their reply so that robust
aggregators (``conf/strategy/``) and update validation can be evaluated against known
attackers. An honest deployment sends ``attack = "none"`` (or no attack keys at all) and every
factory behaves exactly as without this module. The poisoning never touches a factory's data
file, and it happens after DP-SGD (model poisoning) or on the labels the DP-SGD run trains on
(data poisoning), so the privacy accounting of the round is unchanged.

Train-config keys (set by the server, parsed by :meth:`AttackConfig.from_config`):

* ``attack`` (str): ``none``, ``label_flip``, ``sign_flip``, ``scale``, ``noise`` or ``nan``;
  a config without it means no attack (servers that predate attacks);
* ``attack-factories`` (str): comma-separated factory ids that are malicious (``""``: none);
* ``attack-fraction`` (float in [0, 1]): ``label_flip``, share of training labels flipped;
* ``attack-factor`` (float): ``sign_flip`` replies ``global - factor * delta`` (factor >= 0),
  ``scale`` replies ``global + factor * delta``;
* ``attack-std`` (float >= 0): ``noise`` replies ``global + delta + N(0, std^2)`` per weight.

``delta`` is the factory's honest update, trained weights minus the global weights it received.
``nan`` replies NaN in every floating-point weight. Each key an attack uses is required when
that attack is on; any of them that is present is checked whatever the attack.

The attack randomness is reproducible from the run seed and the factory id (labels flipped
stay the same from round to round, as a poisoned dataset would); it is not privacy noise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from standard_models.base import StandardTask
from standard_models.molding_quality import MoldingQualityTask
from standard_models.rul import RULTask
from standard_models.tep_fault import TEPFaultTask

NONE = "none"
LABEL_FLIP = "label_flip"
SIGN_FLIP = "sign_flip"
SCALE = "scale"
NOISE = "noise"
NAN = "nan"
#: Attacks that poison the training data before local training.
DATA_ATTACKS = frozenset({LABEL_FLIP})
#: Attacks that poison the trained weights before the reply.
UPDATE_ATTACKS = frozenset({SIGN_FLIP, SCALE, NOISE, NAN})
ATTACKS = (NONE, LABEL_FLIP, SIGN_FLIP, SCALE, NOISE, NAN)

#: The train-config key of the parameter each attack needs.
_PARAMS: dict[str, str | None] = {
    NONE: None,
    LABEL_FLIP: "attack-fraction",
    SIGN_FLIP: "attack-factor",
    SCALE: "attack-factor",
    NOISE: "attack-std",
    NAN: None,
}


class AttackConfigError(ValueError):
    """The train config's attack keys are missing or malformed; the message names the key."""


def _number(config: Mapping[str, Any], key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AttackConfigError(
            f"train config {key!r} must be a number, got {type(value).__name__} {value!r}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise AttackConfigError(f"train config {key!r} must be finite, got {value}")
    return value


def _seed_of(*parts: object) -> int:
    """A stable 32-bit seed from ``parts`` (``hash`` of a str varies between processes)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


@dataclass(frozen=True)
class AttackConfig:
    """The attack the server asked for this round, and which factories carry it out.

    ``factories`` are the malicious factory ids; ``fraction``, ``factor`` and ``std`` are the
    attack parameters (see the module docstring); ``seed`` is the run seed the attack
    randomness derives from.
    """

    name: str = NONE
    factories: frozenset[str] = field(default_factory=frozenset)
    fraction: float = 1.0
    factor: float = 1.0
    std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in ATTACKS:
            raise AttackConfigError(
                f"train config 'attack' must be one of {', '.join(ATTACKS)}, got {self.name!r}"
            )
        if not 0.0 <= self.fraction <= 1.0:
            raise AttackConfigError(
                f"train config 'attack-fraction' must be in [0, 1], got {self.fraction}"
            )
        if not math.isfinite(self.factor):
            raise AttackConfigError(
                f"train config 'attack-factor' must be finite, got {self.factor}"
            )
        if self.name == SIGN_FLIP and self.factor < 0:
            raise AttackConfigError(
                f"train config 'attack-factor' must be >= 0 for sign_flip, got {self.factor}"
            )
        if not self.std >= 0:
            raise AttackConfigError(f"train config 'attack-std' must be >= 0, got {self.std}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AttackConfig:
        """Parse the attack keys of a train config (a ``ConfigRecord`` or any mapping).

        No ``attack`` key means no attack. Otherwise ``attack`` must name a known attack and,
        unless it is ``none``, ``attack-factories`` and the attack's own parameter are required.

        Raises:
            AttackConfigError: a key is missing, of the wrong type or out of range; the
                message names the key.
        """
        if "attack" not in config:
            return cls()
        name = config["attack"]
        if not isinstance(name, str):
            raise AttackConfigError(
                f"train config 'attack' must be a string, got {type(name).__name__} {name!r}"
            )
        name = name.strip()
        if name not in ATTACKS:
            raise AttackConfigError(
                f"train config 'attack' must be one of {', '.join(ATTACKS)}, got {name!r}"
            )
        needed = {"attack-factories"} if name != NONE else set()
        param = _PARAMS[name]
        if param is not None:
            needed.add(param)
        missing = sorted(k for k in needed if k not in config)
        if missing:
            raise AttackConfigError(
                f"train config lacks {', '.join(repr(k) for k in missing)}, "
                f"needed by attack {name!r}"
            )
        factories: frozenset[str] = frozenset()
        if "attack-factories" in config:
            raw = config["attack-factories"]
            if not isinstance(raw, str):
                raise AttackConfigError(
                    "train config 'attack-factories' must be a comma-separated string, "
                    f"got {type(raw).__name__} {raw!r}"
                )
            factories = frozenset(f.strip() for f in raw.split(",") if f.strip())
        values: dict[str, float] = {}
        for key, attr in (
            ("attack-fraction", "fraction"),
            ("attack-factor", "factor"),
            ("attack-std", "std"),
        ):
            if key in config:
                values[attr] = _number(config, key)
        seed = config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int | float):
            raise AttackConfigError(f"train config 'seed' must be an integer, got {seed!r}")
        return cls(name=name, factories=factories, seed=int(seed), **values)

    @property
    def active(self) -> bool:
        """Whether any factory is asked to attack this round."""
        return self.name != NONE and bool(self.factories)

    def is_malicious(self, factory_id: str) -> bool:
        """Whether ``factory_id`` carries out the attack (never, when the attack is ``none``)."""
        return self.name != NONE and str(factory_id) in self.factories

    def params(self) -> dict[str, float]:
        """The numeric parameters, as :func:`poison_update` takes them."""
        return {"fraction": self.fraction, "factor": self.factor, "std": self.std}

    def label_generator(self, factory_id: str) -> torch.Generator:
        """Randomness of the label flip: fixed per run and factory, so rounds agree."""
        return torch.Generator().manual_seed(_seed_of(self.seed, factory_id, "labels"))

    def update_generator(self, factory_id: str, server_round: int) -> torch.Generator:
        """Randomness of the update noise: fresh each round, reproducible per run."""
        return torch.Generator().manual_seed(
            _seed_of(self.seed, factory_id, server_round, "update")
        )


# ---------------------------------------------------------------- data poisoning


@dataclass(frozen=True)
class LabelKind:
    """How a task's targets are flipped.

    ``kind`` is ``"classes"`` (integer labels ``0..num_classes-1``: a flipped label moves to
    another class drawn uniformly), ``"binary"`` (0/1 labels, int or float: ``1 - y``) or
    ``"unit"`` (regression targets scaled to [0, 1]: ``1 - y``, so long-lived machines look
    about to fail and the reverse).
    """

    kind: str
    num_classes: int = 0


#: Label kinds of the registered standard models (see each task's dataset and loss).
LABEL_KINDS: dict[str, LabelKind] = {
    TEPFaultTask.name: LabelKind("classes", TEPFaultTask.num_classes),
    MoldingQualityTask.name: LabelKind("binary"),
    RULTask.name: LabelKind("unit"),
}


def label_kind(task: str | StandardTask) -> LabelKind:
    """The label kind of a task given by name or object.

    A task outside :data:`LABEL_KINDS` with an integer ``num_classes`` attribute is treated
    as classification; anything else is refused, since flipping needs to know the targets.
    """
    name = task if isinstance(task, str) else task.name
    if name in LABEL_KINDS:
        return LABEL_KINDS[name]
    num_classes = getattr(task, "num_classes", None)
    if isinstance(num_classes, int) and num_classes >= 2:
        return LabelKind("classes", num_classes)
    raise ValueError(f"label_flip does not know how to flip the targets of task {name!r}")


def poison_labels(
    task: str | StandardTask,
    y: torch.Tensor,
    fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A copy of targets ``y`` with ``round(fraction * len(y))`` of them flipped.

    The flipped samples are drawn uniformly without replacement; see :class:`LabelKind` for
    what flipping means per task. A flipped class label never stays the same class. The dtype,
    shape and device of ``y`` are kept; ``y`` itself is not modified.

    Raises:
        ValueError: ``fraction`` outside [0, 1], or targets that do not fit the task's kind.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    kind = label_kind(task)
    out = y.clone()
    n = len(y)
    count = min(n, math.floor(fraction * n + 0.5))
    if count == 0:
        return out
    chosen = torch.randperm(n, generator=generator)[:count].to(y.device)
    if kind.kind == "classes":
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
        if bool((y < 0).any()) or bool((y >= kind.num_classes).any()):
            raise ValueError(f"class labels must lie in [0, {kind.num_classes - 1}]")
        # An offset in 1..C-1 moves a label to each other class with probability 1/(C-1).
        shift = torch.randint(1, kind.num_classes, (count,), generator=generator)
        out[chosen] = (y[chosen] + shift.to(device=y.device, dtype=y.dtype)) % kind.num_classes
    elif kind.kind == "binary":
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("binary labels must be 0 or 1")
        out[chosen] = 1 - y[chosen]
    else:
        if not y.dtype.is_floating_point:
            raise ValueError(f"regression targets must be floating point, got dtype {y.dtype}")
        if bool((y < 0).any()) or bool((y > 1).any()):
            raise ValueError("regression targets must be scaled to [0, 1]")
        out[chosen] = 1 - y[chosen]
    return out


def poison_dataset(
    task: str | StandardTask,
    dataset: Dataset,
    fraction: float,
    generator: torch.Generator | None = None,
) -> TensorDataset:
    """A new ``(x, y)`` dataset whose targets went through :func:`poison_labels`.

    Only in-memory ``TensorDataset`` s of two tensors (what every standard task builds) are
    supported; the inputs are shared, not copied, and the original dataset is unchanged.
    """
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) != 2:
        raise TypeError("label_flip needs a TensorDataset of (inputs, targets)")
    x, y = dataset.tensors
    return TensorDataset(x, poison_labels(task, y, fraction, generator))


# ---------------------------------------------------------------- model poisoning


def poison_update(
    global_state: Mapping[str, torch.Tensor],
    local_state: Mapping[str, torch.Tensor],
    attack: str,
    params: Mapping[str, float],
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The weights a malicious factory replies instead of its honestly trained ``local_state``.

    With ``delta = local - global`` per floating-point tensor:

    * ``sign_flip``: ``global - params["factor"] * delta``;
    * ``scale``: ``global + params["factor"] * delta``;
    * ``noise``: ``global + delta + N(0, params["std"]^2)`` independently per element;
    * ``nan``: NaN everywhere.

    Arithmetic runs in float64 and each result is cast back, so dtypes, shapes and devices
    match ``local_state``; integer tensors (counters, if a model has any) are copied as they
    are. Inputs are not modified.

    Raises:
        ValueError: ``attack`` is not a model-poisoning attack, or a parameter is missing.
        KeyError: ``global_state`` lacks a floating-point tensor of ``local_state``.
    """
    if attack not in UPDATE_ATTACKS:
        raise ValueError(
            f"{attack!r} is not a model-poisoning attack; expected one of "
            f"{', '.join(sorted(UPDATE_ATTACKS))}"
        )
    needed = {SIGN_FLIP: "factor", SCALE: "factor", NOISE: "std"}.get(attack)
    if needed is not None and needed not in params:
        raise ValueError(f"attack {attack!r} needs parameter {needed!r}")
    out: dict[str, torch.Tensor] = {}
    for key, local in local_state.items():
        if not local.dtype.is_floating_point:
            out[key] = local.detach().clone()
            continue
        if attack == NAN:
            out[key] = torch.full_like(local, float("nan"))
            continue
        if key not in global_state:
            raise KeyError(f"global_state lacks {key!r}")
        anchor = global_state[key].detach().to(device=local.device, dtype=torch.float64)
        delta = local.detach().to(torch.float64) - anchor
        if attack == SIGN_FLIP:
            poisoned = anchor - float(params["factor"]) * delta
        elif attack == SCALE:
            poisoned = anchor + float(params["factor"]) * delta
        else:
            noise = torch.randn(local.shape, generator=generator, dtype=torch.float64)
            poisoned = anchor + delta + float(params["std"]) * noise.to(local.device)
        out[key] = poisoned.to(local.dtype)
    return out
