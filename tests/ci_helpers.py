"""What a slow test does when a system tool it needs is missing.

CI installs every tool the slow suite needs (``.ci/run``), so there a missing tool is a broken
setup and the test fails; on a developer's machine the test skips and says how to install it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """Whether this is a CI run (``CI`` set to 1, true or yes, as ``.ci/run`` sets it)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(message: str) -> NoReturn:
    """Fail under CI, skip elsewhere, with ``message`` (what is missing and how to install it)."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
