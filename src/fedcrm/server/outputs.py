"""What a deployed ServerApp leaves behind: the released model and the per-round record.

A simulation writes its own run directory (`fedcrm.simulation.runner`); on Flower's
deployment engine nobody in-process collects the `FederationResult`, so the ServerApp writes
it to ``out-dir`` (run config) itself::

    <out-dir>/<flower run id>/
      model.safetensors   the global model of the best validation round
      metrics.jsonl       one line per round (pooled federated evaluation)
      summary.json        best round, rounds, branches, the shared scaler, rejected updates,
                          branch-level DP (central DP runs: what each round spent)
"""

import json
from pathlib import Path

from safetensors.torch import save_file

from fedcrm.server.federation import FederationResult

DEFAULT_OUT_DIR = Path("fedcrm-runs")
"""Where a deployment's outputs go when the run config names no ``out-dir``."""


def write_outputs(result: FederationResult, folder: Path) -> Path:
    """Write the model, the round records and a summary into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(result.state_dict, str(folder / "model.safetensors"))
    with (folder / "metrics.jsonl").open("w", encoding="utf-8") as fh:
        for record in result.rounds:
            fh.write(json.dumps(record.__dict__, default=float) + "\n")
    summary = {
        "best_round": result.best_round,
        "rounds": len(result.rounds),
        "branches": result.num_branches,
        "model_selection": "round with the best pooled validation ROC-AUC",
        "best_round_evaluation": next(
            (r.evaluate for r in result.rounds if r.round == result.best_round), {}
        ),
        "scaler": {"mean": result.scaler.mean.tolist(), "std": result.scaler.std.tolist()},
        "rejected_updates": [r.__dict__ for r in result.rejections],
    }
    if result.central_dp is not None:
        summary["central_dp"] = result.central_dp
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return folder
