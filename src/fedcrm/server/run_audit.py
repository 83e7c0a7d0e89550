"""The run's audit trail: what a federated run appends to the tamper-evident audit log.

One :class:`RunAudit` per run, over the run's compliance store (``audit-url``; in a simulation
``<run>/compliance.db``). It records, each as one audit event (RFC 9162 log, bodies encrypted
under the log key, no customer id anywhere):

* ``configuration-change``: the SHA-256 of the canonical run configuration at start, and again
  whenever it changes;
* ``round-manifest``: every branch's round manifest (root, consent snapshot, counts), also kept
  in the lineage table (`fedcrm.compliance.lineage`);
* ``refusal``: a branch refusing the run (consent) or a round (privacy budget);
* ``ledger-entry``: every admitted privacy-ledger entry;
* ``key-generation``: the HE key generation used (its key id and parameters);
* ``model-release``: the SHA-256 of the released model file and the last round it includes.

At the end of a run :meth:`RunAudit.seal` signs a checkpoint with the run's Ed25519 key,
exports the log and verifies the export offline, as ``fedcrm audit verify`` does.
"""

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcrm.compliance import EventType, LedgerEntry, Purpose, open_store
from fedcrm.compliance.audit import (
    AuditEvent,
    AuditLog,
    VerificationReport,
    canonical_json,
    generate_signing_key,
    load_signing_key,
    verify_export,
)
from fedcrm.compliance.lineage import LineageStore, ReleaseRecord
from fedcrm.compliance.manifest import ConsentRefusal, RoundManifest
from fedcrm.exceptions import ConfigError

logger = logging.getLogger(__name__)

RUN_CONFIG_PURPOSE = "consent-purpose"
RUN_CONFIG_AUDIT_URL = "audit-url"


@dataclass(frozen=True)
class ComplianceConfig:
    """A run's declared purpose and where its audit trail goes (run config keys).

    Args:
        purpose: ``consent-purpose``: every branch gates its rows on consent for it;
            ``None``: the run is not consent-gated.
        audit_url: ``audit-url``: the compliance store of the run's audit log and lineage;
            ``None``: no audit trail.
    """

    purpose: Purpose | None = None
    audit_url: str | None = None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ComplianceConfig":
        """Read ``consent-purpose`` and ``audit-url``.

        Raises:
            ConfigError: An unknown purpose.
        """
        raw = run_config.get(RUN_CONFIG_PURPOSE)
        purpose = None
        if raw not in (None, ""):
            try:
                purpose = Purpose(str(raw))
            except ValueError as exc:
                allowed = ", ".join(p.value for p in Purpose)
                raise ConfigError(f"consent-purpose must be one of {allowed}; got {raw!r}") from exc
        url = run_config.get(RUN_CONFIG_AUDIT_URL)
        return cls(purpose=purpose, audit_url=str(url) if url else None)


def config_sha256(config: Mapping[str, Any]) -> str:
    """The SHA-256 of a configuration's canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(dict(config))).hexdigest()


class RunAudit:
    """Appends a run's events to its audit log (see the module docstring).

    Args:
        url: The run's compliance store (migrated to head on open).
        run_id: The run's id in every event.
    """

    def __init__(self, url: str, run_id: str) -> None:
        factory = open_store(url)
        self.run_id = run_id
        self.log = AuditLog(factory)
        self.lineage = LineageStore(factory, audit=self.log)
        self._config_hash: str | None = None

    def _event(self, event_type: EventType, body: Mapping[str, Any]) -> int:
        entry = self.log.append(AuditEvent(event_type, {"run_id": self.run_id, **body}))
        return entry.index

    def configuration(self, config: Mapping[str, Any]) -> None:
        """Record the configuration's hash at start, and again whenever it changes.

        Secrets and store URLs are left out of the recorded settings (not of the hash input:
        callers pass only what the run uses).
        """
        digest = config_sha256(config)
        if digest == self._config_hash:
            return
        body: dict[str, Any] = {"sha256": digest, "config": dict(config)}
        if self._config_hash is not None:
            body["previous_sha256"] = self._config_hash
        self._event(EventType.CONFIGURATION_CHANGE, body)
        self._config_hash = digest

    def manifest(self, server_round: int, manifest: RoundManifest) -> None:
        """Record a branch's round manifest (lineage table and audit event, atomically)."""
        self.lineage.record_manifest(
            run_id=self.run_id, server_round=server_round, manifest=manifest
        )

    def consent_refusal(self, server_round: int, refusal: ConsentRefusal) -> None:
        """Record a branch's refusal of the run's purpose."""
        self._event(EventType.REFUSAL, {"round": server_round, **refusal.to_json()})

    def ledger_entry(self, entry: LedgerEntry) -> None:
        """Record a privacy-ledger entry (a refused one as a ``refusal``)."""
        admitted = entry.decision == "admitted"
        body = {"kind": "privacy-budget", **entry.to_json()}
        self._event(EventType.LEDGER_ENTRY if admitted else EventType.REFUSAL, body)

    def key_generation(self, *, key_id: str, generation: int, params: Mapping[str, Any]) -> None:
        """Record the HE key generation the run uses (its key id; never a key)."""
        body = {"key_id": key_id, "generation": generation, "params": dict(params)}
        self._event(EventType.KEY_GENERATION, body)

    def model_release(self, path: Path, *, model: str, last_round: int) -> ReleaseRecord:
        """Record a released model file's SHA-256 and the last round it includes."""
        return self.lineage.record_release(
            run_id=self.run_id, model=model, path=path, last_round=last_round
        )

    def seal(self, key_path: Path, export_path: Path) -> VerificationReport:
        """Sign a checkpoint (creating the run's key on first use), export and verify the log.

        The public key is ``<key_path>.pub``; the report says whether the export verified with
        it as the only trusted key.
        """
        key = load_signing_key(key_path) if key_path.exists() else generate_signing_key(key_path)
        signed = self.log.checkpoint(key)
        self.log.export(export_path)
        report = verify_export(export_path, trusted_keys={signed.public_key})
        logger.info(
            "audit log: %d entries, checkpoint signed, verification %s",
            signed.tree_size,
            "ok" if report.ok else "FAILED",
        )
        return report
