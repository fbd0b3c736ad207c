"""Tasks: what is learned from which data (see :mod:`veil.task.base`), and the registry the apps look them up in."""

from __future__ import annotations

from veil.conf.schema import TASKS
from veil.errors import ConfigError
from veil.task.base import Task

# task name (veil.conf.schema.TASKS) -> the module defining TASK (imported on first use: keeps imports light)
_REGISTRY: dict[str, str] = {name: f"veil.task.{name}" for name in TASKS}


def get_task(name: str) -> Task:
    """The task registered as ``name`` (``task.name`` in the config)."""
    import importlib

    if name not in _REGISTRY:
        raise ConfigError(f"task.name={name!r} is invalid: expected one of {', '.join(_REGISTRY)}")
    task: Task = importlib.import_module(_REGISTRY[name]).TASK
    return task
