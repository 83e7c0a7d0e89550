"""Export of the audit log and its offline verifier.

The export is a JSON-lines file (UTF-8, one JSON object per line):

1. ``{"kind": "header", "format": "fedcrm-audit-log", "version": 1, ...}`` with the entry and
   checkpoint counts and every public key that signed a checkpoint;
2. one ``{"kind": "entry", ...}`` per leaf, in log order: the leaf fields of
   :class:`~fedcrm.compliance.audit._events.LogEntry` (ciphertext only) and the leaf hash the
   log recorded when the entry was appended;
3. one ``{"kind": "checkpoint", ...}`` per signed checkpoint, oldest first.

The verifier needs nothing but this file (and, ideally, the log's public key obtained out of
band): it recomputes every leaf hash and the Merkle tree (RFC 9162 §2.1.1), checks every
checkpoint's Ed25519 signature and root, and, given a checkpoint saved earlier (``--since``),
checks with a consistency proof (RFC 9162 §2.1.4) that the log still extends it. Every problem is
collected with the entry index or checkpoint it concerns; nothing stops at the first one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from fedcrm.compliance._files import write_atomically
from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._events import LogEntry, b64encode, canonical_json, format_time
from fedcrm.compliance.audit._merkle import MerkleTree, leaf_hash, verify_consistency
from fedcrm.compliance.audit._signing import SignedCheckpoint
from fedcrm.compliance.errors import (
    AuditVerificationError,
    ExportFormatError,
    ProofError,
    SignatureError,
)

EXPORT_FORMAT = "fedcrm-audit-log"
EXPORT_VERSION = 1


class IssueKind(StrEnum):
    """What part of the log a verification problem concerns."""

    FORMAT = "format"
    ENTRY = "entry"
    CHECKPOINT = "checkpoint"
    SIGNATURE = "signature"
    CONSISTENCY = "consistency"


@dataclass(frozen=True, slots=True)
class VerificationIssue:
    """One problem found by the verifier.

    Args:
        kind: The part of the log concerned.
        message: What is wrong, in words an auditor can act on.
        entry_index: The entry concerned (0-based leaf index), if any.
        checkpoint: Position of the checkpoint concerned among the export's checkpoints
            (0-based, oldest first), if any; ``-1`` for the ``--since`` checkpoint.
        line: Line of the export file, if known.
    """

    kind: IssueKind
    message: str
    entry_index: int | None = None
    checkpoint: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.entry_index is not None:
            where.append(f"entry {self.entry_index}")
        if self.checkpoint is not None:
            where.append(
                "--since checkpoint" if self.checkpoint < 0 else f"checkpoint #{self.checkpoint}"
            )
        prefix = f"[{self.kind}{', ' + ', '.join(where) if where else ''}] "
        return prefix + self.message


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """The result of verifying an audit log.

    ``ok`` is true only when no issue was found. ``warnings`` are facts an auditor should know
    that are not failures (entries not yet covered by a checkpoint, an untrusted key).
    """

    source: str
    tree_size: int
    root_hash: bytes
    checkpoints_total: int
    checkpoints_valid: int
    latest_checkpoint: SignedCheckpoint | None
    since_checkpoint: SignedCheckpoint | None
    keys_trusted: bool
    issues: tuple[VerificationIssue, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Whether the log verified without any issue."""
        return not self.issues

    def raise_for_issues(self) -> None:
        """Raise :class:`AuditVerificationError` if any issue was found."""
        if self.issues:
            raise AuditVerificationError(self)

    def summary(self) -> str:
        """Return a human-readable, multi-line summary."""
        lines = [
            f"audit log: {self.source}",
            f"entries: {self.tree_size}, root hash (recomputed): {self.root_hash.hex()}",
            f"checkpoints: {self.checkpoints_valid} of {self.checkpoints_total} valid",
        ]
        if self.latest_checkpoint is not None:
            cp = self.latest_checkpoint
            lines.append(
                f"latest valid checkpoint: size {cp.tree_size} at "
                f"{cp.checkpoint.timestamp.isoformat()} signed by key {cp.key_id[:16]}…"
            )
        if self.since_checkpoint is not None:
            lines.append(
                f"consistency checked from checkpoint of size {self.since_checkpoint.tree_size}"
            )
        lines.extend(f"warning: {text}" for text in self.warnings)
        lines.extend(f"FAIL {issue}" for issue in self.issues)
        lines.append("result: OK" if self.ok else f"result: FAILED ({len(self.issues)} problem(s))")
        return "\n".join(lines)


def write_export(
    path: Path,
    entries: Sequence[tuple[LogEntry, bytes]],
    checkpoints: Sequence[SignedCheckpoint],
) -> None:
    """Write an export file atomically (a temporary file renamed over ``path``).

    Args:
        path: Destination file.
        entries: Every entry in log order with the leaf hash recorded when it was appended.
        checkpoints: Every signed checkpoint, oldest first.
    """
    keys = sorted({b64encode(cp.public_key) for cp in checkpoints})
    header = {
        "kind": "header",
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "hash_algorithm": "sha-256",
        "tree": "rfc9162-merkle-tree",
        "leaf_encoding": "canonical-json-v1",
        "body_encryption": "AES-256-GCM",
        "signature_algorithm": "ed25519",
        "exported_at": format_time(utcnow()),
        "entries": len(entries),
        "checkpoints": len(checkpoints),
        "public_keys": keys,
    }
    lines = itertools.chain(
        [header],
        ({"kind": "entry", **entry.to_json(), "leaf_hash": leaf.hex()} for entry, leaf in entries),
        ({"kind": "checkpoint", **cp.to_json()} for cp in checkpoints),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, (json.dumps(line, sort_keys=True) + "\n" for line in lines))


@dataclass(frozen=True, slots=True)
class EntryRecord:
    """An entry as read from an export: its JSON, the recorded leaf hash (hex) and its line."""

    data: Mapping[str, Any]
    recorded_hash: str | None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    """A checkpoint as read from an export: its JSON and its line."""

    data: Mapping[str, Any]
    line: int | None = None


@dataclass
class _Collector:
    issues: list[VerificationIssue] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, kind: IssueKind, message: str, **where: int | None) -> None:
        self.issues.append(VerificationIssue(kind, message, **where))


def _leaf_hashes(entries: Sequence[EntryRecord], out: _Collector) -> tuple[MerkleTree, list[int]]:
    """Recompute the leaf hashes; return the tree and the entries that differ from the record."""
    tree = MerkleTree()
    altered: list[int] = []
    for position, record in enumerate(entries):
        data, recorded, line = record.data, record.recorded_hash, record.line
        try:
            entry = LogEntry.from_json(data)
        except ExportFormatError as exc:
            out.add(IssueKind.FORMAT, f"unreadable entry: {exc}", entry_index=position, line=line)
            # Hash something that cannot match any honest leaf, so the roots fail as they must.
            tree.append(leaf_hash(b"\xffunreadable" + canonical_json(str(dict(data)))))
            altered.append(position)
            continue
        if entry.index != position:
            out.add(
                IssueKind.ENTRY,
                f"entry in position {position} carries index {entry.index}: entries were "
                "dropped, inserted or reordered",
                entry_index=position,
                line=line,
            )
        computed = entry.leaf_hash()
        if recorded is not None and computed.hex() != recorded:
            out.add(
                IssueKind.ENTRY,
                "entry content does not match the leaf hash recorded when it was appended: "
                "it was altered afterwards",
                entry_index=position,
                line=line,
            )
            altered.append(position)
        tree.append(computed)
    return tree, altered


def _check_checkpoints(
    tree: MerkleTree,
    raw: Sequence[CheckpointRecord],
    trusted_keys: Collection[bytes] | None,
    altered: Sequence[int],
    out: _Collector,
) -> tuple[list[SignedCheckpoint], SignedCheckpoint | None]:
    valid: list[SignedCheckpoint] = []
    previous: SignedCheckpoint | None = None
    for position, record in enumerate(raw):
        data, line = record.data, record.line
        try:
            cp = SignedCheckpoint.from_json(data)
        except ExportFormatError as exc:
            out.add(
                IssueKind.FORMAT, f"unreadable checkpoint: {exc}", checkpoint=position, line=line
            )
            continue
        ok = True
        try:
            cp.verify(trusted_keys)
        except SignatureError as exc:
            out.add(IssueKind.SIGNATURE, str(exc), checkpoint=position, line=line)
            ok = False
        if cp.tree_size > tree.size:
            out.add(
                IssueKind.CHECKPOINT,
                f"checkpoint covers {cp.tree_size} entries but the log has only {tree.size}: "
                "entries were removed from the end",
                checkpoint=position,
                line=line,
            )
            ok = False
        elif tree.root(cp.tree_size) != cp.root_hash:
            suspects = [index for index in altered if index < cp.tree_size]
            detail = (
                f"; altered entries: {', '.join(map(str, suspects))}"
                if suspects
                else "; an entry before it was altered, dropped or reordered"
            )
            out.add(
                IssueKind.CHECKPOINT,
                f"signed root of size {cp.tree_size} does not match the entries{detail}",
                checkpoint=position,
                line=line,
            )
            ok = False
        if previous is not None and (
            cp.tree_size < previous.tree_size
            or cp.checkpoint.timestamp_ms < previous.checkpoint.timestamp_ms
        ):
            out.add(
                IssueKind.CHECKPOINT,
                "checkpoint is older or smaller than the one before it: checkpoints must only grow",
                checkpoint=position,
                line=line,
            )
            ok = False
        previous = cp
        if ok:
            valid.append(cp)
    latest = valid[-1] if valid else None
    if latest is None:
        out.add(
            IssueKind.CHECKPOINT,
            "no valid signed checkpoint: nothing in this log is proven by a signature",
        )
    elif latest.tree_size < tree.size:
        out.warnings.append(
            f"entries {latest.tree_size}..{tree.size - 1} are not yet covered by a signed "
            "checkpoint"
        )
    return valid, latest


def _check_since(
    tree: MerkleTree,
    since: SignedCheckpoint,
    latest: SignedCheckpoint | None,
    export_keys: Collection[bytes],
    trusted_keys: Collection[bytes] | None,
    out: _Collector,
) -> None:
    try:
        since.verify(trusted_keys)
    except SignatureError as exc:
        out.add(IssueKind.SIGNATURE, str(exc), checkpoint=-1)
        return
    if trusted_keys is None and export_keys and since.public_key not in export_keys:
        out.add(
            IssueKind.SIGNATURE,
            "the --since checkpoint is signed by a key that signed none of the log's checkpoints",
            checkpoint=-1,
        )
    if since.tree_size > tree.size:
        out.add(
            IssueKind.CONSISTENCY,
            f"the log has {tree.size} entries, fewer than the {since.tree_size} of the "
            "checkpoint saved earlier: entries were removed",
            checkpoint=-1,
        )
        return
    if latest is not None and latest.tree_size >= since.tree_size:
        second, second_root = latest.tree_size, latest.root_hash
    else:
        second, second_root = tree.size, tree.root()
        out.warnings.append(
            "no valid signed checkpoint at or after the --since checkpoint; consistency was "
            "checked against the recomputed root of the exported entries"
        )
    proof = tree.consistency_proof(since.tree_size, second)
    try:
        verify_consistency(since.tree_size, second, since.root_hash, second_root, proof)
    except ProofError as exc:
        out.add(
            IssueKind.CONSISTENCY,
            f"the log is not consistent with the checkpoint of size {since.tree_size} saved "
            f"earlier: {exc}",
            checkpoint=-1,
        )


def verify_records(
    entries: Sequence[EntryRecord],
    checkpoints: Sequence[CheckpointRecord],
    *,
    since_checkpoint: SignedCheckpoint | None = None,
    trusted_keys: Collection[bytes] | None = None,
    source: str = "records",
    initial_issues: Sequence[VerificationIssue] = (),
) -> VerificationReport:
    """Verify parsed log records (the core of :func:`verify_export`).

    Args:
        entries: The entries in log order.
        checkpoints: The checkpoints, oldest first.
        since_checkpoint: A checkpoint saved earlier; the log must extend it.
        trusted_keys: Raw Ed25519 public keys to trust; None trusts the keys in the records
            (self-consistency only; the report then carries a warning).
        source: Name of what was verified, for the report.
        initial_issues: Problems already found while reading the records.

    Returns:
        The report; ``report.ok`` tells whether everything verified.
    """
    out = _Collector(issues=list(initial_issues))
    tree, altered = _leaf_hashes(entries, out)
    valid, latest = _check_checkpoints(tree, checkpoints, trusted_keys, altered, out)
    if trusted_keys is None:
        out.warnings.append(
            "no trusted public key was given: signatures were checked with the keys embedded in "
            "the log, which proves integrity only if those keys are the log's real keys "
            "(pass --public-key)"
        )
    if since_checkpoint is not None:
        export_keys = {cp.public_key for cp in valid}
        _check_since(tree, since_checkpoint, latest, export_keys, trusted_keys, out)
    return VerificationReport(
        source=source,
        tree_size=tree.size,
        root_hash=tree.root(),
        checkpoints_total=len(checkpoints),
        checkpoints_valid=len(valid),
        latest_checkpoint=latest,
        since_checkpoint=since_checkpoint,
        keys_trusted=trusted_keys is not None,
        issues=tuple(out.issues),
        warnings=tuple(out.warnings),
    )


def _read_export(
    path: Path,
) -> tuple[list[EntryRecord], list[CheckpointRecord], list[VerificationIssue]]:
    entries: list[EntryRecord] = []
    checkpoints: list[CheckpointRecord] = []
    issues: list[VerificationIssue] = []
    header: Mapping[str, Any] | None = None
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise ExportFormatError(f"cannot read the audit log export {path}: {exc}") from exc
    with handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                issues.append(
                    VerificationIssue(IssueKind.FORMAT, f"not JSON: {exc.msg}", line=number)
                )
                if header is not None:
                    # Keep the entry's position so later indexes stay meaningful.
                    entries.append(EntryRecord({"unparsable_line": text}, None, number))
                continue
            if not isinstance(data, dict):
                issues.append(VerificationIssue(IssueKind.FORMAT, "not a JSON object", line=number))
                continue
            kind = data.pop("kind", None)
            if kind == "header":
                if header is not None:
                    issues.append(VerificationIssue(IssueKind.FORMAT, "second header", line=number))
                header = data
            elif kind == "entry":
                recorded = data.pop("leaf_hash", None)
                entries.append(
                    EntryRecord(data, recorded if isinstance(recorded, str) else None, number)
                )
            elif kind == "checkpoint":
                checkpoints.append(CheckpointRecord(data, number))
            else:
                issues.append(
                    VerificationIssue(
                        IssueKind.FORMAT, f"unknown record kind {kind!r}", line=number
                    )
                )
    if header is None:
        raise ExportFormatError(f"{path} has no header line: not a fedcrm audit log export")
    if header.get("format") != EXPORT_FORMAT or header.get("version") != EXPORT_VERSION:
        raise ExportFormatError(
            f"{path} is {header.get('format')!r} version {header.get('version')!r}; this "
            f"verifier reads {EXPORT_FORMAT!r} version {EXPORT_VERSION}"
        )
    if header.get("entries") != len(entries):
        issues.append(
            VerificationIssue(
                IssueKind.FORMAT,
                f"the header announces {header.get('entries')} entries but the file holds "
                f"{len(entries)}",
                line=1,
            )
        )
    return entries, checkpoints, issues


def verify_export(
    path: str | Path,
    since_checkpoint: SignedCheckpoint | str | Path | None = None,
    *,
    trusted_keys: Collection[bytes] | None = None,
    strict: bool = False,
) -> VerificationReport:
    """Verify an exported audit log offline.

    Recomputes every leaf hash and the Merkle tree (RFC 9162 §2.1.1), checks each checkpoint's
    Ed25519 signature and root, and with ``since_checkpoint`` checks a consistency proof
    (RFC 9162 §2.1.4.2) from that earlier checkpoint to the latest valid one.

    Args:
        path: The export written by :meth:`AuditLog.export`.
        since_checkpoint: A checkpoint saved earlier (object or JSON file path).
        trusted_keys: Raw Ed25519 public keys of the log, obtained out of band.
        strict: Raise :class:`AuditVerificationError` instead of returning a failed report.

    Returns:
        The report, listing every problem with its entry index or checkpoint.

    Raises:
        ExportFormatError: The file is missing or not an audit-log export at all.
        AuditVerificationError: ``strict`` is true and a problem was found.
    """
    source = Path(path)
    since = (
        SignedCheckpoint.load(Path(since_checkpoint))
        if isinstance(since_checkpoint, (str, Path))
        else since_checkpoint
    )
    entries, checkpoints, issues = _read_export(source)
    report = verify_records(
        entries,
        checkpoints,
        since_checkpoint=since,
        trusted_keys=trusted_keys,
        source=str(source),
        initial_issues=issues,
    )
    if strict:
        report.raise_for_issues()
    return report
