"""fedcrm.tasks: the task plug-ins of the federation core (churn, recommendation).

A task brings its settings, model, branch data, local training (plain and DP-SGD), evaluation
and metric pooling, model selection, and its side of a simulated experiment (data, centralised
baselines, report); `fedcrm.server`, `fedcrm.client` and `fedcrm.simulation` do the rest the
same way for every task.
"""

from fedcrm.tasks.base import (
    Arrays,
    BranchSource,
    CustomerData,
    DPStatement,
    FinishedRun,
    LocalUpdate,
    MetricValue,
    PrivateRows,
    PrivateUpdate,
    RoundContext,
    SimulatedBranch,
    SimulatedFederation,
    Task,
    TaskExperiment,
    TaskOutcome,
)
from fedcrm.tasks.registry import DEFAULT_TASK, TASKS, get_task

__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "Arrays",
    "BranchSource",
    "CustomerData",
    "DPStatement",
    "FinishedRun",
    "LocalUpdate",
    "MetricValue",
    "PrivateRows",
    "PrivateUpdate",
    "RoundContext",
    "SimulatedBranch",
    "SimulatedFederation",
    "Task",
    "TaskExperiment",
    "TaskOutcome",
    "get_task",
]
