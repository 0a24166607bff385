"""Tasks: how a run's rows become model inputs, which head the backbone gets, the loss and the metric.

A task is the :class:`Task` subclass with ``name = "x"`` in the module ``tasks/x.py``; a run names it with
``data.task=x`` (and ``model.task=x``). Adding a task is adding its file (``CONTRIBUTING.md`` lists what else it
touches), nothing here and nothing in the recipe, which only calls the :class:`Task` methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opendelta_dist.errors import DeltaConfigError
from opendelta_dist.train.plugins import module_names, named_subclass
from opendelta_dist.train.tasks.base import EvalSums, Task

#: the modules of this package that are not tasks
_NOT_TASKS = frozenset({"base", "prompting"})


def task_names() -> list[str]:
    """The names of the tasks, as ``data.task`` takes them (their modules' names)."""
    return module_names(__path__, _NOT_TASKS)


def task_class(name: str) -> type[Task]:
    """The class of the task called ``name``.

    Raises:
        DeltaConfigError: unknown task name.
    """
    if name not in task_names():
        known = ", ".join(task_names())
        raise DeltaConfigError(f"unknown task {name!r}; set data.task and model.task to one of {known}")
    return named_subclass(f"{__name__}.{name}", Task, name)


def build_task(cfg: Mapping[str, Any]) -> Task:
    """The task of a run's composed configuration (``data.task``, which ``model.task`` must equal).

    Raises:
        DeltaConfigError: unknown task, ``data.task`` and ``model.task`` differ, or the task's own options
            (e.g. the ``prompt`` group) are invalid.
    """
    from opendelta_dist.train.data import DataConfig
    from opendelta_dist.train.models import ModelConfig

    model_cfg, data_cfg = ModelConfig(**cfg["model"]), DataConfig(**cfg["data"])
    if data_cfg.task != model_cfg.task:
        raise DeltaConfigError(f"data.task={data_cfg.task!r} but model.task={model_cfg.task!r}; make them equal")
    return task_class(data_cfg.task)(data_cfg, model_cfg, cfg)


__all__ = ["EvalSums", "Task", "build_task", "task_class", "task_names"]
