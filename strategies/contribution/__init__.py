"""Per-round contribution estimates of factory updates (Shapley value, GTG-Shapley, LOO).

Flower-free: the caller supplies a batch utility function over coalitions of update indices.
"""

from strategies.contribution.estimators import (
    DEFAULT_BATCH_SIZE,
    METHODS,
    BatchUtility,
    Coalition,
    ContributionResult,
    UtilityCache,
    default_gtg_max_permutations,
    estimate,
    exact_shapley,
    gtg_shapley,
    leave_one_out,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "METHODS",
    "BatchUtility",
    "Coalition",
    "ContributionResult",
    "UtilityCache",
    "default_gtg_max_permutations",
    "estimate",
    "exact_shapley",
    "gtg_shapley",
    "leave_one_out",
]
