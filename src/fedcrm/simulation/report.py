"""The Markdown report and plot of a run directory, for every task.

The task writes its own part (its comparison table, `fedcrm.tasks.TaskOutcome.report`); this
module adds what every run has: rejected updates, traffic, the consent gate of the pooled
evaluation, the privacy statements, and the plot of the headline metric per round.
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

from fedcrm.server.result import FederationResult
from fedcrm.tasks import DPStatement


def privacy_summary(
    result: FederationResult, *, ledger: str, statement: DPStatement
) -> dict[str, Any]:
    """The run's privacy statement: ε per branch with its unit, δ, accountant and mechanism.

    Args:
        result: A DP run's result (its privacy events).
        ledger: Where the privacy ledger of the run is stored.
        statement: What the task's DP-SGD protects and leaves uncovered.
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
        "mechanism": statement.mechanism,
        "privacy_unit": "customer" if units == {"customer"} else "record",
        "unit_note": statement.unit_note,
        "neighbouring_relation": statement.relation,
        "epsilon_scope": f"per branch, cumulative for ({dp.model}, {dp.purpose})",
        "target_epsilon": dp.target_epsilon,
        "budget": dp.budget,
        "delta_rule": (
            "1/(10n) per branch (n = its DP-SGD rows; δ must stay below 1/n)"
            if dp.delta is None
            else f"{dp.delta:g}"
        ),
        "accountant": dp.accountant,
        "max_grad_norm": dp.max_grad_norm,
        "epsilon_max": max((b["epsilon"] for b in branches), default=0.0),
        "branches": branches,
        "ledger": ledger,
        "not_covered": statement.not_covered,
    }


def _privacy_lines(privacy: Mapping[str, Any]) -> list[str]:
    branches = privacy["branches"]
    lines = [
        "## Privacy",
        "",
        f"Differential privacy on every branch: {privacy['mechanism']}; {privacy['unit_note']}. "
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


def plot_rounds(
    path: Path, values: Sequence[float], centralised: Mapping[str, float], *, label: str, title: str
) -> None:
    """The federated headline metric per round against each centralised baseline's."""
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(1, len(values) + 1))
    ax.plot(xs, list(values), marker="o", ms=3, label="federated")
    for name, value in centralised.items():
        ax.axhline(value, ls="--", lw=1, label=f"centralised {name}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{label} (test)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _evaluation_gate_lines(gate: Mapping[str, Any]) -> list[str]:
    """What the consent gate left out of the pooled evaluation and baseline rows."""
    before, excluded = gate["rows_before"], gate["rows_excluded"]
    counts = ", ".join(f"{excluded[s]} of {before[s]} {s}" for s in before)
    reasons = gate["excluded_by_reason"].get("test", {})
    why = ", ".join(f"{n} {reason}" for reason, n in reasons.items()) or "none"
    lines = [
        f"Consent gate on evaluation ({gate['purpose']}, as of {gate['at']}): the pooled data "
        f"exclude customers without valid consent, as the branches do: {counts} left out (test: "
        f"{why}). The baselines train on the same gated data.",
    ]
    if gate["refused_branches"]:
        refused = ", ".join(f"{b} ({code})" for b, code in gate["refused_branches"].items())
        lines.append(f"Branches refusing the purpose contribute no row: {refused}.")
    return [*lines, ""]


PLOT_FILE = "metric_per_round.png"


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    task_lines: Sequence[str],
    *,
    plot: Sequence[float],
    centralised: Mapping[str, float],
    label: str,
) -> None:
    """Write ``report.md`` and the plot of ``label`` per round into ``run_dir``."""
    plot_rounds(run_dir / PLOT_FILE, plot, centralised, label=label, title=str(summary["name"]))
    fed = summary["federated"]
    lines = [
        f"# {summary['name']}",
        "",
        f"Task `{summary['task']}`: {fed['strategy']}, {fed['rounds']} rounds, "
        f"{fed['seconds']:.1f} s on Flower's simulation engine; released round "
        f"{fed['best_round']} ({fed['model_selection']}).",
        "",
        *task_lines,
    ]
    if fed.get("rejected_updates"):
        lines += [
            f"Rejected branch updates: {len(fed['rejected_updates'])} (see summary.json).",
            "",
        ]
    traffic = summary.get("traffic")
    if traffic:
        encrypted = (
            " Encrypted aggregation (CKKS): the server added ciphertexts of the branches' "
            "updates and never saw one in plaintext; the released model was decrypted with the "
            "run's key."
            if traffic["aggregation"] == "he"
            else ""
        )
        lines += [
            f"Aggregation: {traffic['aggregation']}; per branch and round (train + evaluate "
            f"messages) {traffic['bytes_up_per_branch_per_round']:,.0f} bytes up, "
            f"{traffic['bytes_down_per_branch_per_round']:,.0f} bytes down; median round "
            f"{traffic['median_round_seconds']:.2f} s.{encrypted}",
            "",
        ]
    gate = summary.get("compliance", {}).get("evaluation_gate")
    if gate:
        lines += _evaluation_gate_lines(gate)
    if summary.get("privacy"):
        lines += _privacy_lines(summary["privacy"])
    if summary.get("central_dp"):
        lines += _central_dp_lines(summary["central_dp"])
    lines += [f"![{label} per round]({PLOT_FILE})", ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
