"""Names of the standard models and how to build them.

``get_task("tep_fault")`` is the only way the server, the clients and the experiment driver
obtain a task, so adding a standard model means adding one line to :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import StandardTask
from .cell_defect import CellDefectTask
from .molding_quality import MoldingQualityTask
from .rul import RULTask
from .tep_fault import TEPFaultTask

TASKS: dict[str, Callable[..., StandardTask]] = {
    TEPFaultTask.name: TEPFaultTask,
    MoldingQualityTask.name: MoldingQualityTask,
    RULTask.name: RULTask,
    CellDefectTask.name: CellDefectTask,
}


def task_names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(TASKS)


def get_task(name: str, **options: Any) -> StandardTask:
    """A ready instance of task ``name``; ``options`` go to its constructor (e.g. ``window``).

    Raises ``ValueError`` listing the valid names when ``name`` is unknown.
    """
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; valid names: {', '.join(task_names())}"
        ) from None
    return factory(**options)
