"""Markdown renderings of the Art. 30 records and a DPIA skeleton (Art. 35), from one RopaConfig.

Both are generated from the same :class:`~fedcrm.compliance.core.config.RopaConfig` as
``GET /ropa`` (for a run: :func:`~fedcrm.compliance.core.ropa_from_run.ropa_from_run`), so they
state the measures in force with their figures and every absent measure as absent. What only
the officer can judge (necessity, proportionality, likelihood, severity, residual risk) is left
as a marked placeholder, never filled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from fedcrm.compliance.core.config import ProcessingActivity, RopaConfig

TO_COMPLETE: Final = "**[TO BE COMPLETED BY THE OFFICER]**"
"""The marker of every placeholder the officer must fill in."""

_RISKS: Final = (
    (
        "Reconstruction of customer data, or membership inference, from a branch's individual "
        "model updates as the server receives them",
        (
            "homomorphic",
            "secagg",
            "encryption of model updates",
            "dp-sgd",
            "central dp",
            "distributed dp",
            "differential privacy",
        ),
    ),
    (
        "Membership or attribute inference from the released model and the released metrics",
        ("dp-sgd", "central dp", "distributed dp", "differential privacy", "privacy ledger"),
    ),
    (
        "Processing customers without valid consent, or after a withdrawal or refusal",
        ("consent gate",),
    ),
    ("Re-identification of customers from the identifiers the branches use", ("pseudonym",)),
    (
        "Undetected alteration of consent, round-manifest or model-release records "
        "(accountability, Art. 5(2))",
        ("audit log",),
    ),
    (
        "Manipulated or poisoned branch updates biasing the model against customers (integrity)",
        ("robust aggregation",),
    ),
)


def _legal_basis(activity: ProcessingActivity) -> str:
    if activity.legal_basis is None:
        return f"not established by the configuration {TO_COMPLETE}"
    return activity.legal_basis.value


def _activity_lines(activity: ProcessingActivity, config: RopaConfig) -> list[str]:
    targets = [t for t in config.security.dp_targets if t.purpose == activity.purpose]
    lines = [
        f"- Description: {activity.description}",
        f"- Legal basis: {_legal_basis(activity)}",
        f"- Data subjects: {'; '.join(activity.data_subjects)}",
        f"- Data categories: {'; '.join(activity.data_categories)}",
        f"- Recipients: {'; '.join(activity.recipients) or 'none'}",
        f"- Third-country transfers: {activity.third_country_transfers}",
        f"- Retention: {activity.retention}",
    ]
    lines += [f"- Note: {note}" for note in activity.notes]
    if targets:
        lines += [f"- Differential privacy: {target.statement()}" for target in targets]
    else:
        lines.append("- Differential privacy: none for this purpose")
    return lines


def _header(config: RopaConfig, branches: Sequence[str]) -> list[str]:
    source = config.source
    digest = f" (config.toml SHA-256 `{source.config_sha256}`)" if source.config_sha256 else ""
    controller = config.controller
    return [
        f"Source: {source.detail}{digest}.",
        "",
        f"- Controller: {controller.name}, {controller.contact}",
        f"- Data protection officer: {controller.dpo_contact}",
        f"- Branches: {', '.join(branches) if branches else 'none recorded'}",
        "",
    ]


def _measure_lines(config: RopaConfig) -> list[str]:
    security = config.security
    lines = ["### In force", ""]
    lines += [f"- {m}" for m in security.measures] or ["- none recorded as in force"]
    lines += ["", "### Not in force", ""]
    lines += [f"- {m}" for m in security.not_in_force] or ["- none recorded"]
    return [*lines, ""]


def ropa_markdown(config: RopaConfig, *, branches: Sequence[str] | None = None) -> str:
    """The records of processing (GDPR Art. 30(1)) as Markdown.

    Args:
        config: The records' configuration.
        branches: The branches to list; default those of ``config``.
    """
    shown = list(config.branches if branches is None else branches)
    lines = ["# Records of processing activities (GDPR Art. 30)", "", *_header(config, shown)]
    for activity in config.activities:
        lines += [f"## Purpose: {activity.purpose.value}", "", *_activity_lines(activity, config)]
        lines.append("")
    aggregation = config.security.aggregation or "not recorded"
    lines += [
        "## Security measures (Art. 30(1)(g), Art. 32)",
        "",
        f"Aggregation of model updates: {aggregation}.",
        "",
        *_measure_lines(config),
    ]
    return "\n".join(lines)


def _matching(texts: Sequence[str], keywords: Sequence[str]) -> list[str]:
    return [t for t in texts if any(k in t.lower() for k in keywords)]


def _risk_lines(config: RopaConfig) -> list[str]:
    security = config.security
    lines: list[str] = []
    for number, (risk, keywords) in enumerate(_RISKS, start=1):
        in_force = _matching(security.measures, keywords)
        absent = _matching(security.not_in_force, keywords)
        lines += [f"### R{number}. {risk}", ""]
        lines += ["Measures in force (as the run used them):", ""]
        lines += [f"- {m}" for m in in_force] or ["- none recorded"]
        if absent:
            lines += ["", "Not in force:", ""] + [f"- {m}" for m in absent]
        lines += [
            "",
            f"- Likelihood: {TO_COMPLETE}",
            f"- Severity: {TO_COMPLETE}",
            f"- Residual risk: {TO_COMPLETE}",
            "",
        ]
    retention = "; ".join(a.retention for a in config.activities)
    lines += [
        f"### R{len(_RISKS) + 1}. Exposure of the data and keys kept after the processing",
        "",
        f"- What is kept: {retention}",
        f"- Measures in force: none recorded in the configuration {TO_COMPLETE}",
        f"- Likelihood: {TO_COMPLETE}",
        f"- Severity: {TO_COMPLETE}",
        f"- Residual risk: {TO_COMPLETE}",
        "",
    ]
    return lines


def dpia_markdown(config: RopaConfig, *, branches: Sequence[str] | None = None) -> str:
    """A DPIA skeleton (GDPR Art. 35(7)) as Markdown, from the same configuration as the RoPA.

    The description, purposes, data categories, risks and measures come from ``config``; every
    judgement is a :data:`TO_COMPLETE` placeholder.

    Args:
        config: The records' configuration.
        branches: The branches to list; default those of ``config``.
    """
    shown = list(config.branches if branches is None else branches)
    lines = [
        "# Data protection impact assessment (GDPR Art. 35): skeleton",
        "",
        f"> Generated from the configuration; every {TO_COMPLETE} mark is a placeholder. This "
        "document records the processing and the measures actually in force; it does not "
        "assess necessity, proportionality or residual risk.",
        "",
        *_header(config, shown),
        "## 1. Systematic description of the processing (Art. 35(7)(a))",
        "",
    ]
    for activity in config.activities:
        lines += [f"### {activity.purpose.value}", "", *_activity_lines(activity, config), ""]
    lines += [
        f"Aggregation of model updates: {config.security.aggregation or 'not recorded'}.",
        "",
        "## 2. Purposes and legal bases",
        "",
    ]
    lines += [f"- {a.purpose.value}: {_legal_basis(a)}" for a in config.activities]
    lines += [
        "",
        "## 3. Necessity and proportionality (Art. 35(7)(b))",
        "",
        f"- Why federated training is needed for each purpose: {TO_COMPLETE}",
        "- Data minimisation: the categories listed in section 1; whether each one is needed: "
        f"{TO_COMPLETE}",
        f"- Storage limitation (retention periods): {TO_COMPLETE}",
        f"- Information given to the data subjects (Art. 13, 14): {TO_COMPLETE}",
        f"- Exercise of the data subjects' rights (Art. 15-22): {TO_COMPLETE}",
        f"- Processors and transfers (Art. 28, 44-49): {TO_COMPLETE}",
        "",
        "## 4. Risks to the rights and freedoms of data subjects (Art. 35(7)(c))",
        "",
        *_risk_lines(config),
        "## 5. Measures (Art. 35(7)(d))",
        "",
        *_measure_lines(config),
        "### Further measures planned",
        "",
        f"- {TO_COMPLETE}",
        "",
        "## 6. Conclusion",
        "",
        f"- Residual risk overall: {TO_COMPLETE}",
        f"- Prior consultation of the supervisory authority needed (Art. 36): {TO_COMPLETE}",
        f"- Advice of the data protection officer (Art. 35(2)): {TO_COMPLETE}",
        f"- Decision, name and date: {TO_COMPLETE}",
        "",
    ]
    return "\n".join(lines)
