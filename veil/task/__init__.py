"""Tasks: what is learned from which data (see :mod:`veil.task.base`), and the registry the apps look them up in."""

from __future__ import annotations

from veil.errors import ConfigError
from veil.task.base import Task

_REGISTRY: dict[str, str] = {  # task name -> module defining TASK (imported on first use: keeps imports light)
    "classification": "veil.task.classification",
    "causal_lm": "veil.task.causal_lm",
}


def task_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """The task registered as ``name`` (``task.name`` in the config)."""
    import importlib

    if name not in _REGISTRY:
        raise ConfigError(f"task.name={name!r} is invalid: expected one of {', '.join(_REGISTRY)}")
    task: Task = importlib.import_module(_REGISTRY[name]).TASK
    return task
