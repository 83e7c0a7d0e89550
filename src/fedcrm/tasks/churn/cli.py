"""How the ``fedcrm`` command shows finished churn runs: federated against centralised AUC."""

from collections.abc import Mapping, Sequence
from typing import Any, Final

from rich.table import Table

SHORT_NAMES: Final = {
    "logistic_regression": "LR",
    "hist_gradient_boosting": "HGB",
    "pooled_torch": "MLP",
}
"""Centralised baselines as the demo's 80-column table names them."""


def results_tables(summaries: Sequence[Mapping[str, Any]]) -> list[Table]:
    """One table of every run: test ROC-AUC beside the best centralised baseline's."""
    table = Table(title="Federated vs centralised, same split (test ROC-AUC)")
    table.add_column("run", no_wrap=True)
    for col in ("federated", "best centralised", "gap", "PR-AUC fed", "F1 fed"):
        table.add_column(col, justify="right")
    for s in summaries:
        fed = s["federated"]
        best_name, best = max(
            s["centralised"].items(), key=lambda kv: kv[1]["roc_auc"], default=("–", None)
        )
        best_auc = best["roc_auc"] if best else float("nan")
        table.add_row(
            s["name"],
            f"{fed['roc_auc']:.4f}",
            f"{best_auc:.4f} {SHORT_NAMES.get(best_name, best_name)}",
            f"{fed['roc_auc'] - best_auc:+.4f}",
            f"{fed['pr_auc']:.4f}",
            f"{fed['f1']:.4f}",
        )
    return [table]
