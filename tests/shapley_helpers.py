"""Shapley values by their definition, the yardstick the contribution estimators are tested on."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

from strategies.contribution import Coalition

Game = Callable[[Coalition], float]


def brute_force_shapley(n: int, game: Game) -> np.ndarray:
    """Average marginal contribution over all n! orderings (the definition)."""
    scores = np.zeros(n)
    for order in itertools.permutations(range(n)):
        prefix: set[int] = set()
        before = 0.0
        for player in order:
            prefix.add(player)
            after = game(frozenset(prefix))
            scores[player] += after - before
            before = after
    return scores / math.factorial(n)
