"""Builders shared by tests in several folders (on pytest's ``pythonpath``)."""

from typing import Any

from fedcrm.compliance import (
    Accountant,
    Decision,
    LedgerEntry,
    Mechanism,
    NeighbouringRelation,
    PrivacyUnit,
    SamplingMethod,
)


def ledger_entry(**changes: Any) -> LedgerEntry:
    """A valid admitted privacy-ledger entry; ``changes`` override any field."""
    values: dict[str, Any] = {
        "run_id": "run-1",
        "round": 1,
        "branch": "north",
        "model": "churn",
        "purpose": "churn-model-training",
        "privacy_unit": PrivacyUnit.RECORD,
        "neighbouring_relation": NeighbouringRelation.ADD_REMOVE,
        "mechanism": Mechanism.SUBSAMPLED_GAUSSIAN,
        "noise_multiplier": 1.1,
        "clipping_norm": 1.0,
        "sampling_rate": 0.01,
        "sampling_method": SamplingMethod.POISSON,
        "steps": 100,
        "delta": 1e-5,
        "accountant": Accountant.RDP,
        "library_version": "opacus 1.6.0",
        "epsilon": 0.4,
        "cumulative_epsilon": 0.4,
        "decision": Decision.ADMITTED,
        "epsilon_budget": 3.0,
    }
    values.update(changes)
    return LedgerEntry(**values)
