"""The branch's consent gate: before every round, keep only the rows valid for the run's purpose.

A run that declares a purpose (``consent-purpose`` in the server's message) is gated on every
branch, for every message (federated statistics, training, evaluation):

1. purpose binding: a branch whose data is not collected for the purpose (node config
   ``purposes``), or where no customer has valid consent for it, refuses the run with a
   structured :class:`~fedcrm.compliance.manifest.ConsentRefusal`;
2. otherwise only the customers whose consent for the purpose is valid at the time of the
   message are kept (the task keeps their rows: `fedcrm.tasks.CustomerData.keep`): given or
   renewed, not expired, not withdrawn or refused (an objection is recorded as a withdrawal),
   not erased, and, when the branch sets ``retention-days``, decided within the retention
   period. Everyone else is counted by :class:`ExclusionReason`;
3. for training, the branch then commits to the customers it trains on: a round manifest
   (Merkle root over salted commitments, :class:`~fedcrm.compliance.manifest.ManifestArchive`)
   whose root, never the ids, goes into the reply.

The consent registry is the branch's own (node config ``consent-db``; in a simulation, the run's
compliance store). Its customer ids and the export's are the same keyed HMAC pseudonyms
(`fedcrm.data.pseudonymise`): the gate compares them as they are.

A withdrawal takes effect from the next message after it is recorded: the gate reads the
registry at the time of every message, never a cached copy.
"""

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

from fedcrm.compliance import ConsentRegistry, ConsentSnapshot, Purpose, open_store, sqlite_url
from fedcrm.compliance.manifest import (
    ConsentRefusal,
    ExclusionReason,
    ManifestArchive,
    RefusalCode,
    RoundManifest,
)
from fedcrm.exceptions import ConfigError

logger = logging.getLogger(__name__)


def parse_purposes(text: str) -> frozenset[Purpose]:
    """Parse a comma-separated list of purposes (node config ``purposes``).

    Raises:
        ConfigError: An unknown purpose.
    """
    chosen = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            chosen.add(Purpose(item))
        except ValueError as exc:
            allowed = ", ".join(p.value for p in Purpose)
            raise ConfigError(f"unknown purpose {item!r}; allowed: {allowed}") from exc
    return frozenset(chosen)


def consent_url(value: str) -> str:
    """A node's ``consent-db`` as a SQLAlchemy URL (a bare path is a SQLite file)."""
    return value if "://" in value else sqlite_url(value)


@lru_cache(maxsize=8)
def _registry(url: str) -> ConsentRegistry:
    """One registry (and connection pool) per store for the life of the branch process."""
    return ConsentRegistry(open_store(url, migrate=False))


@dataclass(frozen=True)
class BranchConsent:
    """Where a branch's consent lives and what its data is collected for.

    Args:
        url: The consent registry's URL.
        branch: The branch's name in the registry (and in the ledger and manifests).
        folder: Where the branch keeps its salts and round manifests (never sent anywhere).
        collected: Purposes the branch's data is collected for; ``None``: not declared.
        retention: Rows whose latest consent decision is older than this are left out;
            ``None``: no retention limit.
    """

    url: str
    branch: str
    folder: Path
    collected: frozenset[Purpose] | None = None
    retention: timedelta | None = None

    def registry(self) -> ConsentRegistry:
        """The branch's consent registry."""
        return _registry(self.url)

    def archive(self) -> ManifestArchive:
        """The branch's salts and round manifests."""
        return ManifestArchive(self.folder)


@dataclass(frozen=True)
class GateResult:
    """The customers a round may use, and why the others were left out."""

    kept: set[str]
    """Customers whose consent for the purpose is valid."""
    snapshot: ConsentSnapshot
    rows_before: int
    """Training customers before the gate."""
    train_customers: list[str]
    """The training customers kept (what the round manifest commits to)."""
    excluded: dict[str, int]
    """Training customers left out, by :class:`ExclusionReason` value."""
    excluded_by_split: dict[str, dict[str, int]] = field(default_factory=dict)
    """Customers left out of each part (``train``, ``val``, ``test``), by reason."""


def exclusion_reasons(
    customers: Iterable[str], snapshot: ConsentSnapshot, *, retention: timedelta | None = None
) -> dict[str, ExclusionReason | None]:
    """Decide every customer: ``None`` to keep, else why the customer is left out."""
    decided: dict[str, ExclusionReason | None] = {}
    oldest = None if retention is None else snapshot.at - retention
    for customer in customers:
        state = snapshot.states.get(customer)
        if state is None:
            decided[customer] = ExclusionReason.NO_CONSENT
        elif state != "valid":
            decided[customer] = ExclusionReason(state)
        elif oldest is not None and snapshot.since[customer] < oldest:
            decided[customer] = ExclusionReason.RETENTION
        else:
            decided[customer] = None
    return decided


def apply_gate(
    subjects: Mapping[str, Sequence[str]],
    *,
    purpose: Purpose,
    consent: BranchConsent,
    at: datetime,
) -> GateResult | ConsentRefusal:
    """Gate a branch's customers for a run's purpose (module docstring, steps 1 and 2).

    Args:
        subjects: The customers of each part of the branch's data (``train``, ``val``,
            ``test``), as the task lists them (`fedcrm.tasks.Task.subjects`).
        purpose: The run's declared purpose.
        consent: The branch's registry and what its data is collected for.
        at: The time of the message.

    Returns:
        The customers kept with the exclusion counts, or the branch's refusal of the run.

    Raises:
        fedcrm.compliance.ComplianceError: The registry cannot be read.
    """
    if consent.collected is not None and purpose not in consent.collected:
        collected = ", ".join(sorted(p.value for p in consent.collected)) or "nothing"
        return ConsentRefusal(
            consent.branch,
            purpose,
            RefusalCode.PURPOSE_NOT_COLLECTED,
            f"this branch's data is collected for {collected}, not for {purpose.value}",
        )
    snapshot = consent.registry().snapshot(consent.branch, purpose, at)
    customers = {c for part in subjects.values() for c in part}
    decided = exclusion_reasons(customers, snapshot, retention=consent.retention)
    kept = {c for c, reason in decided.items() if reason is None}
    train = list(subjects.get("train", ()))
    train_kept = [c for c in train if c in kept]
    if not train_kept:
        return ConsentRefusal(
            consent.branch,
            purpose,
            RefusalCode.NO_VALID_CONSENT,
            f"no training row of this branch has valid consent for {purpose.value} "
            f"({len(customers)} customers, consent snapshot {snapshot.version})",
        )
    by_split: dict[str, dict[str, int]] = {}
    for name, part in subjects.items():
        counts: dict[str, int] = {}
        for customer in part:
            reason = decided[customer]
            if reason is not None:
                counts[reason.value] = counts.get(reason.value, 0) + 1
        by_split[name] = counts
    return GateResult(
        kept, snapshot, len(train), train_kept, dict(by_split.get("train", {})), by_split
    )


def exclude(result: GateResult, customers: set[str], reason: ExclusionReason) -> GateResult:
    """``result`` with ``customers`` left out of the round as well, counted under ``reason``."""
    train = [c for c in result.train_customers if c not in customers]
    dropped = len(result.train_customers) - len(train)
    if not dropped:
        return result
    excluded = {**result.excluded, reason.value: result.excluded.get(reason.value, 0) + dropped}
    by_split = {part: dict(counts) for part, counts in result.excluded_by_split.items()}
    by_split.setdefault("train", {})[reason.value] = (
        by_split.get("train", {}).get(reason.value, 0) + dropped
    )
    return replace(
        result,
        kept=result.kept - customers,
        train_customers=train,
        excluded=excluded,
        excluded_by_split=by_split,
    )


def commit_round(
    result: GateResult,
    *,
    consent: BranchConsent,
    run_id: str,
    server_round: int,
) -> RoundManifest:
    """Write the round manifest over the training rows kept (module docstring, step 3)."""
    customers = result.train_customers
    manifest = consent.archive().commit(
        run_id=run_id,
        server_round=server_round,
        customers=customers,
        manifest_fields={
            "branch": consent.branch,
            "purpose": result.snapshot.purpose,
            "snapshot_version": result.snapshot.version,
            "rows_before": result.rows_before,
            "rows_after": len(customers),
            "excluded": result.excluded,
        },
        created_at=result.snapshot.at,
    )
    logger.info(
        "consent gate, round %d: %d of %d training rows kept (%s), manifest %s",
        server_round,
        manifest.rows_after,
        manifest.rows_before,
        ", ".join(f"{n} {r}" for r, n in sorted(result.excluded.items())) or "none excluded",
        manifest.root[:16],
    )
    return manifest
