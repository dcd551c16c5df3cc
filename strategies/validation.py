"""Checks a factory's model update before it may reach aggregation.

Pure functions over numpy arrays, so every rule is unit-tested without a Flower runtime. A
rejected update is recorded with the reason and never aggregated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ValidationRules:
    """Bounds an update must respect.

    max_update_norm: bound on the L2 norm of (update - global model) over all arrays; None
        disables the check.
    max_num_examples: largest plausible ``num-examples`` a factory may claim; None disables it.
    reject_unchanged: refuse an update identical to the global model. No local training, with
        or without DP, returns the model it was sent bit for bit, so such a reply is a
        free-rider's (or a broken client's) and must neither dilute the average nor earn a
        contribution score.
    require_record_sketch: refuse a reply without the factory's record sketch. Copies are
        found by comparing sketches; a copier that sends none is back to the update test,
        which DP noise mostly blinds, so a federation can make the sketch a condition of
        taking part (the instruction tells the factories, and one without the key declines
        before training).
    """

    max_update_norm: float | None = None
    max_num_examples: int | None = None
    reject_unchanged: bool = True
    require_record_sketch: bool = False


#: Why a reply without a record sketch is rejected where the federation requires one.
NO_SKETCH = (
    "reply carries no record-sketch, which this federation requires "
    "(validation.require_record_sketch); the factory's node config needs 'record-sketch-key'"
)


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    num_examples: float | int | None,
    rules: ValidationRules = ValidationRules(),
) -> str | None:
    """Return why ``update`` must be rejected, or None when it may be aggregated.

    ``reference`` is the global model the factory was sent: the update must carry exactly its
    keys, shapes and dtypes, only finite values, a positive integral ``num_examples`` and, if
    configured, stay within the norm bound of the global model.
    """
    if num_examples is None:
        return "missing num-examples"
    if not np.isfinite(num_examples) or num_examples <= 0 or int(num_examples) != num_examples:
        return f"num-examples must be a positive integer, got {num_examples}"
    if rules.max_num_examples is not None and num_examples > rules.max_num_examples:
        return (
            f"num-examples {int(num_examples)} exceeds the plausible maximum "
            f"{rules.max_num_examples}"
        )
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong keys (missing {missing[:5]}, unexpected {extra[:5]})"
    squared = 0.0
    for key, ref in reference.items():
        arr = update[key]
        if arr.shape != ref.shape:
            return f"array '{key}' has shape {arr.shape}, expected {ref.shape}"
        if arr.dtype != ref.dtype:
            return f"array '{key}' has dtype {arr.dtype}, expected {ref.dtype}"
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            return f"array '{key}' holds NaN or infinite values"
        if arr.dtype.kind in "fc":
            squared += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    if rules.reject_unchanged and squared == 0.0:
        return "update is identical to the global model it was sent (no local training)"
    if rules.max_update_norm is not None:
        norm = float(np.sqrt(squared))
        if not norm <= rules.max_update_norm:
            return f"update L2 norm {norm:.4g} exceeds the bound {rules.max_update_norm:.4g}"
    return None
