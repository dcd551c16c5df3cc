"""The catalogue of standard models the federation trains (see :mod:`.registry`)."""

from .base import (
    Column,
    DataValidationError,
    FederatedData,
    PartitionConfig,
    Schema,
    StandardTask,
    ghost_supported,
)
from .registry import get_task, task_names

__all__ = [
    "Column",
    "DataValidationError",
    "FederatedData",
    "PartitionConfig",
    "Schema",
    "StandardTask",
    "get_task",
    "ghost_supported",
    "task_names",
]
