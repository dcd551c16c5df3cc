"""The ``client_dp`` config group, validated into :class:`ClientDPOptions`.

Why so strict: a typo such as ``noise_multipler`` would otherwise silently fall back to a
default and the logged epsilon would describe a mechanism that never ran. Every error names
the key (``client_dp.<name>``), the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

MODES = ("none", "fixed", "adaptive")

_COMMON_KEYS = ("mode", "noise_multiplier", "epsilon", "delta", "num_sampled_clients")
_FIXED_KEYS = (*_COMMON_KEYS, "clipping_norm")
_ADAPTIVE_KEYS = (
    *_COMMON_KEYS,
    "initial_clipping_norm",
    "target_clipped_quantile",
    "clip_norm_lr",
    "clipped_count_stddev",
)

# The rule each number must meet, as a test and the words of the error message.
_Rule = tuple[Callable[[float], bool], str]
_POSITIVE: _Rule = (lambda v: v > 0, "> 0")
_NON_NEGATIVE: _Rule = (lambda v: v >= 0, ">= 0")
_FRACTION: _Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")


@dataclass(frozen=True)
class ClientDPOptions:
    """The validated ``client_dp`` config group (see ``conf/client_dp/*.yaml``).

    ``num_sampled_clients`` is resolved: ``null`` in the config becomes ``num_factories``.
    ``clipped_count_stddev`` is resolved as Flower does it (``num_sampled_clients / 20`` when
    ``null``), so the accountant and the wrapper use the same value.
    """

    mode: str
    num_factories: int
    noise_multiplier: float = 0.0
    epsilon: float = math.inf
    delta: float = 0.0
    num_sampled_clients: int = 0
    clipping_norm: float = 0.0
    initial_clipping_norm: float = 0.1
    target_clipped_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float = 0.0

    @property
    def sample_rate(self) -> float:
        """Fraction of the factories whose updates enter each round."""
        return self.num_sampled_clients / self.num_factories


def field_name(name: str) -> str:
    """The full config key of option ``name``, as error messages write it."""
    return f"client_dp.{name}"


def _real(
    options: Mapping[str, Any], name: str, rule: _Rule | None, default: float | None = None
) -> float:
    """A finite number from ``options[name]`` that meets ``rule`` (if given); missing means
    ``default`` (required if None)."""
    value = options.get(name, default)
    if value is None:
        raise ValueError(f"{field_name(name)} is required for mode '{options.get('mode')}'")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field_name(name)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{field_name(name)} must be finite, got {value}")
    if rule is not None and not rule[0](value):
        raise ValueError(f"{field_name(name)} must be {rule[1]}, got {value}")
    return value


def parse_client_dp(options: Mapping[str, Any], num_factories: int) -> ClientDPOptions:
    """Validate the ``client_dp`` config group; every error names the offending key.

    Raises:
        ValueError: an unknown key for the mode, a missing required key, or a value outside
            its range (the message names the key, the value and the allowed range).
    """
    if isinstance(num_factories, bool) or not isinstance(num_factories, int) or num_factories < 1:
        raise ValueError(f"num_factories must be a positive integer, got {num_factories!r}")
    mode = options.get("mode")
    if mode not in MODES:
        raise ValueError(f"{field_name('mode')} must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return ClientDPOptions(mode="none", num_factories=num_factories)
    allowed = _FIXED_KEYS if mode == "fixed" else _ADAPTIVE_KEYS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"{field_name(unknown[0])} is not an option of mode '{mode}' "
            f"(allowed: {', '.join(allowed)})"
        )

    noise = _real(options, "noise_multiplier", _NON_NEGATIVE)
    epsilon = _real(options, "epsilon", (_POSITIVE[0], "> 0 (it is the budget)"))
    delta = _real(options, "delta", None)
    if not 0 < delta < 1 / num_factories:
        raise ValueError(
            f"{field_name('delta')} must be in (0, 1/num_factories) = "
            f"(0, {1 / num_factories:.3g}) for client-level DP over {num_factories} factories; "
            f"got {delta}"
        )
    sampled = options.get("num_sampled_clients")
    if sampled is None:
        sampled = num_factories
    if (
        isinstance(sampled, bool)
        or not isinstance(sampled, int)
        or not 1 <= sampled <= num_factories
    ):
        raise ValueError(
            f"{field_name('num_sampled_clients')} must be null (all factories) or an integer "
            f"in [1, {num_factories}]; got {sampled!r}"
        )
    common = ClientDPOptions(
        mode=mode,
        num_factories=num_factories,
        noise_multiplier=noise,
        epsilon=epsilon,
        delta=delta,
        num_sampled_clients=sampled,
    )
    if mode == "fixed":
        return replace(common, clipping_norm=_real(options, "clipping_norm", _POSITIVE))

    initial = _real(options, "initial_clipping_norm", _POSITIVE, 0.1)
    quantile = _real(options, "target_clipped_quantile", _FRACTION, 0.5)
    lr = _real(options, "clip_norm_lr", _POSITIVE, 0.2)
    count_std: float | None = None
    if options.get("clipped_count_stddev") is not None:
        count_std = _real(options, "clipped_count_stddev", _NON_NEGATIVE)
    resolved = sampled / 20 if count_std is None and noise > 0 else (count_std or 0.0)
    if noise > 0 and noise >= 2 * resolved:
        raise ValueError(
            f"{field_name('clipped_count_stddev')} = {resolved:g}"
            f"{' (Flower default num_sampled_clients/20)' if count_std is None else ''} is too "
            f"small for noise_multiplier {noise:g}: it must exceed noise_multiplier / 2 = "
            f"{noise / 2:g}, since the clipped-count noise is paid out of the same budget"
        )
    return replace(
        common,
        initial_clipping_norm=initial,
        target_clipped_quantile=quantile,
        clip_norm_lr=lr,
        clipped_count_stddev=resolved,
    )
