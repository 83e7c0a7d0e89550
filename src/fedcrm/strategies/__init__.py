"""fedcrm.strategies: the public API of the subpackage.

Aggregation: validation, HE, SecAgg+, central and distributed DP, robust aggregators.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "_grid": ("DelegatingGrid",),
    "central_dp": (
        "CentralBudgetExhausted",
        "CentralDPStrategy",
        "central_dp_wrapper",
    ),
    "distributed_dp": ("DistributedDPStrategy",),
    "factory": (
        "StrategyName",
        "build_strategy",
    ),
    "guardrails": (
        "AggregationMode",
        "RobustAggregator",
        "ServerClipping",
        "check_combination",
    ),
    "he": (
        "Checkpoint",
        "HEAggregation",
        "HE_AGGREGATE",
        "HE_COUNT",
        "HE_KEY_ID",
        "HE_RECORD",
        "HE_ROUND",
        "HE_UPDATE",
        "apply_aggregate",
        "flatten",
        "pre_weight",
        "replay_global_model",
    ),
    "robust": (
        "RobustConfig",
        "robust_strategy",
    ),
    "secagg": (
        "KEY_PARAM_NAMES",
        "KEY_SECAGG_CLIPPING_RANGE",
        "KEY_SECAGG_MAX_WEIGHT",
        "RUN_CONFIG_KEYS",
        "SecAggConfig",
        "SecAggPlusAggregation",
    ),
    "validated": (
        "Rejection",
        "ValidatedStrategy",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
