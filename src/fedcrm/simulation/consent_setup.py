"""Consent for simulated branches: the ``[compliance]`` table and the consent each branch imports.

A simulation has no real customers to ask, so each virtual branch writes a consent CSV in the
registry's import format (``branches/NNN/consent.csv``, pseudonymous ids only) and imports it,
all or nothing, into the run's compliance store, exactly as a real branch imports its own:

* most customers gave consent for the run's purpose (some days before the run);
* a share withdrew it later, a share refused, and a share was never asked (no row at all);
* branches listed in ``uncovered-branches`` hold data collected for another purpose only
  (``recommendation-training`` unless that is the run's purpose), so they refuse the run.

Example::

    [compliance]
    purpose = "churn-model-training"
    withdrawn-share = 0.05
    refused-share = 0.02
    no-consent-share = 0.03
    uncovered-branches = [9]
"""

import csv
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fedcrm.client.consent_gate import BranchConsent, apply_gate
from fedcrm.compliance import ConsentRegistry, Purpose, open_store
from fedcrm.compliance.consent import CSV_OPTIONAL_COLUMNS, CSV_REQUIRED_COLUMNS
from fedcrm.compliance.lineage import LineageStore
from fedcrm.compliance.manifest import ConsentRefusal
from fedcrm.exceptions import ConfigError
from fedcrm.seeds import Stream, generator
from fedcrm.server.run_audit import RunAudit
from fedcrm.tasks import SimulatedBranch

NOTICE_ID = "crm-privacy-notice"
NOTICE_VERSION = "2026-01"
NOTICE_TEXT = (
    "We use your customer record to train a churn model together with our other branches; "
    "no record leaves this branch. You can withdraw your consent at any time."
)
_KEYS = {"purpose", "withdrawn-share", "refused-share", "no-consent-share", "uncovered-branches"}


@dataclass(frozen=True)
class ConsentSetup:
    """The run's declared purpose and how the simulated branches' consent is made up."""

    purpose: Purpose = Purpose.CHURN_MODEL_TRAINING
    withdrawn_share: float = 0.05
    refused_share: float = 0.02
    no_consent_share: float = 0.03
    uncovered_branches: tuple[int, ...] = field(default_factory=tuple)
    """Partition ids whose data is collected for another purpose only (they refuse the run)."""

    def __post_init__(self) -> None:
        shares = (self.withdrawn_share, self.refused_share, self.no_consent_share)
        if any(not 0 <= s < 1 for s in shares) or sum(shares) >= 1:
            raise ConfigError(
                "[compliance] withdrawn-, refused- and no-consent-share must be in [0, 1) and "
                f"sum below 1, got {shares}"
            )
        if any(b < 0 for b in self.uncovered_branches):
            raise ConfigError("[compliance] uncovered-branches are partition ids (>= 0)")

    @property
    def other_purpose(self) -> Purpose:
        """The purpose an uncovered branch's data is collected for."""
        if self.purpose is Purpose.RECOMMENDATION_TRAINING:
            return Purpose.CHURN_MODEL_TRAINING
        return Purpose.RECOMMENDATION_TRAINING

    def collected_for(self, partition_id: int) -> list[str]:
        """The purposes a simulated branch's data is collected for."""
        if partition_id in self.uncovered_branches:
            return [self.other_purpose.value]
        return [self.purpose.value]


def parse_compliance(section: Mapping[str, Any]) -> ConsentSetup:
    """Build the ``[compliance]`` settings.

    Raises:
        ConfigError: A key is unknown or a value invalid.
    """
    extra = sorted(set(section) - _KEYS)
    if extra:
        raise ConfigError(f"[compliance] has unknown key(s) {extra}; allowed: {sorted(_KEYS)}")
    try:
        uncovered = section.get("uncovered-branches", [])
        if not isinstance(uncovered, list):
            raise ValueError("uncovered-branches must be a list of partition ids")
        return ConsentSetup(
            purpose=Purpose(section.get("purpose", Purpose.CHURN_MODEL_TRAINING.value)),
            withdrawn_share=float(section.get("withdrawn-share", 0.05)),
            refused_share=float(section.get("refused-share", 0.02)),
            no_consent_share=float(section.get("no-consent-share", 0.03)),
            uncovered_branches=tuple(int(b) for b in uncovered),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[compliance]: {exc}") from exc


def compliance_toml(setup: ConsentSetup) -> dict[str, Any]:
    """The resolved ``[compliance]`` table."""
    return {
        "purpose": setup.purpose.value,
        "withdrawn-share": setup.withdrawn_share,
        "refused-share": setup.refused_share,
        "no-consent-share": setup.no_consent_share,
        "uncovered-branches": list(setup.uncovered_branches),
    }


def write_consent_csv(
    path: Path,
    customers: Sequence[str],
    setup: ConsentSetup,
    *,
    partition_id: int,
    now: datetime,
    seed: int,
) -> dict[str, int]:
    """Write a simulated branch's consent CSV (pseudonymous ids only); return its make-up."""
    rng = generator(seed, Stream.CONSENT, partition_id)  # never the split's stream
    order = rng.permutation(len(customers))
    n = len(customers)
    cuts = np.cumsum(
        [round(n * s) for s in (setup.withdrawn_share, setup.refused_share, setup.no_consent_share)]
    )
    purpose = setup.collected_for(partition_id)[0]
    given_at = (now - timedelta(days=30)).isoformat()
    withdrawn_at = (now - timedelta(days=3)).isoformat()
    notice_hash = hashlib.sha256(NOTICE_TEXT.encode("utf-8")).hexdigest()
    counts = {"given": 0, "withdrawn": 0, "refused": 0, "no-consent": 0}
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_REQUIRED_COLUMNS, *CSV_OPTIONAL_COLUMNS])

        def row(customer: str, status: str, at: str) -> None:
            writer.writerow(
                [
                    customer,
                    purpose,
                    status,
                    "consent",
                    at,
                    NOTICE_ID,
                    NOTICE_VERSION,
                    notice_hash,
                    "in-branch",
                    "",
                    "paper-form",
                ]
            )

        for position, index in enumerate(order):
            customer = customers[int(index)]
            if position < cuts[0]:
                row(customer, "given", given_at)
                row(customer, "withdrawn", withdrawn_at)
                counts["withdrawn"] += 1
            elif position < cuts[1]:
                row(customer, "refused", given_at)
                counts["refused"] += 1
            elif position < cuts[2]:
                counts["no-consent"] += 1
            else:
                row(customer, "given", given_at)
                counts["given"] += 1
    return counts


def import_consent(registry: ConsentRegistry, branch: str, path: Path) -> None:
    """Import a branch's consent CSV into the registry (all or nothing, every change audited).

    Raises:
        fedcrm.compliance.ConsentImportError: A row is invalid (every bad row listed).
    """
    with path.open(encoding="utf-8", newline="") as handle:
        registry.import_csv(branch=branch, source=handle, actor="simulation-import")


def compliance_path(run_dir: Path) -> Path:
    """The run's compliance store: consent registry, audit log and lineage (SQLite)."""
    return run_dir / "compliance.db"


def setup_branch_consent(
    setup: ConsentSetup,
    branches: Sequence[tuple[SimulatedBranch, Sequence[str]]],
    *,
    url: str,
    seed: int,
    now: datetime,
) -> dict[str, dict[str, int]]:
    """Write and import every simulated branch's consent; declare what its data is for.

    Args:
        setup: The ``[compliance]`` settings.
        branches: Every branch with its customers' pseudonyms (in its own order).
        url: The run's compliance store.
        seed: Seed of the simulated decisions.
        now: The run's start (consent dates lie before it).

    Returns:
        Per branch name, how many customers gave, withdrew, refused or were never asked.
    """
    registry = ConsentRegistry(open_store(url))
    made_up = {}
    for branch, customers in branches:
        csv_path = branch.folder / "consent.csv"
        made_up[branch.name] = write_consent_csv(
            csv_path, list(customers), setup, partition_id=branch.partition_id, now=now, seed=seed
        )
        import_consent(registry, branch.name, csv_path)
        info_path = branch.folder / "branch.json"
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info["purposes"] = setup.collected_for(branch.partition_id)
        info_path.write_text(json.dumps(info, indent=2), encoding="utf-8")
    return made_up


def branch_consent(
    setup: ConsentSetup, partition_id: int, name: str, folder: Path, url: str
) -> BranchConsent:
    """A simulated branch's consent settings, as its ClientApp resolves them.

    The run's compliance store, the branch's ``consent/`` folder, the purposes written to its
    ``branch.json`` by :func:`setup_branch_consent`, no retention limit.
    """
    return BranchConsent(
        url=url,
        branch=name,
        folder=folder / "consent",
        collected=frozenset(Purpose(p) for p in setup.collected_for(partition_id)),
    )


def gate_branches(
    setup: ConsentSetup,
    branches: Sequence[tuple[SimulatedBranch, Mapping[str, Sequence[str]]]],
    *,
    url: str,
    at: datetime,
) -> tuple[dict[int, set[str]], dict[str, Any]]:
    """Apply the branches' consent gate to the customers of the pooled evaluation and baselines.

    Evaluating a model on a customer's rows, or training a centralised baseline on them, is
    processing too: the researcher's pooled data go through the very gate the branches apply
    (:func:`fedcrm.client.consent_gate.apply_gate`) at ``at`` (the run's end). A branch that
    refuses the run's purpose contributes no customer at all.

    Args:
        setup: The ``[compliance]`` settings.
        branches: Every branch with its customers per part (``train``, ``val``, ``test``).
        url: The run's compliance store.
        at: The time of the consent decision.

    Returns:
        The customers kept per partition id, and what was left out (JSON data for
        ``summary.json``): customers before and excluded per part, excluded by reason per
        part, and refusing branches.

    Raises:
        fedcrm.compliance.ComplianceError: The registry cannot be read.
    """
    kept: dict[int, set[str]] = {}
    before: dict[str, int] = {}
    excluded: dict[str, int] = {}
    reasons: dict[str, dict[str, int]] = {}
    refused: dict[str, str] = {}
    for branch, subjects in branches:
        result = apply_gate(
            subjects,
            purpose=setup.purpose,
            consent=branch_consent(setup, branch.partition_id, branch.name, branch.folder, url),
            at=at,
        )
        if isinstance(result, ConsentRefusal):
            refused[branch.name] = result.code.value
            kept[branch.partition_id] = set()
            counts = {part: {result.code.value: len(ids)} for part, ids in subjects.items()}
        else:
            kept[branch.partition_id] = result.kept
            counts = result.excluded_by_split
        for part, ids in subjects.items():
            before[part] = before.get(part, 0) + len(ids)
            excluded.setdefault(part, 0)
            reasons.setdefault(part, {})
            for reason, n in counts.get(part, {}).items():
                if n:
                    excluded[part] += n
                    reasons[part][reason] = reasons[part].get(reason, 0) + n
    return kept, {
        "purpose": setup.purpose.value,
        "at": at.isoformat(),
        "rows_before": before,
        "rows_excluded": excluded,
        "excluded_by_reason": {part: dict(sorted(r.items())) for part, r in reasons.items()},
        "refused_branches": refused,
    }


def finish_run_audit(
    run_dir: Path, url: str, *, model_path: Path, model: str, last_round: int
) -> dict[str, Any]:
    """Record the model release, sign a checkpoint, export the log and verify it offline.

    The run's Ed25519 key is ``<run>/audit-key.pem`` (0600; public key beside it) and the
    export ``<run>/audit-log.jsonl``: ``fedcrm audit verify`` checks it again at any time.
    """
    trail = RunAudit(url, run_dir.name)
    release = trail.model_release(model_path, model=model, last_round=last_round)
    report = trail.seal(run_dir / "audit-key.pem", run_dir / "audit-log.jsonl")
    lineage = LineageStore(open_store(url, migrate=False))
    manifests = lineage.manifests(run_id=run_dir.name)
    return {
        "compliance_store": str(compliance_path(run_dir)),
        "audit_log": str(run_dir / "audit-log.jsonl"),
        "audit_public_key": str(run_dir / "audit-key.pem.pub"),
        "audit_entries": report.tree_size,
        "audit_verified": report.ok,
        "model_sha256": release.sha256,
        "manifests": len(manifests),
        "rows_used": sum(m.manifest.rows_after for m in manifests),
        "rows_excluded": sum(m.manifest.rows_before - m.manifest.rows_after for m in manifests),
    }
