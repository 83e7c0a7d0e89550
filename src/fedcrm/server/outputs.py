"""What a deployed ServerApp leaves behind: the released model and the per-round record.

A simulation writes its own run directory (`fedcrm.simulation.runner`); on Flower's
deployment engine nobody in-process collects the `FederationResult`, so the ServerApp writes
it to ``out-dir`` (run config) itself::

    <out-dir>/<run-name, else Flower's run id>/
      model.safetensors   churn: the global model of the released round (the task's file;
      items.npz           recommendation: the item tower)
      metrics.jsonl       one line per round (pooled federated evaluation)
      summary.json        task, best round, rounds, branches, the statistics every message
                          carried (the churn scaler), rejected updates, branch-level DP
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from fedcrm.server.result import FederationResult
from fedcrm.tasks import Task

DEFAULT_OUT_DIR: Final = Path("fedcrm-runs")
"""Where a deployment's outputs go when the run config names no ``out-dir``."""


def write_outputs(task: Task[Any, Any], result: FederationResult, folder: Path) -> Path | None:
    """Write the model, the round records and a summary into ``folder`` (created).

    Returns:
        The model file, or ``None`` under HE (the server holds ciphertext checkpoints only).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model = task.save_model(result.arrays, folder) if result.arrays else None
    with (folder / "metrics.jsonl").open("w", encoding="utf-8") as fh:
        for record in result.rounds:
            fh.write(json.dumps(asdict(record), default=float) + "\n")
    summary: dict[str, Any] = {
        "task": result.task,
        "best_round": result.best_round,
        "rounds": len(result.rounds),
        "branches": result.num_branches,
        "model": None if model is None else model.name,
        "model_selection": _selection(result),
        "best_round_evaluation": next(
            (r.evaluate for r in result.rounds if r.round == result.best_round), {}
        ),
        "statistics": result.statistics,
        "rejected_updates": [asdict(r) for r in result.rejections],
    }
    if result.central_dp is not None:
        summary["central_dp"] = result.central_dp
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return model


def _selection(result: FederationResult) -> str:
    return f"round {result.best_round} of {len(result.rounds)} (the task's selection metric)"
