"""The consent registry's service: every change and every question goes through one class."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance.audit._log import AuditLog
from fedcrm.compliance.consent import _changes, _queries
from fedcrm.compliance.consent._checks import ACTOR, NAME, check_name
from fedcrm.compliance.consent._import import parse_csv
from fedcrm.compliance.consent._records import (
    ConsentRecordView,
    ConsentSnapshot,
    CoverageCount,
    ImportSummary,
    Notice,
    PurposeStatus,
    receipt,
)
from fedcrm.compliance.consent._requests import PurposeSelection, moment, requested_changes
from fedcrm.compliance.consent._rules import ERASED, NEEDS_RECORD, Change
from fedcrm.compliance.db import retry_on_conflict, transaction
from fedcrm.compliance.enums import Channel, CollectionMethod, ConsentStatus, Purpose, coerce_member
from fedcrm.compliance.errors import (
    ConsentImportError,
    ConsentNotFound,
    ConsentStateError,
    ConsentValidationError,
    ImportRowError,
)

logger = logging.getLogger(__name__)


class ConsentRegistry:
    """Repository and service of the consent registry.

    Args:
        session_factory: From :func:`fedcrm.compliance.db.open_store` (schema at head).
        audit: The audit log every change is written to (atomically, same transaction);
            defaults to the log in the same store.

    Example:
        >>> registry = ConsentRegistry(factory)  # doctest: +SKIP
        >>> registry.give(branch="b1", subject="p_0001",
        ...               purposes={Purpose.CHURN_MODEL_TRAINING: LegalBasis.CONSENT},
        ...               notice=notice, channel=Channel.WEB, actor="customer")  # doctest: +SKIP
        >>> registry.withdraw(branch="b1", subject="p_0001", channel=Channel.WEB,
        ...                   actor="customer")  # doctest: +SKIP
    """

    def __init__(
        self, session_factory: sessionmaker[Session], *, audit: AuditLog | None = None
    ) -> None:
        self._factory = session_factory
        self._audit = audit if audit is not None else AuditLog(session_factory)

    # -- changes ---------------------------------------------------------------------------

    def give(
        self,
        *,
        branch: str,
        subject: str,
        purposes: PurposeSelection,
        notice: Notice,
        channel: Channel | str,
        actor: str,
        collection_method: CollectionMethod | str = CollectionMethod.ONLINE_FORM,
        expires_at: datetime | None = None,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Record that the customer gave consent for ``purposes``.

        Args:
            branch: The branch holding the customer's data.
            subject: The customer's pseudonymous id.
            purposes: Purposes with their legal basis, or purposes alone (basis ``consent``).
            notice: The notice shown.
            channel: Where the customer gave it.
            actor: Who recorded it (``customer`` for self-service, or a staff pseudonym).
            collection_method: How it was captured.
            expires_at: When it lapses unless renewed (None: no expiry).
            at: When it was given (default now).

        Returns:
            The record after the change.

        Raises:
            ConsentValidationError: An argument is malformed (every problem listed).
            ConsentStateError: A purpose is already given, or the customer was erased.
        """
        changes = requested_changes(
            ConsentStatus.GIVEN,
            branch=branch,
            subject=subject,
            purposes=purposes,
            notice=notice,
            channel=channel,
            actor=actor,
            collection_method=collection_method,
            expires_at=expires_at,
            at=at,
        )
        return self._apply(branch, subject, changes)

    def refuse(
        self,
        *,
        branch: str,
        subject: str,
        purposes: PurposeSelection,
        notice: Notice,
        channel: Channel | str,
        actor: str,
        collection_method: CollectionMethod | str = CollectionMethod.ONLINE_FORM,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Record that the customer was asked and refused (arguments as :meth:`give`).

        Raises:
            ConsentValidationError: An argument is malformed.
            ConsentStateError: A purpose is currently given (withdraw it instead).
        """
        changes = requested_changes(
            ConsentStatus.REFUSED,
            branch=branch,
            subject=subject,
            purposes=purposes,
            notice=notice,
            channel=channel,
            actor=actor,
            collection_method=collection_method,
            at=at,
        )
        return self._apply(branch, subject, changes)

    def withdraw(
        self,
        *,
        branch: str,
        subject: str,
        channel: Channel | str,
        actor: str,
        purposes: Iterable[Purpose | str] | None = None,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Withdraw consent: as few arguments as giving, and every purpose by default.

        Takes effect at ``at`` (default now): :meth:`valid_for` excludes the customer for any
        later time. Legal basis, notice and collection method are carried over from the
        withdrawn consent.

        Args:
            branch: The customer's branch.
            subject: The customer's pseudonymous id.
            channel: Where the customer withdrew.
            actor: Who recorded it.
            purposes: The purposes to withdraw; None withdraws every validly given one.
            at: When (default now).

        Raises:
            ConsentNotFound: The customer has no record at this branch.
            ConsentStateError: A named purpose (or, with None, every purpose) is not given.
        """
        when = moment(at)
        if purposes is None:
            view = self.record(branch=branch, subject=subject)
            purposes = sorted(view.valid_purposes(when))
            if not purposes:
                raise ConsentStateError("nothing to withdraw: no purpose is validly given")
        changes = requested_changes(
            ConsentStatus.WITHDRAWN,
            branch=branch,
            subject=subject,
            purposes=list(purposes),
            channel=channel,
            actor=actor,
            at=when,
        )
        return self._apply(branch, subject, changes)

    def renew(
        self,
        *,
        branch: str,
        subject: str,
        channel: Channel | str,
        actor: str,
        expires_at: datetime | None,
        purposes: Iterable[Purpose | str] | None = None,
        notice: Notice | None = None,
        at: datetime | None = None,
    ) -> ConsentRecordView:
        """Renew given (possibly expired) consents, with a new expiry and optionally a new notice.

        Args:
            branch: The customer's branch.
            subject: The customer's pseudonymous id.
            channel: Where the customer renewed.
            actor: Who recorded it.
            expires_at: The new expiry (None: no expiry).
            purposes: The purposes to renew; None renews every given or renewed one.
            notice: The notice shown now; None keeps the previous one.
            at: When (default now).

        Raises:
            ConsentNotFound: The customer has no record at this branch.
            ConsentStateError: A purpose was never given, or was withdrawn or refused.
        """
        when = moment(at)
        if purposes is None:
            view = self.record(branch=branch, subject=subject)
            purposes = sorted(
                p
                for p, s in view.status_at(when).items()
                if s.status.is_valid or s.status is ConsentStatus.EXPIRED
            )
            if not purposes:
                raise ConsentStateError("nothing to renew: no purpose was given")
        changes = requested_changes(
            ConsentStatus.RENEWED,
            branch=branch,
            subject=subject,
            purposes=list(purposes),
            notice=notice,
            channel=channel,
            actor=actor,
            expires_at=expires_at,
            at=when,
        )
        return self._apply(branch, subject, changes)

    def _apply(self, branch: str, subject: str, changes: list[Change]) -> ConsentRecordView:
        """Check one customer's changes against the rules and write them, in one transaction."""
        event = changes[0].event

        def attempt() -> ConsentRecordView:
            with transaction(self._factory) as session:
                batch = _changes.load(session, branch, [subject])
                if subject in batch.erased:
                    raise ConsentStateError(ERASED)
                if event in NEEDS_RECORD and subject not in batch.records:
                    raise ConsentNotFound(
                        f"no consent record for this customer at branch {branch!r}"
                    )
                refused = _changes.plan_all(batch, {subject: changes})
                if refused:
                    raise ConsentStateError("; ".join(problem for _, problem in refused))
                _changes.write(session, batch, self._audit)
                return _queries.record_view(session, batch.records[subject])

        view = retry_on_conflict(attempt)
        logger.info("consent: %s for %d purpose(s) at branch %s", event, len(changes), branch)
        return view

    # -- bulk import -----------------------------------------------------------------------

    def import_csv(self, *, branch: str, source: str | io.TextIOBase, actor: str) -> ImportSummary:
        """Import a branch's consent CSV, all or nothing.

        Columns: :data:`CSV_REQUIRED_COLUMNS` and optionally :data:`CSV_OPTIONAL_COLUMNS`; any
        other column is refused (a consent file carries pseudonymous ids only). One row is one
        event for one customer and purpose; rows of the same customer and purpose must be in
        chronological order. Every row is checked (fields, then the status rules against the
        store and the earlier rows) before anything is kept.

        Args:
            branch: The branch the file comes from.
            source: The CSV text, or an open text file.
            actor: Who imports it (recorded on every event).

        Returns:
            What was written.

        Raises:
            ConsentValidationError: ``branch`` or ``actor`` is malformed.
            ConsentImportError: Listing every bad row with its line number; nothing was
                written.
        """
        problems: list[str] = []
        check_name(branch, "branch", problems, NAME)
        check_name(actor, "actor", problems, ACTOR)
        if problems:
            raise ConsentValidationError(problems)
        text_source = io.StringIO(source) if isinstance(source, str) else source
        by_subject, parse_errors, rows = parse_csv(text_source, actor)
        if parse_errors and not by_subject:
            raise ConsentImportError(parse_errors)

        def attempt() -> _changes.Batch:
            with transaction(self._factory) as session:
                batch = _changes.load(session, branch, by_subject)
                refused = _changes.plan_all(batch, by_subject)
                errors = parse_errors + [ImportRowError(c.line, problem) for c, problem in refused]
                if errors:
                    raise ConsentImportError(sorted(errors, key=lambda error: error.line))
                _changes.write(session, batch, self._audit)
                return batch

        batch = retry_on_conflict(attempt)
        logger.info(
            "consent: imported %d row(s), %d customer(s) at branch %s",
            rows,
            len(by_subject),
            branch,
        )
        return ImportSummary(
            branch, rows, len(batch.new_records), len(batch.planned), len(by_subject)
        )

    # -- queries ---------------------------------------------------------------------------

    def record(self, *, branch: str, subject: str) -> ConsentRecordView:
        """Return a customer's record with its whole history.

        Raises:
            ConsentNotFound: The customer has no record at this branch.
        """
        with self._factory() as session:
            return _queries.find_record(session, branch, subject)

    def status(
        self, *, branch: str, subject: str, at: datetime | None = None
    ) -> dict[Purpose, PurposeStatus]:
        """Return the status of every purpose of a customer at ``at`` (default now).

        Raises:
            ConsentNotFound: The customer has no record at this branch.
        """
        return self.record(branch=branch, subject=subject).status_at(moment(at))

    def valid_for(
        self, branch: str, purpose: Purpose | str, at: datetime | None = None
    ) -> frozenset[str]:
        """Return the pseudonymous ids whose consent for ``purpose`` is valid at ``at``.

        Valid means: latest event at ``at`` is given or renewed, not expired at ``at``, and
        the customer not erased. A purpose the customer never consented to is not valid.

        Args:
            branch: The branch.
            purpose: The run's declared purpose.
            at: The time of the decision (default now), e.g. a round's start.

        Raises:
            ConsentValidationError: Unknown purpose, or a naive ``at``.
        """
        chosen, moment = self._question(purpose, at)
        with self._factory() as session:
            return _queries.valid_ids(session, branch, chosen, moment)

    def snapshot(
        self, branch: str, purpose: Purpose | str, at: datetime | None = None
    ) -> ConsentSnapshot:
        """Return every known customer's consent state for ``purpose`` at ``at``, in one query.

        The consent gate's view of a branch: which customers are valid, and why the others are
        not (refused, withdrawn, expired, erased). A customer with no event for the purpose is
        absent. The snapshot's version is the audit-log index of the branch's latest consent
        change, so the exact registry state a round used can be proven from the audit log.

        Raises:
            ConsentValidationError: Unknown purpose, or a naive ``at``.
        """
        chosen, moment = self._question(purpose, at)
        with self._factory() as session:
            return _queries.snapshot(session, branch, chosen, moment)

    def _question(self, purpose: Purpose | str, at: datetime | None) -> tuple[Purpose, datetime]:
        """Check the purpose and time of a question about many customers."""
        problems: list[str] = []
        chosen = coerce_member(Purpose, purpose, "purpose", problems)
        if chosen is None:
            raise ConsentValidationError(problems)
        return chosen, moment(at)

    def coverage(
        self, *, at: datetime | None = None, branch: str | None = None
    ) -> list[CoverageCount]:
        """Return consent counts per branch and purpose at ``at`` (aggregates only, no ids)."""
        when = moment(at)
        with self._factory() as session:
            return _queries.coverage(session, when, branch)

    def branches(self) -> list[str]:
        """Return every branch with at least one consent record."""
        with self._factory() as session:
            return _queries.branches(session)

    def erase(self, *, branch: str, subject: str, reason: str) -> None:
        """Erase a customer: destroy their audit key (crypto-shredding); consent becomes invalid.

        Raises:
            ConsentNotFound: The customer has no record at this branch.
            SubjectShredded: The customer was already erased.
        """
        self.record(branch=branch, subject=subject)
        self._audit.shred_subject(subject, reason=reason)

    def receipt(self, *, branch: str, subject: str, at: datetime | None = None) -> dict[str, Any]:
        """Return the customer's consent receipt: plain JSON data to hand to the customer.

        It lists every purpose with its status, legal basis, notice and expiry, the whole
        history, and the audit-log indices of the events with the latest signed checkpoint,
        so the customer (or anyone they trust) can ask for inclusion proofs later.

        Raises:
            ConsentNotFound: The customer has no record at this branch.
        """
        when = moment(at)
        view = self.record(branch=branch, subject=subject)
        return receipt(view, when, self._audit.latest_checkpoint())
