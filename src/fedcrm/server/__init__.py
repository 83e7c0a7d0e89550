"""fedcrm.server: the coordinator of every task.

One Flower ServerApp (`make_server_app`) over one round loop (`run_federation`), the screening
of replies, the strategy wiring shared by simulation and deployment, the run's audit trail,
its outputs, the traffic meter, and the privacy budget kept in step with the ledger.
"""

from fedcrm.server.app import deployed_wiring, make_server_app
from fedcrm.server.budget import BudgetGuard
from fedcrm.server.checkpoint import Resumed, RoundCheckpoints
from fedcrm.server.config import FederationConfig
from fedcrm.server.ledger_check import RowCheck, recompute_ledger
from fedcrm.server.loop import StrategyWrapper, run_federation, wait_for_nodes
from fedcrm.server.outputs import write_outputs
from fedcrm.server.result import (
    FederationResult,
    FederationStopped,
    PrivacyEvent,
    RoundCallback,
    RoundRecord,
)
from fedcrm.server.run_audit import ComplianceConfig, RunAudit
from fedcrm.server.screening import ledger_entry
from fedcrm.server.traffic import MeteredGrid, RoundTraffic, TrafficMeter, wire_size
from fedcrm.server.wiring import AggregationConfig, Wiring, check_plan

__all__ = [
    "AggregationConfig",
    "BudgetGuard",
    "ComplianceConfig",
    "FederationConfig",
    "FederationResult",
    "FederationStopped",
    "MeteredGrid",
    "PrivacyEvent",
    "Resumed",
    "RoundCallback",
    "RoundCheckpoints",
    "RoundRecord",
    "RoundTraffic",
    "RowCheck",
    "RunAudit",
    "StrategyWrapper",
    "TrafficMeter",
    "Wiring",
    "check_plan",
    "deployed_wiring",
    "ledger_entry",
    "make_server_app",
    "recompute_ledger",
    "run_federation",
    "wait_for_nodes",
    "wire_size",
    "write_outputs",
]
