"""Round manifests: a Merkle root over salted commitments of the customers a round used.

Each customer's commitment is ``SHA-256("fedcrm-manifest-v1" 0x00 || salt || id)`` with a salt
that never leaves the branch (:class:`SaltStore`); the root is the RFC 9162 Merkle Tree Hash of
the sorted leaf hashes. Only the root, the consent-snapshot version and counts leave the branch;
the archive (:class:`ManifestArchive`) proves later whether a customer was in a round. See
docs/compliance.md (the scheme, and what deleting a salt does).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedcrm.compliance._files import write_atomically
from fedcrm.compliance.audit._merkle import HASH_SIZE, MerkleTree, leaf_hash, verify_inclusion
from fedcrm.compliance.enums import Purpose
from fedcrm.compliance.errors import ManifestError, malformed_as

SALT_BYTES = 16
"""Bytes of a customer's commitment salt (128 bits: the commitment cannot be brute-forced)."""

MANIFEST_VERSION = 1
"""Version of the commitment scheme and of the record layout."""

_COMMITMENT_CONTEXT = b"fedcrm-manifest-v1\x00"
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_HEX_HASH = re.compile(r"[0-9a-f]{64}")

# Record keys (the ClientApp's reply and the server's parser share them through this module).
KEY_ADMITTED = "consent-admitted"
KEY_BRANCH = "consent-branch"
KEY_PURPOSE = "consent-purpose"
KEY_REASON_CODE = "consent-refusal-code"
KEY_REASON = "consent-refusal-reason"
KEY_ROOT = "manifest-root"
KEY_LEAVES = "manifest-leaves"
KEY_SNAPSHOT = "manifest-consent-snapshot"
KEY_ROWS_BEFORE = "manifest-rows-before"
KEY_ROWS_AFTER = "manifest-rows-after"
KEY_VERSION = "manifest-version"
EXCLUDED_PREFIX = "manifest-excluded-"


class ExclusionReason(StrEnum):
    """Why the consent gate left a row out of a round."""

    NO_CONSENT = "no-consent"
    """No consent event for the run's purpose (never asked, or no record at all)."""
    REFUSED = "refused"
    WITHDRAWN = "withdrawn"
    """Withdrawn consent; an objection is recorded as a withdrawal of the purpose."""
    EXPIRED = "expired"
    ERASED = "erased"
    """The customer was erased (their audit key crypto-shredded)."""
    RETENTION = "retention"
    """The latest consent decision is older than the branch's retention period."""
    PRIVACY_BUDGET = "privacy-budget"
    """The privacy filter: the customer's own ε would pass the run's customer budget."""


class RefusalCode(StrEnum):
    """Why a branch refuses a whole run (purpose binding)."""

    PURPOSE_NOT_COLLECTED = "purpose-not-collected"
    """The branch's data is not collected for the run's purpose."""
    NO_VALID_CONSENT = "no-valid-consent"
    """No row of the branch has valid consent for the run's purpose."""


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ManifestError(f"{what} must be 1-128 characters from [A-Za-z0-9_.:-], got {value!r}")


def commitment(salt: bytes, customer: str) -> bytes:
    """Return the salted commitment of one pseudonymous customer id.

    Raises:
        ManifestError: The salt does not have :data:`SALT_BYTES` bytes.
    """
    if len(salt) != SALT_BYTES:
        raise ManifestError(f"a commitment salt has {SALT_BYTES} bytes, got {len(salt)}")
    return hashlib.sha256(_COMMITMENT_CONTEXT + salt + customer.encode("utf-8")).digest()


def manifest_leaves(customers: Iterable[str], salts: Mapping[str, bytes]) -> list[bytes]:
    """Return the sorted RFC 9162 leaf hashes of the customers' commitments.

    Raises:
        ManifestError: A customer has no salt, or appears twice.
    """
    chosen = list(customers)
    if len(set(chosen)) != len(chosen):
        raise ManifestError("a customer appears twice in a round manifest")
    missing = [c for c in chosen if c not in salts]
    if missing:
        raise ManifestError(f"{len(missing)} customer(s) have no commitment salt")
    return sorted(leaf_hash(commitment(salts[c], c)) for c in chosen)


def merkle_root(leaves: list[bytes]) -> bytes:
    """Return the Merkle Tree Hash of already-hashed, sorted leaves (RFC 9162 §2.1.1)."""
    return MerkleTree(leaves).root()


class SaltStore:
    """The branch's commitment salts: one random salt per pseudonymous customer, 0600 JSON.

    Args:
        path: The salts file (created with mode 0600 on first save).

    Notes:
        The file never leaves the branch. It is rewritten atomically (a 0600 temporary file in
        the same folder, then ``os.replace``), so a crash never leaves half a file. Deleting a
        customer's salt (:meth:`forget`) makes every commitment to them unlinkable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, bytes]:
        """Return every stored salt (empty when the file does not exist yet).

        Raises:
            ManifestError: The file is not a salts file, or is readable by others.
        """
        if not self.path.exists():
            return {}
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ManifestError(
                f"{self.path}: salts file has mode {mode:o}; it must be 0600 (chmod 600)"
            )
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            salts = {str(c): bytes.fromhex(str(s)) for c, s in raw["salts"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"{self.path}: not a readable salts file: {exc}") from exc
        if any(len(s) != SALT_BYTES for s in salts.values()):
            raise ManifestError(f"{self.path}: a salt does not have {SALT_BYTES} bytes")
        return salts

    def salts_for(self, customers: Iterable[str]) -> dict[str, bytes]:
        """Return the salts of ``customers``, creating (and saving) those not seen before."""
        salts = self.load()
        new = {c: secrets.token_bytes(SALT_BYTES) for c in set(customers) if c not in salts}
        if new:
            salts.update(new)
            self._save(salts)
        return salts

    def forget(self, customer: str) -> bool:
        """Delete a customer's salt (after an erasure); return whether there was one."""
        salts = self.load()
        if salts.pop(customer, None) is None:
            return False
        self._save(salts)
        return True

    def _save(self, salts: Mapping[str, bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": MANIFEST_VERSION, "salts": {c: s.hex() for c, s in salts.items()}}
        write_atomically(self.path, [json.dumps(data, sort_keys=True)])


@dataclass(frozen=True, slots=True)
class RoundManifest:
    """What a branch commits to for one round: root, consent-snapshot version and counts.

    Args:
        branch: The branch's name (as in the consent registry and the ledger).
        purpose: The run's declared purpose.
        root: Hex Merkle root over the sorted commitments.
        leaves: How many customers the root commits to.
        snapshot_version: Audit index of the branch's latest consent change (-1: none).
        rows_before: Training rows before the gate.
        rows_after: Training rows after the gate (one row per customer: ``== leaves``).
        excluded: Rows left out, by :class:`ExclusionReason` value.
    """

    branch: str
    purpose: Purpose
    root: str
    leaves: int
    snapshot_version: int
    rows_before: int
    rows_after: int
    excluded: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name(self.branch, "branch")
        object.__setattr__(self, "purpose", _purpose(self.purpose))
        if not isinstance(self.root, str) or not _HEX_HASH.fullmatch(self.root):
            raise ManifestError("manifest root must be a lower-case hex SHA-256")
        for name in ("leaves", "rows_before", "rows_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ManifestError(f"manifest {name} must be a non-negative integer")
        if self.snapshot_version < -1:
            raise ManifestError("manifest consent-snapshot version must be >= -1")
        reasons = {r.value for r in ExclusionReason}
        for reason, count in self.excluded.items():
            if reason not in reasons or not isinstance(count, int) or count < 0:
                raise ManifestError(f"invalid exclusion count {reason!r}: {count!r}")
        if self.rows_after > self.rows_before:
            raise ManifestError("a gate cannot add rows: rows_after > rows_before")
        if self.rows_before - self.rows_after != sum(self.excluded.values()):
            raise ManifestError("excluded counts do not add up to rows_before - rows_after")

    def to_record(self) -> dict[str, int | str]:
        """Return the flat record a training reply carries (no customer id in it)."""
        record: dict[str, int | str] = {
            KEY_VERSION: MANIFEST_VERSION,
            KEY_ADMITTED: 1,
            KEY_BRANCH: self.branch,
            KEY_PURPOSE: self.purpose.value,
            KEY_ROOT: self.root,
            KEY_LEAVES: self.leaves,
            KEY_SNAPSHOT: self.snapshot_version,
            KEY_ROWS_BEFORE: self.rows_before,
            KEY_ROWS_AFTER: self.rows_after,
        }
        for reason, count in sorted(self.excluded.items()):
            record[EXCLUDED_PREFIX + reason] = count
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundManifest:
        """Rebuild a manifest from :meth:`to_record` output.

        Raises:
            ManifestError: A key is missing or a value is invalid.
        """
        try:
            if record[KEY_VERSION] != MANIFEST_VERSION:
                raise ManifestError(f"unknown manifest version {record[KEY_VERSION]!r}")
            excluded = {
                key.removeprefix(EXCLUDED_PREFIX): _int(value)
                for key, value in record.items()
                if key.startswith(EXCLUDED_PREFIX)
            }
            return cls(
                branch=str(record[KEY_BRANCH]),
                purpose=_purpose(record[KEY_PURPOSE]),
                root=str(record[KEY_ROOT]),
                leaves=_int(record[KEY_LEAVES]),
                snapshot_version=_int(record[KEY_SNAPSHOT]),
                rows_before=_int(record[KEY_ROWS_BEFORE]),
                rows_after=_int(record[KEY_ROWS_AFTER]),
                excluded=excluded,
            )
        except KeyError as exc:
            raise ManifestError(f"round manifest lacks {exc.args[0]!r}") from exc

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as JSON data (for the audit log and the branch's archive)."""
        return {
            "branch": self.branch,
            "purpose": self.purpose.value,
            "root": self.root,
            "leaves": self.leaves,
            "consent_snapshot_version": self.snapshot_version,
            "rows_before": self.rows_before,
            "rows_after": self.rows_after,
            "excluded": dict(sorted(self.excluded.items())),
            "commitment": "SHA-256('fedcrm-manifest-v1' 0x00 || salt || customer id), "
            "RFC 9162 leaves sorted by value",
        }


@dataclass(frozen=True, slots=True)
class ConsentRefusal:
    """A branch's structured refusal of a run whose purpose its consent does not cover."""

    branch: str
    purpose: Purpose
    code: RefusalCode
    reason: str

    def __post_init__(self) -> None:
        _check_name(self.branch, "branch")
        object.__setattr__(self, "purpose", _purpose(self.purpose))
        try:
            object.__setattr__(self, "code", RefusalCode(self.code))
        except ValueError as exc:
            raise ManifestError(f"unknown refusal code {self.code!r}") from exc
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ManifestError("a refusal needs a reason")

    def to_record(self) -> dict[str, int | str]:
        """Return the flat record a refusing reply carries."""
        return {
            KEY_VERSION: MANIFEST_VERSION,
            KEY_ADMITTED: 0,
            KEY_BRANCH: self.branch,
            KEY_PURPOSE: self.purpose.value,
            KEY_REASON_CODE: self.code.value,
            KEY_REASON: self.reason,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ConsentRefusal:
        """Rebuild a refusal from :meth:`to_record` output.

        Raises:
            ManifestError: A key is missing or a value is invalid.
        """
        with malformed_as(ManifestError, "consent refusal", lacks="lacks"):
            return cls(
                branch=str(record[KEY_BRANCH]),
                purpose=_purpose(record[KEY_PURPOSE]),
                code=RefusalCode(str(record[KEY_REASON_CODE])),
                reason=str(record[KEY_REASON]),
            )

    def to_json(self) -> dict[str, str]:
        """Return the refusal as JSON data (for the audit log)."""
        return {
            "kind": "consent",
            "branch": self.branch,
            "purpose": self.purpose.value,
            "code": self.code.value,
            "reason": self.reason,
        }


def parse_consent_record(record: Mapping[str, Any]) -> RoundManifest | ConsentRefusal:
    """Parse a reply's consent record: a manifest (admitted) or a refusal.

    Raises:
        ManifestError: The record is neither.
    """
    admitted = record.get(KEY_ADMITTED)
    if admitted == 1:
        return RoundManifest.from_record(record)
    if admitted == 0:
        return ConsentRefusal.from_record(record)
    raise ManifestError(f"consent record has no valid {KEY_ADMITTED!r} flag")


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ManifestError(f"expected an integer, got {value!r}")
    return int(value)


def _purpose(value: Any) -> Purpose:
    try:
        return Purpose(value)
    except ValueError as exc:
        allowed = ", ".join(p.value for p in Purpose)
        raise ManifestError(f"purpose must be one of {allowed}; got {value!r}") from exc


@dataclass(frozen=True, slots=True)
class Membership:
    """Whether a customer's commitment is in a round's manifest, with its inclusion proof."""

    run_id: str
    round: int
    root: str
    included: bool
    leaf_index: int | None = None
    tree_size: int = 0
    proof: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ArchivedRound:
    """One round as the branch archived it: the public manifest and when it was written."""

    run_id: str
    round: int
    manifest: RoundManifest
    created_at: str


class ManifestArchive:
    """The branch's archive of its manifests: per round the manifest, per root its leaves.

    Layout under ``folder``::

        salts.json                     commitment salts (0600, see SaltStore)
        leaves/<root>.txt              the sorted leaf hashes of a root, one hex per line
        runs/<run id>/round-NNNN.json  the round's manifest and time

    Leaves are stored once per distinct root (consecutive rounds with the same customers share
    one file). No customer id is stored: a membership check needs the customer's salt.

    Args:
        folder: The branch's consent folder (created on first write).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.salts = SaltStore(folder / "salts.json")

    def commit(
        self,
        *,
        run_id: str,
        server_round: int,
        customers: Iterable[str],
        manifest_fields: Mapping[str, Any],
        created_at: datetime,
    ) -> RoundManifest:
        """Commit to ``customers`` for a round: salts, leaves, root, and the archived manifest.

        Args:
            run_id: The run's id (as the server names it).
            server_round: The round.
            customers: The pseudonymous ids of the rows used (one row per customer).
            manifest_fields: The other :class:`RoundManifest` fields (branch, purpose,
                snapshot_version, rows_before, rows_after, excluded).
            created_at: When the gate decided (aware).

        Raises:
            ManifestError: Invalid run id, round or fields.
        """
        _check_name(run_id, "run id")
        if server_round < 0:
            raise ManifestError(f"round must be >= 0, got {server_round}")
        chosen = list(customers)
        leaves = manifest_leaves(chosen, self.salts.salts_for(chosen))
        root = merkle_root(leaves).hex()
        manifest = RoundManifest(root=root, leaves=len(leaves), **manifest_fields)
        leaves_file = self.folder / "leaves" / f"{root}.txt"
        if not leaves_file.exists():
            leaves_file.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(leaves_file, (leaf.hex() + "\n" for leaf in leaves))
        round_file = self.folder / "runs" / run_id / f"round-{server_round:04d}.json"
        round_file.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "run_id": run_id,
            "round": server_round,
            "created_at": created_at.isoformat(),
            "manifest": manifest.to_json(),
            "record": manifest.to_record(),
        }
        write_atomically(round_file, [json.dumps(data, indent=2, sort_keys=True)])
        return manifest

    def rounds(self, run_id: str | None = None) -> list[ArchivedRound]:
        """Return every archived round (of one run, or of all), by run and round.

        Raises:
            ManifestError: An archived file is malformed.
        """
        base = self.folder / "runs"
        if run_id is not None:
            _check_name(run_id, "run id")
        pattern = f"{run_id}/round-*.json" if run_id else "*/round-*.json"
        found = []
        for path in sorted(base.glob(pattern)):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                found.append(
                    ArchivedRound(
                        run_id=str(data["run_id"]),
                        round=int(data["round"]),
                        manifest=RoundManifest.from_record(data["record"]),
                        created_at=str(data["created_at"]),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ManifestError(f"{path}: not a readable round manifest: {exc}") from exc
        return sorted(found, key=lambda r: (r.run_id, r.round))

    def leaves(self, root: str) -> list[bytes]:
        """Return the sorted leaves of ``root``, checked against it.

        Raises:
            ManifestError: The leaves file is missing, malformed, or does not hash to ``root``.
        """
        if not _HEX_HASH.fullmatch(root):
            raise ManifestError("manifest root must be a lower-case hex SHA-256")
        path = self.folder / "leaves" / f"{root}.txt"
        try:
            leaves = [bytes.fromhex(line) for line in path.read_text().split()]
        except (OSError, ValueError) as exc:
            raise ManifestError(f"{path}: leaves unreadable: {exc}") from exc
        if any(len(leaf) != HASH_SIZE for leaf in leaves) or leaves != sorted(leaves):
            raise ManifestError(f"{path}: leaves are malformed or not sorted")
        if merkle_root(leaves).hex() != root:
            raise ManifestError(f"{path}: the stored leaves do not hash to root {root}")
        return leaves

    def membership(self, customer: str, archived: ArchivedRound) -> Membership:
        """Check whether ``customer`` is in a round's manifest; prove it if so.

        Raises:
            ManifestError: The customer has no salt on this branch (never committed, or the
                salt was deleted after an erasure), or the archive is damaged.
        """
        salts = self.salts.load()
        if customer not in salts:
            raise ManifestError(
                "this customer has no commitment salt on this branch: never used in a round, "
                "or erased"
            )
        root = archived.manifest.root
        leaves = self.leaves(root)
        leaf = leaf_hash(commitment(salts[customer], customer))
        position = _find(leaves, leaf)
        if position is None:
            return Membership(
                archived.run_id, archived.round, root, included=False, tree_size=len(leaves)
            )
        tree = MerkleTree(leaves)
        path = tree.inclusion_proof(position)
        verify_inclusion(leaf, position, len(leaves), path, bytes.fromhex(root))
        return Membership(
            archived.run_id,
            archived.round,
            root,
            included=True,
            leaf_index=position,
            tree_size=len(leaves),
            proof=tuple(node.hex() for node in path),
        )


def _find(leaves: list[bytes], leaf: bytes) -> int | None:
    low, high = 0, len(leaves)
    while low < high:
        mid = (low + high) // 2
        if leaves[mid] < leaf:
            low = mid + 1
        else:
            high = mid
    if low < len(leaves) and hmac.compare_digest(leaves[low], leaf):
        return low
    return None


def verify_membership(
    *, customer: str, salt: bytes, root: str, leaf_index: int, tree_size: int, proof: list[str]
) -> None:
    """Verify a branch's claim that ``customer`` was in the round with ``root`` (offline).

    The verifier needs the customer's salt (disclosed by the branch for this check only), the
    root recorded in the audit log, and the inclusion proof.

    Raises:
        ProofError: The proof does not lead to ``root``.
        ManifestError: Malformed inputs.
    """
    if not _HEX_HASH.fullmatch(root):
        raise ManifestError("manifest root must be a lower-case hex SHA-256")
    try:
        nodes = [bytes.fromhex(node) for node in proof]
    except ValueError as exc:
        raise ManifestError(f"proof node is not hex: {exc}") from exc
    leaf = leaf_hash(commitment(salt, customer))
    verify_inclusion(leaf, leaf_index, tree_size, nodes, bytes.fromhex(root))
