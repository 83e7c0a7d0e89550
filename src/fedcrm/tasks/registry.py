"""The task registry: every task the core can run, by name (``task`` in experiments and runs)."""

from typing import Any, Final

from fedcrm.exceptions import ConfigError
from fedcrm.tasks.base import Task
from fedcrm.tasks.churn.task import ChurnTask
from fedcrm.tasks.recommendation.task import RecommendationTask

TASKS: Final[dict[str, Task[Any, Any]]] = {
    task.name: task for task in (ChurnTask(), RecommendationTask())
}
"""Registered tasks; a new task is one folder under ``fedcrm/tasks/`` and one entry here."""

DEFAULT_TASK: Final = "churn"
"""The task of an experiment or run config that names none."""


def get_task(name: str) -> Task[Any, Any]:
    """The registered task called ``name``.

    Raises:
        ConfigError: No task has that name.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}") from None
