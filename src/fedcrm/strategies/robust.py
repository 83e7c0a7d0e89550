"""Byzantine-robust aggregation in plaintext mode: Flower's Krum, Multi-Krum, median, trimmed mean.

:func:`robust_strategy` builds the Flower strategy that replaces FedAvg's weighted mean,
copying the sampling, record keys and metric aggregation of the FedAvg it replaces, so that it
drops into ``run_federation(wrap_strategy=...)``. Only valid in plaintext mode (see
:mod:`fedcrm.strategies.guardrails`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from fedcrm.exceptions import ConfigError
from fedcrm.strategies.guardrails import RobustAggregator

__all__ = ["RobustConfig", "robust_strategy"]


@dataclass(frozen=True)
class RobustConfig:
    """Settings of the robust aggregator.

    Attributes:
        aggregator: Which aggregator (``none`` keeps FedAvg).
        num_malicious: Krum's ``f``, the number of Byzantine branches tolerated; Krum needs
            ``n > 2f + 2`` branches per round to give its guarantee.
        num_selected: Multi-Krum's ``m``, the number of best-scored updates averaged.
        trim_beta: Fraction cut from each end per coordinate by the trimmed mean, in [0, 0.5).
    """

    aggregator: RobustAggregator = RobustAggregator.NONE
    num_malicious: int = 1
    num_selected: int = 2
    trim_beta: float = 0.1

    def __post_init__(self) -> None:
        if self.num_malicious < 0:
            raise ConfigError(f"krum-malicious must be >= 0, got {self.num_malicious}")
        if self.num_selected < 1:
            raise ConfigError(f"multi-krum-select must be >= 1, got {self.num_selected}")
        if not 0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}")


def robust_strategy(like: FedAvg, config: RobustConfig) -> FedAvg:
    """The robust Flower strategy configured like ``like`` (sampling, keys, metric functions).

    Args:
        like: The FedAvg the robust aggregator replaces.
        config: Which aggregator and its settings.

    Returns:
        ``like`` itself when ``config.aggregator`` is ``none``, else a new Krum, MultiKrum,
        FedMedian or FedTrimmedAvg.

    Raises:
        ConfigError: ``like`` is not a plain FedAvg (robust aggregators replace FedAvg only).
    """
    if config.aggregator is RobustAggregator.NONE:
        return like
    if type(like) is not FedAvg:
        raise ConfigError(
            f"{config.aggregator} replaces FedAvg, not {type(like).__name__}; "
            "use strategy = 'fedavg'"
        )
    common: dict[str, Any] = {
        "fraction_train": like.fraction_train,
        "fraction_evaluate": like.fraction_evaluate,
        "min_train_nodes": like.min_train_nodes,
        "min_evaluate_nodes": like.min_evaluate_nodes,
        "min_available_nodes": like.min_available_nodes,
        "weighted_by_key": like.weighted_by_key,
        "arrayrecord_key": like.arrayrecord_key,
        "configrecord_key": like.configrecord_key,
        "train_metrics_aggr_fn": like.train_metrics_aggr_fn,
        "evaluate_metrics_aggr_fn": like.evaluate_metrics_aggr_fn,
    }
    if config.aggregator is RobustAggregator.KRUM:
        return Krum(**common, num_malicious_nodes=config.num_malicious)
    if config.aggregator is RobustAggregator.MULTI_KRUM:
        return MultiKrum(
            **common,
            num_malicious_nodes=config.num_malicious,
            num_nodes_to_select=config.num_selected,
        )
    if config.aggregator is RobustAggregator.MEDIAN:
        return FedMedian(**common)
    return FedTrimmedAvg(**common, beta=config.trim_beta)
