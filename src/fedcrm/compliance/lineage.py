"""Lineage: which runs, rounds and model versions used which branch's round manifest.

The coordinator records every branch's round manifest (:class:`RoundManifest`: root, consent
snapshot version, counts; never an id) and every released model (SHA-256 of the file, last round
it includes). Each record is written together with its audit event (``round-manifest`` or
``model-release``) in one transaction, so the lineage tables and the tamper-evident log cannot
disagree. A model released with ``last_round = r`` includes the updates of rounds ``1..r``.

For one customer the branch answers from its own salts and archived leaves
(:class:`~fedcrm.compliance.manifest.ManifestArchive`): :func:`customer_lineage` recomputes the
customer's commitment, checks it against every archived round (with an RFC 9162 inclusion proof
when present) and compares each root with the one the coordinator recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance.audit._events import AuditEvent
from fedcrm.compliance.audit._log import AuditLog
from fedcrm.compliance.db import equalities, record_from_row, transaction
from fedcrm.compliance.enums import EventType, Purpose
from fedcrm.compliance.errors import ManifestError
from fedcrm.compliance.manifest import ManifestArchive, Membership, RoundManifest
from fedcrm.compliance.models import ModelRelease, RoundManifestRow

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    """A stored round manifest with its run, round and audit-log index."""

    run_id: str
    round: int
    manifest: RoundManifest
    audit_index: int
    recorded_at: datetime

    def to_json(self) -> dict[str, Any]:
        """Return the record as JSON data."""
        return {
            "run_id": self.run_id,
            "round": self.round,
            "audit_index": self.audit_index,
            "recorded_at": self.recorded_at.isoformat(),
            **self.manifest.to_json(),
        }


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    """A released model: the hash of its file and the last round it includes."""

    run_id: str
    model: str
    sha256: str
    last_round: int
    file_name: str
    audit_index: int
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class RoundUse:
    """One use of a branch's data: a run's round, its manifest and the models that include it."""

    record: ManifestRecord
    models: tuple[ReleaseRecord, ...]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """Aggregates of one run's lineage (no per-customer data)."""

    run_id: str
    rounds: int
    branches: int
    manifests: int
    rows_used: int
    rows_excluded: int
    models: int


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file (read in chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_record(row: RoundManifestRow) -> ManifestRecord:
    return ManifestRecord(
        run_id=row.run_id,
        round=row.round,
        manifest=RoundManifest(
            branch=row.branch,
            purpose=Purpose(row.purpose),
            root=row.root,
            leaves=row.leaves,
            snapshot_version=row.snapshot_version,
            rows_before=row.rows_before,
            rows_after=row.rows_after,
            excluded=json.loads(row.excluded),
        ),
        audit_index=row.audit_index,
        recorded_at=row.recorded_at,
    )


class LineageStore:
    """Round manifests and model releases in the compliance store, each with its audit event.

    Args:
        session_factory: From :func:`fedcrm.compliance.db.open_store` (schema at head).
        audit: The audit log the events go to (default: the log in the same store).
    """

    def __init__(
        self, session_factory: sessionmaker[Session], *, audit: AuditLog | None = None
    ) -> None:
        self._factory = session_factory
        self._audit = audit if audit is not None else AuditLog(session_factory)

    def record_manifest(
        self, *, run_id: str, server_round: int, manifest: RoundManifest
    ) -> ManifestRecord:
        """Store a branch's round manifest and append its ``round-manifest`` audit event.

        Raises:
            ManifestError: The (run, round, branch) already has a manifest.
        """
        body = {"run_id": run_id, "round": server_round, **manifest.to_json()}
        with transaction(self._factory) as session:
            exists = session.execute(
                select(RoundManifestRow.id).where(
                    RoundManifestRow.run_id == run_id,
                    RoundManifestRow.round == server_round,
                    RoundManifestRow.branch == manifest.branch,
                )
            ).first()
            if exists is not None:
                raise ManifestError(
                    f"run {run_id} round {server_round} already has a manifest from "
                    f"{manifest.branch}"
                )
            entry = self._audit.append(AuditEvent(EventType.ROUND_MANIFEST, body), session=session)
            row = RoundManifestRow(
                run_id=run_id,
                round=server_round,
                branch=manifest.branch,
                purpose=manifest.purpose,
                root=manifest.root,
                leaves=manifest.leaves,
                snapshot_version=manifest.snapshot_version,
                rows_before=manifest.rows_before,
                rows_after=manifest.rows_after,
                excluded=json.dumps(dict(sorted(manifest.excluded.items()))),
                audit_index=entry.index,
                recorded_at=entry.time,
            )
            session.add(row)
            session.flush()
            return _manifest_record(row)

    def record_release(
        self, *, run_id: str, model: str, path: Path, last_round: int
    ) -> ReleaseRecord:
        """Store a released model's SHA-256 and append its ``model-release`` audit event.

        Raises:
            OSError: The model file cannot be read.
        """
        digest = file_sha256(path)
        body = {
            "run_id": run_id,
            "model": model,
            "sha256": digest,
            "last_round": last_round,
            "file": path.name,
        }
        with transaction(self._factory) as session:
            entry = self._audit.append(AuditEvent(EventType.MODEL_RELEASE, body), session=session)
            row = ModelRelease(
                run_id=run_id,
                model=model,
                sha256=digest,
                last_round=last_round,
                file_name=path.name,
                audit_index=entry.index,
                recorded_at=entry.time,
            )
            session.add(row)
            session.flush()
            return record_from_row(ReleaseRecord, row)

    def manifests(
        self, *, branch: str | None = None, run_id: str | None = None
    ) -> list[ManifestRecord]:
        """Return stored manifests, by run, round and branch."""
        query = (
            select(RoundManifestRow)
            .where(
                *equalities((RoundManifestRow.branch, branch), (RoundManifestRow.run_id, run_id))
            )
            .order_by(RoundManifestRow.run_id, RoundManifestRow.round, RoundManifestRow.branch)
        )
        with self._factory() as session:
            return [_manifest_record(row) for row in session.execute(query).scalars()]

    def releases(self, *, run_id: str | None = None) -> list[ReleaseRecord]:
        """Return released models, oldest first."""
        query = (
            select(ModelRelease)
            .where(*equalities((ModelRelease.run_id, run_id)))
            .order_by(ModelRelease.id)
        )
        with self._factory() as session:
            return [record_from_row(ReleaseRecord, row) for row in session.execute(query).scalars()]

    def uses(self, *, branch: str | None = None, run_id: str | None = None) -> list[RoundUse]:
        """Return every round that used a branch's data, with the models that include it."""
        releases = self.releases(run_id=run_id)
        return [
            RoundUse(
                record,
                tuple(
                    r
                    for r in releases
                    if r.run_id == record.run_id and r.last_round >= record.round
                ),
            )
            for record in self.manifests(branch=branch, run_id=run_id)
        ]

    def runs(self) -> list[RunSummary]:
        """Return per-run aggregates (counts only)."""
        query = select(
            RoundManifestRow.run_id,
            func.count(func.distinct(RoundManifestRow.round)),
            func.count(func.distinct(RoundManifestRow.branch)),
            func.count(),
            func.coalesce(func.sum(RoundManifestRow.rows_after), 0),
            func.coalesce(func.sum(RoundManifestRow.rows_before - RoundManifestRow.rows_after), 0),
        ).group_by(RoundManifestRow.run_id)
        releases: dict[str, int] = {}
        for release in self.releases():
            releases[release.run_id] = releases.get(release.run_id, 0) + 1
        with self._factory() as session:
            rows = session.execute(query.order_by(RoundManifestRow.run_id)).all()
        return [
            RunSummary(
                run_id=run_id,
                rounds=int(rounds),
                branches=int(branches),
                manifests=int(manifests),
                rows_used=int(used),
                rows_excluded=int(excluded),
                models=releases.get(run_id, 0),
            )
            for run_id, rounds, branches, manifests, used, excluded in rows
        ]


@dataclass(frozen=True, slots=True)
class CustomerRound:
    """Whether one customer's data reached one round, proven against the recorded root."""

    membership: Membership
    recorded_root: str | None
    """The root the coordinator recorded for this branch, run and round (None: not recorded)."""
    models: tuple[ReleaseRecord, ...]
    """Models that include this round (empty when the customer was not in it)."""

    @property
    def root_matches(self) -> bool:
        """Whether the branch's archived root is the one in the coordinator's records."""
        return self.recorded_root == self.membership.root


def customer_lineage(
    customer: str,
    archive: ManifestArchive,
    *,
    branch: str,
    store: LineageStore | None = None,
    run_id: str | None = None,
) -> list[CustomerRound]:
    """Answer, on the branch, which rounds and models a customer's data reached.

    Args:
        customer: The customer's pseudonymous id.
        archive: The branch's salts and archived manifests.
        branch: The branch's name in the coordinator's records.
        store: The coordinator's lineage records, to compare roots and list models.
        run_id: Only this run.

    Raises:
        ManifestError: The customer has no salt on this branch (never used, or erased), or the
            archive is damaged.
    """
    recorded: dict[tuple[str, int], ManifestRecord] = {}
    releases: list[ReleaseRecord] = []
    if store is not None:
        recorded = {(r.run_id, r.round): r for r in store.manifests(branch=branch, run_id=run_id)}
        releases = store.releases(run_id=run_id)
    result = []
    for archived in archive.rounds(run_id):
        membership = archive.membership(customer, archived)
        record = recorded.get((archived.run_id, archived.round))
        models: tuple[ReleaseRecord, ...] = ()
        if membership.included:
            models = tuple(
                r
                for r in releases
                if r.run_id == archived.run_id and r.last_round >= archived.round
            )
        result.append(
            CustomerRound(
                membership=membership,
                recorded_root=None if record is None else record.manifest.root,
                models=models,
            )
        )
    return result
