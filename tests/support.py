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


def plaintext_fedavg(run_dir: Any, cfg: Any, rounds: int) -> list[dict[str, Any]]:
    """Global model after each round, FedAvg in plaintext, from a run's own branch exports.

    The reference the HE and SecAgg+ simulations must reproduce (ML imports kept local so the
    compliance tests that use this module do not load torch).
    """
    import json

    import numpy as np
    import torch

    from fedcrm.client import branch
    from fedcrm.data.schema import get_schema
    from fedcrm.models.churn import TrainSettings, build_model
    from fedcrm.simulation.runner import BranchInfo, pooled_splits

    fed = cfg.federation
    schema = get_schema(fed.schema)
    infos = [
        BranchInfo(**json.loads(p.read_text()))
        for p in sorted((run_dir / "branches").glob("*/branch.json"))
    ]
    splits, scaler = pooled_splits(run_dir, schema, infos, fed.seed)
    settings = TrainSettings(
        epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        lr=fed.lr,
        weight_decay=fed.weight_decay,
        optimizer=fed.optimizer,
        momentum=fed.momentum,
    )
    state = build_model(schema.input_dim, seed=fed.seed, hidden=fed.hidden).state_dict()
    models = []
    for rnd in range(1, rounds + 1):
        outs = [branch.train(s, schema, scaler, state, settings, seed=rnd) for s in splits]
        total = sum(o.num_examples for o in outs)
        state = {
            name: torch.from_numpy(
                sum(o.state_dict[name].numpy().astype(np.float64) * o.num_examples for o in outs)
                / total
            ).float()
            for name in state
        }
        models.append({n: t.numpy() for n, t in state.items()})
    return models
