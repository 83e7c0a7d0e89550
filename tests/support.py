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


def plaintext_fedavg(
    run_dir: Any, cfg: Any, rounds: int, *, handle: Any = None
) -> list[dict[str, Any]]:
    """Global model after each round, FedAvg in plaintext, from a run's own branch folders.

    The reference the HE and SecAgg+ simulations must reproduce: each branch trains with its
    task's own step (the seeds its ClientApp uses) on the statistics every message carries.
    ``handle`` is the simulated data of a task that keeps it in memory (recommendations). ML
    imports are local so the compliance tests that use this module do not load torch.
    """
    import json

    import numpy as np
    from flwr.app import MetricRecord, RecordDict

    from fedcrm.data.pseudonymise import load_or_create_key
    from fedcrm.tasks import BranchSource, RoundContext, get_task

    task = get_task(cfg.task)
    folders = sorted((run_dir / "branches").glob("*/branch.json"))
    sources = [
        BranchSource(
            folder=f.parent,
            name=json.loads(f.read_text())["name"],
            number=pid,
            key=load_or_create_key(f.parent / "hmac.key"),
            simulation=handle,
        )
        for pid, f in enumerate(folders)
    ]
    seed = cfg.federation.seed
    data = [task.load(s, cfg.settings, seed=seed) for s in sources]
    records = [MetricRecord(task.statistics(d, cfg.settings)) for d in data]
    statistics = task.combine_statistics(cfg.settings, records)
    arrays = task.initial_arrays(cfg.settings, seed=seed)
    states = [RecordDict() for _ in sources]
    models = []
    for rnd in range(1, rounds + 1):
        outs = [
            task.train(
                d,
                arrays,
                cfg.settings,
                RoundContext(rnd, seed + 1000 * rnd + pid, seed, statistics, state, s.folder),
            )
            for pid, (d, s, state) in enumerate(zip(data, sources, states, strict=True))
        ]
        total = sum(o.num_examples for o in outs)
        arrays = {
            name: (
                sum(o.arrays[name].astype(np.float64) * o.num_examples for o in outs) / total
            ).astype(np.float32)
            for name in arrays
        }
        models.append(dict(arrays))
    return models
