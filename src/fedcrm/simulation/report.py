"""The Markdown report and plots of a run directory."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from fedcrm.server.federation import FederationResult

_COLUMNS = ("roc_auc", "pr_auc", "f1", "log_loss")


def privacy_summary(result: "FederationResult", *, ledger: str) -> dict[str, Any]:
    """The run's privacy statement: ε per branch with its unit, δ, accountant and mechanism.

    Args:
        result: A DP run's result (its privacy events).
        ledger: Where the privacy ledger of the run is stored.
    """
    dp = result.dp
    if dp is None:
        raise ValueError("not a DP run")
    latest: dict[str, Any] = {}
    admitted: dict[str, int] = {}
    refused: dict[str, int] = {}
    for event in result.privacy:
        report = event.report
        latest[report.branch] = report
        counter = admitted if report.admitted else refused
        counter[report.branch] = counter.get(report.branch, 0) + 1
    units = {r.privacy_unit for r in latest.values()}
    branches = [
        {
            "branch": name,
            "epsilon": r.epsilon,
            "delta": r.delta,
            "noise_multiplier": r.noise_multiplier,
            "sample_rate": r.sample_rate,
            "admitted_rounds": admitted.get(name, 0),
            "refused_rounds": refused.get(name, 0),
        }
        for name, r in sorted(latest.items())
    ]
    return {
        "mechanism": "DP-SGD (Abadi et al. 2016): Poisson-subsampled Gaussian, per-example "
        "clipping",
        "privacy_unit": "customer" if units == {"customer"} else "record",
        "unit_note": (
            "record-level DP on each branch's training rows; churn tables hold one row per "
            "customer, so the guarantee is customer-level"
            if units == {"customer"}
            else "record-level DP on each branch's training rows"
        ),
        "neighbouring_relation": "add/remove one row",
        "epsilon_scope": f"per branch, cumulative for ({dp.model}, {dp.purpose})",
        "target_epsilon": dp.target_epsilon,
        "budget": dp.budget,
        "delta_rule": (
            "1/n per branch (n = its training rows)" if dp.delta is None else f"{dp.delta:g}"
        ),
        "accountant": dp.accountant,
        "max_grad_norm": dp.max_grad_norm,
        "epsilon_max": max((b["epsilon"] for b in branches), default=0.0),
        "branches": branches,
        "ledger": ledger,
        "not_covered": (
            "the federated scaler's moments (training rows) and the evaluation aggregates "
            "(validation and test rows) are released without noise"
        ),
    }


def _privacy_lines(privacy: Mapping[str, Any]) -> list[str]:
    branches = privacy["branches"]
    lines = [
        "## Privacy",
        "",
        f"Record-level differential privacy: {privacy['mechanism']}; {privacy['unit_note']}. "
        f"ε is {privacy['epsilon_scope']}, with {privacy['accountant'].upper()} accounting, "
        f"neighbouring relation {privacy['neighbouring_relation']}, δ = {privacy['delta_rule']}, "
        f"clipping norm {privacy['max_grad_norm']:g}.",
        f"Target ε {privacy['target_epsilon']:g} per branch, budget {privacy['budget']:g}; "
        f"largest ε reached: {privacy['epsilon_max']:.3f} (privacy unit: "
        f"{privacy['privacy_unit']}).",
        f"Not covered by this guarantee: {privacy['not_covered']}.",
        f"Every decision is in the privacy ledger `{privacy['ledger']}` "
        "(`fedcrm ledger show --db ...`).",
        "",
        "| branch | ε | δ | σ | q | rounds admitted | refused |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {b['branch']} | {b['epsilon']:.3f} | {b['delta']:.2e} | {b['noise_multiplier']:.3f} "
        f"| {b['sample_rate']:.4f} | {b['admitted_rounds']} | {b['refused_rounds']} |"
        for b in branches
    ]
    return [*lines, ""]


def _central_dp_lines(central: Mapping[str, Any]) -> list[str]:
    return [
        "## Branch-level privacy (central DP)",
        "",
        f"{central['description']}.",
        f"Noise: {central['noise']}. ε after this run: {central['epsilon']:.3f} per branch at "
        f"δ = {central['delta']:g} (privacy unit: branch; neighbouring relation: "
        f"{central['neighbouring_relation']} one branch's data; mechanism: "
        f"{central['mechanism']}; sampling: {central['sampling']}; "
        f"{central['accountant'].upper()} accountant, {central['library_version']}).",
        "Not covered: the training metrics branches report and the evaluation aggregates are "
        "released without noise. Each round is one row of the privacy ledger (branch "
        "`federation`, unit `branch`).",
        "",
    ]


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


def _evaluation_gate_lines(gate: Mapping[str, Any]) -> list[str]:
    """What the consent gate left out of the pooled evaluation and baseline rows."""
    before, excluded = gate["rows_before"], gate["rows_excluded"]
    counts = ", ".join(f"{excluded[s]} of {before[s]} {s}" for s in ("train", "val", "test"))
    reasons = gate["excluded_by_reason"]["test"]
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "none"
    lines = [
        f"Consent gate on evaluation ({gate['purpose']}, as of {gate['at']}): the pooled rows "
        f"above exclude customers without valid consent, as the branches do: {counts} rows "
        f"left out (test rows: {why}). The baselines train on the same gated rows.",
    ]
    if gate["refused_branches"]:
        refused = ", ".join(f"{b} ({code})" for b, code in gate["refused_branches"].items())
        lines.append(f"Branches refusing the purpose contribute no row: {refused}.")
    return [*lines, ""]


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
    traffic = summary.get("traffic")
    if traffic:
        lines += [
            f"Aggregation: {traffic['aggregation']}; per branch and round (train + evaluate "
            f"messages) {traffic['bytes_up_per_branch_per_round']:,.0f} bytes up, "
            f"{traffic['bytes_down_per_branch_per_round']:,.0f} bytes down; median round "
            f"{traffic['median_round_seconds']:.2f} s.",
            "",
        ]
    gate = summary.get("compliance", {}).get("evaluation_gate")
    if gate:
        lines += _evaluation_gate_lines(gate)
    if summary.get("privacy"):
        lines += _privacy_lines(summary["privacy"])
    if summary.get("central_dp"):
        lines += _central_dp_lines(summary["central_dp"])
    lines += ["![AUC per round](auc_per_round.png)", ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
