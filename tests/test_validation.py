"""Update validation: pure logic, no Flower runtime."""

import numpy as np
import pytest

from strategies.validation import ValidationRules, validate_update


@pytest.fixture
def reference():
    return {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def good(ref):
    return {k: v + 0.1 for k, v in ref.items()}


def test_valid_update_passes(reference):
    assert validate_update(good(reference), reference, 10) is None


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda u: u.pop("b"), "wrong keys"),
        (lambda u: u.__setitem__("extra", np.zeros(1, np.float32)), "wrong keys"),
        (lambda u: u.__setitem__("w", np.zeros((2, 3), np.float32)), "shape"),
        (lambda u: u.__setitem__("w", np.zeros((3, 2), np.float64)), "dtype"),
        (lambda u: u["w"].__setitem__((0, 0), np.nan), "NaN"),
        (lambda u: u["b"].__setitem__(1, np.inf), "NaN or infinite"),
    ],
)
def test_malformed_updates_are_rejected(reference, mutate, expected):
    update = good(reference)
    mutate(update)
    reason = validate_update(update, reference, 10)
    assert reason is not None and expected in reason


@pytest.mark.parametrize("n", [None, 0, -3, 2.5, float("nan"), float("inf")])
def test_bad_num_examples_rejected(reference, n):
    assert "num-examples" in validate_update(good(reference), reference, n)


def test_implausible_num_examples_rejected(reference):
    rules = ValidationRules(max_num_examples=1000)
    assert "plausible" in validate_update(good(reference), reference, 5000, rules)
    assert validate_update(good(reference), reference, 999, rules) is None


def test_norm_bound(reference):
    update = good(reference)  # norm of the difference: sqrt(8 * 0.01)
    expected = float(np.sqrt(8 * 0.01))
    assert (
        validate_update(update, reference, 5, ValidationRules(max_update_norm=expected * 1.01))
        is None
    )
    reason = validate_update(update, reference, 5, ValidationRules(max_update_norm=expected * 0.99))
    assert reason is not None and "norm" in reason


def test_an_update_equal_to_the_global_model_is_a_free_rider(reference):
    unchanged = {k: v.copy() for k, v in reference.items()}
    assert "identical to the global model" in validate_update(unchanged, reference, 10)
    tiny = {k: v.copy() for k, v in reference.items()}
    tiny["b"][0] = 1e-7
    assert validate_update(tiny, reference, 10) is None
    allowed = ValidationRules(reject_unchanged=False)
    assert validate_update(unchanged, reference, 10, allowed) is None
