"""The Markdown report and plots of a run directory."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

_COLUMNS = ("roc_auc", "pr_auc", "f1", "log_loss")


def plot_auc(
    path: Path, rounds: Sequence[Mapping[str, Any]], centralised: Mapping[str, Any], title: str
) -> None:
    """Federated pooled ROC-AUC per round against each centralised baseline's AUC."""
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(rounds) + 1))
    ax.plot(
        xs, [r.get("roc-auc", float("nan")) for r in rounds], marker="o", ms=3, label="federated"
    )
    lo = [r.get("branch-auc-min", float("nan")) for r in rounds]
    hi = [r.get("branch-auc-max", float("nan")) for r in rounds]
    ax.fill_between(xs, lo, hi, alpha=0.15, label="branch AUC range")
    for name, m in centralised.items():
        ax.axhline(m["roc_auc"], ls="--", lw=1, label=f"centralised {name}", color=None)
    ax.set_xlabel("round")
    ax.set_ylabel("ROC-AUC (test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _row(name: str, m: Mapping[str, Any]) -> str:
    return f"| {name} | " + " | ".join(f"{float(m[c]):.4f}" for c in _COLUMNS) + " |"


def write_report(
    run_dir: Path, summary: Mapping[str, Any], rounds: Sequence[Mapping[str, Any]]
) -> None:
    """Write ``report.md`` and ``auc_per_round.png`` into ``run_dir``."""
    central = summary.get("centralised", {})
    plot_auc(run_dir / "auc_per_round.png", rounds, central, str(summary["name"]))
    fed = summary["federated"]
    branches = summary["branches"]
    sizes = [b["rows"] for b in branches]
    last = fed.get("last_round", {})
    lines = [
        f"# {summary['name']}",
        "",
        f"Data set `{summary['dataset']}`, {len(branches)} branches "
        f"({min(sizes)}–{max(sizes)} customers each); rows train/val/test "
        f"{summary['rows']['train']}/{summary['rows']['val']}/{summary['rows']['test']}.",
        f"Federated: {fed['strategy']}, {fed['rounds']} rounds, {fed['seconds']:.1f} s on Flower's "
        "simulation engine.",
        "",
        "Every model is scored on the same pooled test rows; the F1 threshold is tuned on the",
        "pooled validation rows. The federated model is the round with the best pooled validation",
        "ROC-AUC; the pooled torch baseline stops early on the same validation rows.",
        "",
        "| model | ROC-AUC | PR-AUC | F1 | log loss |",
        "|---|---|---|---|---|",
        _row(f"federated (round {fed.get('best_round', '?')}, chosen on validation)", fed),
        *(_row(f"centralised {name}", m) for name, m in central.items()),
        "",
    ]
    if last:
        lo, hi, sd = (float(last.get(f"branch-auc-{s}", "nan")) for s in ("min", "max", "std"))
        lines += [
            f"Branch spread of test ROC-AUC in the last round: min {lo:.3f}, max {hi:.3f}, "
            f"std {sd:.3f} (branches with a single class in their test rows excluded).",
            "",
        ]
    if fed.get("rejected_updates"):
        lines += [
            f"Rejected branch updates: {len(fed['rejected_updates'])} (see summary.json).",
            "",
        ]
    lines += ["![AUC per round](auc_per_round.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
