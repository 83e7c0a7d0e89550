"""Exceptions raised by :mod:`fedcrm.compliance`.

Every class derives from :class:`fedcrm.exceptions.FedCrmError`, so callers can catch the
project's errors in one place.

Hierarchy::

    FedCrmError
    └── ComplianceError            base of every compliance-store error
        ├── StoreError             the store cannot be opened or migrated
        ├── ApiKeyError            an API key cannot be created (bad role or branch)
        ├── ConsentError           base of the consent-registry errors
        │   ├── ConsentValidationError
        │   │                      a consent change is malformed (every problem listed)
        │   ├── ConsentImportError a bulk CSV import was refused (every bad row listed)
        │   ├── ConsentNotFound    no consent record for this customer at this branch
        │   └── ConsentStateError  the change does not follow from the current status
        ├── ManifestError          a round manifest or a branch's manifest file is malformed
        ├── LedgerError            a privacy-ledger entry is refused
        │   └── CumulativeEpsilonDecrease
        │                          an entry would lower a cumulative ε
        └── AuditError             base of the audit-log errors
            ├── ProofError         a Merkle proof does not verify (RFC 9162 §2.1.3-2.1.4)
            ├── SignatureError     a checkpoint signature is invalid or the key is untrusted
            ├── KeyFileError       a signing-key file is missing, malformed or too permissive
            ├── BodyUnavailable    an event body cannot be decrypted (its key was shredded)
            ├── SubjectShredded    an event was appended for a subject whose key is destroyed
            ├── AuditIntegrityError the stored log no longer matches its signed checkpoints
            ├── ExportFormatError  an exported log file is malformed
            └── AuditVerificationError
                                   an offline verification found problems (``strict=True``)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from fedcrm.exceptions import FedCrmError


class ComplianceError(FedCrmError):
    """Base class of the compliance store's errors."""


class StoreError(ComplianceError):
    """The compliance store cannot be opened, connected to or migrated."""


class ApiKeyError(ComplianceError):
    """An API key cannot be created: unknown role, or a branch where none belongs."""


class ConsentError(ComplianceError):
    """Base class of the consent registry's errors."""


class ConsentValidationError(ConsentError):
    """A consent change is malformed.

    Args:
        problems: Every problem found, each naming the field and the constraint.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(
            f"invalid consent change ({len(self.problems)} problem(s)): " + "; ".join(problems)
        )


@dataclass(frozen=True, slots=True)
class ImportRowError:
    """One rejected row of a consent CSV: its line number in the file (header = 1) and why."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class ConsentImportError(ConsentError):
    """A bulk consent import was refused as a whole; nothing was written.

    Args:
        errors: Every rejected row, in file order.
    """

    def __init__(self, errors: Sequence[ImportRowError]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {error}" for error in self.errors)
        super().__init__(
            f"consent import refused, nothing imported: {len(self.errors)} bad row(s):\n{lines}"
        )


class ConsentNotFound(ConsentError):
    """There is no consent record for this customer at this branch."""


class ConsentStateError(ConsentError):
    """The change does not follow from the current status (e.g. withdrawing nothing)."""


class ManifestError(ComplianceError):
    """A round manifest (or a branch's salts or manifest file) is malformed or inconsistent."""


class LedgerError(ComplianceError):
    """A privacy-ledger entry is invalid or breaks a ledger invariant."""


class CumulativeEpsilonDecrease(LedgerError):
    """An entry would lower the cumulative ε of its (branch, model, purpose).

    Args:
        branch: Branch of the refused entry.
        model: Model of the refused entry.
        purpose: Processing purpose of the refused entry.
        current: Cumulative ε already recorded.
        proposed: Cumulative ε the refused entry carried.
    """

    def __init__(
        self, *, branch: str, model: str, purpose: str, current: float, proposed: float
    ) -> None:
        self.branch = branch
        self.model = model
        self.purpose = purpose
        self.current = current
        self.proposed = proposed
        super().__init__(
            f"refused: cumulative ε for branch={branch!r}, model={model!r}, "
            f"purpose={purpose!r} is already {current!r}; an entry with cumulative ε "
            f"{proposed!r} would lower it (privacy loss never decreases)"
        )


class DuplicateSpend(LedgerError):
    """A branch's spend (its accountant's spend id) is already in the ledger."""


class AuditError(ComplianceError):
    """Base class of the audit log's errors."""


class ProofError(AuditError):
    """A Merkle inclusion or consistency proof does not verify."""


class SignatureError(AuditError):
    """A checkpoint signature is invalid, or was made by an untrusted key."""


class KeyFileError(AuditError):
    """A signing-key file is missing, malformed or readable by other users."""


class BodyUnavailable(AuditError):
    """An event body cannot be decrypted: its key was shredded or the ciphertext altered."""


class SubjectShredded(AuditError):
    """An event names a subject whose body key was destroyed (crypto-shredded)."""


class AuditIntegrityError(AuditError):
    """The stored log does not match its own leaf hashes or signed checkpoints."""


class ExportFormatError(AuditError):
    """An exported audit-log file is malformed or of an unknown version."""


class IssueReport(Protocol):
    """What :class:`AuditVerificationError` needs of a report: the problems it found.

    :class:`fedcrm.compliance.audit.VerificationReport` is one; the protocol keeps this module
    below the audit package (the audit package imports these errors, never the reverse).
    """

    @property
    def issues(self) -> Sequence[object]:
        """Every problem found, each printable on one line."""
        ...


class AuditVerificationError(AuditError):
    """An offline verification found at least one problem.

    Args:
        report: The full report (a :class:`~fedcrm.compliance.audit.VerificationReport`);
            ``report.issues`` lists every problem found.
    """

    def __init__(self, report: IssueReport) -> None:
        self.report = report
        lines = "\n".join(f"  - {issue}" for issue in report.issues)
        super().__init__(
            f"audit log verification failed, {len(report.issues)} problem(s):\n{lines}"
        )


@contextmanager
def malformed_as(
    error: type[ComplianceError], what: str, *, lacks: str = "lacks field"
) -> Iterator[None]:
    """Turn the ``KeyError`` or ``ValueError`` of reading a record into ``error``.

    A missing key becomes ``"<what> <lacks> 'key'"`` and a bad value ``"invalid <what>: ..."``;
    this package's own errors pass through unchanged.
    """
    try:
        yield
    except KeyError as exc:
        raise error(f"{what} {lacks} {exc.args[0]!r}") from exc
    except ValueError as exc:
        raise error(f"invalid {what}: {exc}") from exc
