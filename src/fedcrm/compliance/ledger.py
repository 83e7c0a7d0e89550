"""The privacy ledger: one row per privacy-budget decision, and the cumulative ε it implies.

Columns follow issue 3 ("The privacy ledger"): run, round, branch, model, purpose, privacy unit,
neighbouring relation, mechanism, σ, clipping norm, sampling rate and method, steps, δ,
accountant and library version, ε of this event, cumulative ε, decision and reason, time.

Invariants enforced on every append (and by CHECK constraints in the database):
    * a cumulative ε never decreases for the same (branch, model, purpose);
    * a refused round spends nothing: its cumulative ε equals the current one, and it has a
      reason;
    * ranges: ``0 < δ < 1``, ``0 < q <= 1``, ``C > 0``, ``σ >= 0``, ``ε >= 0`` and finite.

Each append is one transaction that locks its (branch, model, purpose) total, with its audit
event when there is an audit log. See docs/compliance.md (why no concurrent writer can lower a
total).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.audit._events import AuditEvent
from fedcrm.compliance.audit._log import AuditLog
from fedcrm.compliance.db import equalities, record_from_row, retry_on_conflict, transaction
from fedcrm.compliance.enums import (
    Accountant,
    Decision,
    EventType,
    Mechanism,
    NeighbouringRelation,
    PrivacyUnit,
    SamplingMethod,
    coerce_member,
)
from fedcrm.compliance.errors import CumulativeEpsilonDecrease, DuplicateSpend, LedgerError
from fedcrm.compliance.models import PrivacyLedgerEntry, PrivacyLedgerTotal

logger = logging.getLogger(__name__)

REFUSAL_TOLERANCE = 1e-9
"""Relative slack allowed above the current total for a refused entry's cumulative ε."""

_MAX_REF = 128
_MAX_PURPOSE = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One privacy-budget decision (admitted or refused) for a branch, model and purpose.

    Args:
        run_id: The federated run.
        round: Server round (0-based or 1-based, as the run numbers them; ``>= 0``).
        branch: The branch whose data the ε protects (or the federation, for branch-level DP).
        model: The model trained, e.g. ``churn``.
        purpose: The processing purpose, e.g. ``churn-model-training``.
        privacy_unit: What the guarantee protects (record, customer or branch).
        neighbouring_relation: Add/remove or replace-one neighbours.
        mechanism: The randomised mechanism.
        noise_multiplier: σ, noise standard deviation divided by the clipping norm (``>= 0``).
        clipping_norm: C (``> 0``).
        sampling_rate: q (``0 < q <= 1``; exactly 1 with sampling method ``none``).
        sampling_method: How units were sampled.
        steps: Noisy steps in this event (``>= 0``).
        delta: δ (``0 < δ < 1``).
        accountant: The accountant that computed ε.
        library_version: The accounting library and its version, e.g. ``opacus 1.6.0``.
        epsilon: ε of this event alone (for a refusal: what the round would have cost).
        cumulative_epsilon: Total ε for (branch, model, purpose) after this event.
        decision: Admitted or refused.
        reason: Why (required for a refusal).
        epsilon_budget: The maximum ε in force when the decision was taken, if any.
        spend_id: The branch accountant's id of this spend (admitted DP-SGD rounds); one
            spend is stored once per (branch, model, purpose).
        dp_event: The mechanism as a serialised dp-accounting-style event (JSON), for
            recomputing ε independently.
        id: Set by the ledger when stored.
        recorded_at: Set by the ledger when stored (aware UTC).

    Raises:
        LedgerError: Listing every invalid field at once.
    """

    run_id: str
    round: int
    branch: str
    model: str
    purpose: str
    privacy_unit: PrivacyUnit
    neighbouring_relation: NeighbouringRelation
    mechanism: Mechanism
    noise_multiplier: float
    clipping_norm: float
    sampling_rate: float
    sampling_method: SamplingMethod
    steps: int
    delta: float
    accountant: Accountant
    library_version: str
    epsilon: float
    cumulative_epsilon: float
    decision: Decision
    reason: str | None = None
    epsilon_budget: float | None = None
    spend_id: str | None = None
    dp_event: str | None = None
    id: int | None = None
    recorded_at: datetime | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        vocabularies: tuple[tuple[str, type[StrEnum]], ...] = (
            ("privacy_unit", PrivacyUnit),
            ("neighbouring_relation", NeighbouringRelation),
            ("mechanism", Mechanism),
            ("sampling_method", SamplingMethod),
            ("accountant", Accountant),
            ("decision", Decision),
        )
        for name, enum_cls in vocabularies:
            value = coerce_member(enum_cls, getattr(self, name), name, problems)
            object.__setattr__(self, name, value)
        for name, limit in (
            ("run_id", _MAX_REF),
            ("branch", _MAX_REF),
            ("model", _MAX_REF),
            ("purpose", _MAX_PURPOSE),
            ("library_version", _MAX_REF),
        ):
            text = getattr(self, name)
            if not isinstance(text, str) or not text.strip() or len(text) > limit:
                problems.append(f"{name} must be a non-empty string of at most {limit} characters")
        for name in ("round", "steps"):
            number = getattr(self, name)
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                problems.append(f"{name} must be an integer >= 0; got {number!r}")
        self._check_ranges(problems)
        if self.decision == Decision.REFUSED and not (self.reason and self.reason.strip()):
            problems.append("a refused entry must state its reason")
        if self.spend_id is not None and (
            not isinstance(self.spend_id, str) or not 0 < len(self.spend_id) <= 64
        ):
            problems.append("spend_id must be a string of 1 to 64 characters or unset")
        if self.recorded_at is not None and self.recorded_at.utcoffset() is None:
            problems.append("recorded_at must be timezone-aware")
        if problems:
            raise LedgerError(
                f"invalid ledger entry ({len(problems)} problem(s)): " + "; ".join(problems)
            )

    def _check_ranges(self, problems: list[str]) -> None:
        def real(name: str) -> float | None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name} must be a number; got {value!r}")
                return None
            if not math.isfinite(value):
                problems.append(f"{name} must be finite; got {value!r}")
                return None
            return float(value)

        sigma = real("noise_multiplier")
        if sigma is not None and sigma < 0:
            problems.append(f"noise_multiplier (σ) must be >= 0; got {sigma!r}")
        norm = real("clipping_norm")
        if norm is not None and norm <= 0:
            problems.append(f"clipping_norm (C) must be > 0; got {norm!r}")
        rate = real("sampling_rate")
        if rate is not None and not 0 < rate <= 1:
            problems.append(f"sampling_rate (q) must be in (0, 1]; got {rate!r}")
        delta = real("delta")
        if delta is not None and not 0 < delta < 1:
            problems.append(f"delta (δ) must be in (0, 1); got {delta!r}")
        for name in ("epsilon", "cumulative_epsilon"):
            value = real(name)
            if value is not None and value < 0:
                problems.append(f"{name} must be >= 0; got {value!r}")
        if self.epsilon_budget is not None:
            budget = real("epsilon_budget")
            if budget is not None and budget <= 0:
                problems.append(f"epsilon_budget must be > 0; got {budget!r}")
        if self.sampling_method == SamplingMethod.NONE and self.sampling_rate != 1:
            problems.append("sampling method 'none' means sampling_rate 1")

    def to_json(self) -> dict[str, Any]:
        """Return the entry as plain JSON data (enums as values, time as ISO 8601)."""
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, StrEnum):
                value = value.value
            data[item.name] = value
        return data


@dataclass(frozen=True, slots=True)
class LedgerTotal:
    """The current cumulative ε of one (branch, model, purpose)."""

    branch: str
    model: str
    purpose: str
    cumulative_epsilon: float
    updated_at: datetime


_STORED_FIELDS = tuple(
    item.name for item in dataclasses.fields(LedgerEntry) if item.name not in ("id", "recorded_at")
)
"""The fields of an entry its caller sets; the ledger sets ``id`` and ``recorded_at``."""


class PrivacyLedger:
    """Repository of the privacy ledger.

    Args:
        session_factory: From :func:`fedcrm.compliance.db.open_store`.
        audit: If given, every entry is also appended to this audit log, atomically.
    """

    def __init__(
        self, session_factory: sessionmaker[Session], *, audit: AuditLog | None = None
    ) -> None:
        self._factory = session_factory
        self._audit = audit

    def append(self, entry: LedgerEntry) -> LedgerEntry:
        """Store one entry after checking the cumulative-ε invariants.

        Args:
            entry: The decision to record (``id`` and ``recorded_at`` are ignored).

        Returns:
            The stored entry, with ``id`` and ``recorded_at`` set.

        Raises:
            CumulativeEpsilonDecrease: Its cumulative ε is below the recorded one.
            DuplicateSpend: Its spend id is already recorded for this branch.
            LedgerError: A refusal claims to spend budget, or the append kept conflicting with
                concurrent writers.
        """

        def append_once() -> LedgerEntry:
            with transaction(self._factory) as session:
                return self._append(session, entry)

        try:
            stored = retry_on_conflict(append_once)
        except IntegrityError as exc:
            raise LedgerError(f"ledger append kept conflicting: {exc}") from exc
        logger.info(
            "ledger: %s round %d, branch total ε=%.6g (event ε=%.6g)",
            stored.decision,
            stored.round,
            stored.cumulative_epsilon,
            stored.epsilon,
        )
        return stored

    def _append(self, session: Session, entry: LedgerEntry) -> LedgerEntry:
        total = session.execute(
            select(PrivacyLedgerTotal)
            .where(
                PrivacyLedgerTotal.branch == entry.branch,
                PrivacyLedgerTotal.model == entry.model,
                PrivacyLedgerTotal.purpose == entry.purpose,
            )
            .with_for_update()
        ).scalar_one_or_none()
        current = 0.0 if total is None else total.cumulative_epsilon
        if entry.cumulative_epsilon < current:
            raise CumulativeEpsilonDecrease(
                branch=entry.branch,
                model=entry.model,
                purpose=entry.purpose,
                current=current,
                proposed=entry.cumulative_epsilon,
            )
        if entry.decision == Decision.REFUSED and entry.cumulative_epsilon > current + (
            REFUSAL_TOLERANCE * max(1.0, current)
        ):
            raise LedgerError(
                f"a refused round spends no budget: its cumulative ε must equal the current "
                f"{current!r}, got {entry.cumulative_epsilon!r}"
            )
        if (
            entry.spend_id is not None
            and session.execute(
                select(PrivacyLedgerEntry.id).where(
                    PrivacyLedgerEntry.branch == entry.branch,
                    PrivacyLedgerEntry.model == entry.model,
                    PrivacyLedgerEntry.purpose == entry.purpose,
                    PrivacyLedgerEntry.spend_id == entry.spend_id,
                )
            ).first()
        ):
            raise DuplicateSpend(
                f"spend {entry.spend_id} of branch {entry.branch!r} is already in the ledger: "
                "a replayed or re-sent report is not counted twice"
            )
        now = utcnow()
        row = PrivacyLedgerEntry(
            **{name: getattr(entry, name) for name in _STORED_FIELDS}, recorded_at=now
        )
        session.add(row)
        session.flush()
        new_total = max(current, float(entry.cumulative_epsilon))
        if total is None:
            session.add(
                PrivacyLedgerTotal(
                    branch=entry.branch,
                    model=entry.model,
                    purpose=entry.purpose,
                    cumulative_epsilon=new_total,
                    last_entry_id=row.id,
                    updated_at=now,
                )
            )
        else:
            total.cumulative_epsilon = new_total
            total.last_entry_id = row.id
            total.updated_at = now
        session.flush()
        stored = dataclasses.replace(entry, id=row.id, recorded_at=now)
        if self._audit is not None:
            event_type = (
                EventType.LEDGER_ENTRY if entry.decision == Decision.ADMITTED else EventType.REFUSAL
            )
            self._audit.append(AuditEvent(event_type, stored.to_json(), time=now), session=session)
        return stored

    def cumulative_epsilon(self, branch: str, model: str, purpose: str) -> float:
        """Return the cumulative ε recorded for (branch, model, purpose); 0.0 if none."""
        with self._factory() as session:
            total = session.get(PrivacyLedgerTotal, (branch, model, purpose))
            return 0.0 if total is None else total.cumulative_epsilon

    def totals(self, *, branch: str | None = None) -> list[LedgerTotal]:
        """Return the cumulative ε of every (branch, model, purpose), optionally one branch's."""
        with self._factory() as session:
            query = (
                select(PrivacyLedgerTotal)
                .where(*equalities((PrivacyLedgerTotal.branch, branch)))
                .order_by(
                    PrivacyLedgerTotal.branch, PrivacyLedgerTotal.model, PrivacyLedgerTotal.purpose
                )
            )
            return [
                LedgerTotal(
                    row.branch, row.model, row.purpose, row.cumulative_epsilon, row.updated_at
                )
                for row in session.execute(query).scalars()
            ]

    def entries(
        self,
        *,
        run_id: str | None = None,
        branch: str | None = None,
        model: str | None = None,
        purpose: str | None = None,
        decision: Decision | None = None,
    ) -> list[LedgerEntry]:
        """Return the entries matching every given filter, in the order they were recorded."""
        query = (
            select(PrivacyLedgerEntry)
            .where(
                *equalities(
                    (PrivacyLedgerEntry.run_id, run_id),
                    (PrivacyLedgerEntry.branch, branch),
                    (PrivacyLedgerEntry.model, model),
                    (PrivacyLedgerEntry.purpose, purpose),
                    (PrivacyLedgerEntry.decision, decision),
                )
            )
            .order_by(PrivacyLedgerEntry.id)
        )
        with self._factory() as session:
            return [record_from_row(LedgerEntry, row) for row in session.execute(query).scalars()]

    def by_run(self, run_id: str) -> list[LedgerEntry]:
        """Return every entry of one run."""
        return self.entries(run_id=run_id)

    def by_branch(self, branch: str) -> list[LedgerEntry]:
        """Return every entry of one branch."""
        return self.entries(branch=branch)

    def by_model(self, model: str) -> list[LedgerEntry]:
        """Return every entry of one model."""
        return self.entries(model=model)
