"""Build the configured federated optimisation strategy (FedAvg, FedProx or FedAdam)."""

from collections.abc import Callable
from enum import StrEnum

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedcrm import wire as k

EvaluationPooling = Callable[[list[RecordDict], str], MetricRecord]
"""Pools the branches' evaluation replies (the task's `aggregate_evaluation`)."""


class StrategyName(StrEnum):
    """Selectable server strategies."""

    FEDAVG = "fedavg"
    """McMahan et al. 2017, arXiv:1602.05629."""
    FEDPROX = "fedprox"
    """Li et al. 2020, arXiv:1812.06127 (branches add a proximal term)."""
    FEDADAM = "fedadam"
    """Reddi et al. 2021, arXiv:2003.00295 (adaptive server optimiser)."""


def build_strategy(
    name: StrategyName,
    *,
    num_nodes: int,
    evaluate_metrics: EvaluationPooling,
    fraction_train: float = 1.0,
    proximal_mu: float = 0.01,
    server_lr: float = 0.01,
) -> Strategy:
    """Return the inner strategy, sampling ``fraction_train`` of ``num_nodes`` branches a round.

    Evaluation always runs on every branch, and its replies are pooled by ``evaluate_metrics``.
    """
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": max(1, min(2, num_nodes)),
        "min_evaluate_nodes": num_nodes,
        "min_available_nodes": num_nodes,
        "weighted_by_key": k.KEY_NUM_EXAMPLES,
        "arrayrecord_key": k.ARRAYS,
        "configrecord_key": k.CONFIG,
        "evaluate_metrics_aggr_fn": evaluate_metrics,
    }
    if name is StrategyName.FEDAVG:
        return FedAvg(**common)  # type: ignore[arg-type]
    if name is StrategyName.FEDPROX:
        return FedProx(**common, proximal_mu=proximal_mu)  # type: ignore[arg-type]
    # eta_l only matters for Flower's own logging; branches use their configured lr.
    return FedAdam(**common, eta=server_lr, eta_l=server_lr)  # type: ignore[arg-type]
