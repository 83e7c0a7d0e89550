"""fedcrm.strategies: small wrappers around Flower's strategies.

Reply validation, HE and SecAgg+ aggregation, central and distributed branch-level DP, robust
aggregators, the guardrails that refuse combinations which cannot work, and the strategy
factory.
"""

from fedcrm.strategies._grid import DelegatingGrid
from fedcrm.strategies.central_dp import (
    CentralBudgetExhausted,
    CentralDPStrategy,
    ledger_history,
)
from fedcrm.strategies.distributed_dp import DistributedDPStrategy
from fedcrm.strategies.factory import EvaluationPooling, StrategyName, build_strategy
from fedcrm.strategies.guardrails import (
    AggregationMode,
    CombinationRefused,
    RobustAggregator,
    ServerClipping,
    check_combination,
)
from fedcrm.strategies.he import (
    Checkpoint,
    HEAggregation,
    checkpoint_record,
    parse_checkpoint,
    replay_global_model,
)
from fedcrm.strategies.robust import RobustConfig, robust_strategy
from fedcrm.strategies.secagg import (
    RUN_CONFIG_KEYS,
    SecAggConfig,
    SecAggPlusAggregation,
    quantization_error_bound,
)
from fedcrm.strategies.validated import Rejection, ValidatedStrategy, check_update

__all__ = [
    "RUN_CONFIG_KEYS",
    "AggregationMode",
    "CentralBudgetExhausted",
    "CentralDPStrategy",
    "Checkpoint",
    "CombinationRefused",
    "DelegatingGrid",
    "DistributedDPStrategy",
    "EvaluationPooling",
    "HEAggregation",
    "Rejection",
    "RobustAggregator",
    "RobustConfig",
    "SecAggConfig",
    "SecAggPlusAggregation",
    "ServerClipping",
    "StrategyName",
    "ValidatedStrategy",
    "build_strategy",
    "check_combination",
    "check_update",
    "checkpoint_record",
    "ledger_history",
    "parse_checkpoint",
    "quantization_error_bound",
    "replay_global_model",
    "robust_strategy",
]
