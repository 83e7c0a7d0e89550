"""The consent registry on SQLite and PostgreSQL: history, withdrawal, purposes, expiry, erasure."""

from __future__ import annotations

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import (
    BodyUnavailable,
    Channel,
    ConsentNotFound,
    ConsentRegistry,
    ConsentStateError,
    ConsentStatus,
    ConsentValidationError,
    EventType,
    LegalBasis,
    Notice,
    Purpose,
    transaction,
)
from fedcrm.compliance.audit import AuditLog

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOTICE = Notice.from_text("crm-privacy-notice", "2026-01", "We train models on your data...")
CHURN = Purpose.CHURN_MODEL_TRAINING
RECO = Purpose.RECOMMENDATION_TRAINING
MARKETING = Purpose.MARKETING_PROFILING


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def give(
    registry: ConsentRegistry,
    subject: str,
    purposes: list[Purpose],
    at: datetime = T0,
    branch: str = "b1",
    expires_at: datetime | None = None,
) -> None:
    registry.give(
        branch=branch,
        subject=subject,
        purposes=purposes,
        notice=NOTICE,
        channel=Channel.WEB,
        actor="customer",
        at=at,
        expires_at=expires_at,
    )


@pytest.fixture
def registry(any_store: sessionmaker[Session]) -> ConsentRegistry:
    return ConsentRegistry(any_store)


def test_give_records_history_and_an_audit_event_per_purpose(
    any_store: sessionmaker[Session],
) -> None:
    log = AuditLog(any_store)
    registry = ConsentRegistry(any_store, audit=log)
    view = registry.give(
        branch="b1",
        subject="p_0001",
        purposes={CHURN: LegalBasis.CONSENT, RECO: "explicit-consent"},
        notice=NOTICE,
        channel="in-branch",
        actor="b1/clerk-17",
        at=T0,
        expires_at=day(365),
    )
    assert [(h.purpose, h.event) for h in view.history] == [
        (CHURN, ConsentStatus.GIVEN),
        (RECO, ConsentStatus.GIVEN),
    ]
    assert view.history[1].legal_basis is LegalBasis.EXPLICIT_CONSENT
    assert view.valid_purposes(day(1)) == {CHURN, RECO}
    # Every change is an audit event about the pseudonymous subject, body decryptable.
    for entry in view.history:
        logged = log.entry(entry.audit_index)
        assert logged.event_type is EventType.CONSENT_CHANGE
        assert logged.subject == "p_0001"
        body = log.read_body(entry.audit_index)
        assert body["purpose"] == entry.purpose.value
        assert body["event"] == "given"
        assert body["notice"]["sha256"] == NOTICE.sha256
        assert body["record_id"] == view.record_id


def test_withdrawal_excludes_the_id_from_then_on(registry: ConsentRegistry) -> None:
    give(registry, "p_a", [CHURN, RECO])
    give(registry, "p_b", [CHURN])
    assert registry.valid_for("b1", CHURN, day(1)) == {"p_a", "p_b"}

    registry.withdraw(
        branch="b1", subject="p_a", channel=Channel.PHONE, actor="customer", at=day(2)
    )

    assert registry.valid_for("b1", CHURN, day(1)) == {"p_a", "p_b"}  # the past is unchanged
    for later in (day(2), day(3), day(400)):
        assert registry.valid_for("b1", CHURN, later) == {"p_b"}
        assert registry.valid_for("b1", RECO, later) == set()  # withdraw() took every purpose
    # Giving again later makes it valid again, from then on only.
    give(registry, "p_a", [CHURN], at=day(10))
    assert registry.valid_for("b1", CHURN, day(5)) == {"p_b"}
    assert registry.valid_for("b1", CHURN, day(10)) == {"p_a", "p_b"}


def test_withdrawing_one_purpose_keeps_the_others(registry: ConsentRegistry) -> None:
    give(registry, "p_a", [CHURN, RECO])
    registry.withdraw(
        branch="b1", subject="p_a", purposes=[RECO], channel="web", actor="customer", at=day(1)
    )
    assert registry.valid_for("b1", CHURN, day(2)) == {"p_a"}
    assert registry.valid_for("b1", RECO, day(2)) == set()


def test_a_purpose_not_covered_is_not_valid(registry: ConsentRegistry) -> None:
    give(registry, "p_a", [CHURN])
    registry.refuse(
        branch="b1",
        subject="p_b",
        purposes=[CHURN, MARKETING],
        notice=NOTICE,
        channel="web",
        actor="customer",
        at=T0,
    )
    assert registry.valid_for("b1", CHURN, day(1)) == {"p_a"}
    assert registry.valid_for("b1", RECO, day(1)) == set()
    assert registry.valid_for("b1", MARKETING, day(1)) == set()
    assert registry.valid_for("b2", CHURN, day(1)) == set()  # another branch
    assert registry.valid_for("b1", CHURN, T0 - timedelta(seconds=1)) == set()  # before
    with pytest.raises(ConsentValidationError, match="purpose must be one of"):
        registry.valid_for("b1", "ad-targeting")


def test_history_is_never_lost(registry: ConsentRegistry) -> None:
    give(registry, "p_a", [CHURN], expires_at=day(30))
    snapshots = [registry.record(branch="b1", subject="p_a").history]
    registry.renew(
        branch="b1", subject="p_a", channel="web", actor="customer", expires_at=day(90), at=day(20)
    )
    snapshots.append(registry.record(branch="b1", subject="p_a").history)
    registry.withdraw(branch="b1", subject="p_a", channel="web", actor="customer", at=day(40))
    snapshots.append(registry.record(branch="b1", subject="p_a").history)
    give(registry, "p_a", [CHURN], at=day(50))
    snapshots.append(registry.record(branch="b1", subject="p_a").history)
    for earlier, later in itertools.pairwise(snapshots):
        assert later[: len(earlier)] == earlier  # a prefix: nothing rewritten or dropped
        assert len(later) == len(earlier) + 1
    assert [h.event for h in snapshots[-1]] == [
        ConsentStatus.GIVEN,
        ConsentStatus.RENEWED,
        ConsentStatus.WITHDRAWN,
        ConsentStatus.GIVEN,
    ]
    # Status at any past time is still answerable.
    view = registry.record(branch="b1", subject="p_a")
    assert view.status_at(day(10))[CHURN].status is ConsentStatus.GIVEN
    assert view.status_at(day(25))[CHURN].status is ConsentStatus.RENEWED
    assert view.status_at(day(45))[CHURN].status is ConsentStatus.WITHDRAWN


def test_the_database_refuses_to_rewrite_history(any_store: sessionmaker[Session]) -> None:
    registry = ConsentRegistry(any_store)
    give(registry, "p_a", [CHURN])
    statements = [
        "UPDATE consent_events SET event = 'withdrawn'",
        "DELETE FROM consent_events",
        "UPDATE consent_records SET subject_ref = 'p_b'",
        "DELETE FROM consent_records",
    ]
    engine = any_store.kw["bind"]
    if engine.dialect.name == "postgresql":
        statements += ["TRUNCATE consent_events CASCADE", "TRUNCATE consent_records CASCADE"]
    for statement in statements:
        with pytest.raises(DBAPIError, match="append-only"), transaction(any_store) as session:
            session.execute(text(statement))
    assert len(registry.record(branch="b1", subject="p_a").history) == 1


def test_expiry_and_renewal(registry: ConsentRegistry) -> None:
    give(registry, "p_a", [CHURN], expires_at=day(30))
    assert registry.valid_for("b1", CHURN, day(29)) == {"p_a"}
    assert registry.valid_for("b1", CHURN, day(30)) == set()
    status = registry.status(branch="b1", subject="p_a", at=day(31))[CHURN]
    assert status.status is ConsentStatus.EXPIRED
    assert not status.valid
    with pytest.raises(ConsentStateError, match="nothing to withdraw"):
        registry.withdraw(branch="b1", subject="p_a", channel="web", actor="customer", at=day(31))
    registry.renew(
        branch="b1", subject="p_a", channel="web", actor="customer", expires_at=day(400), at=day(31)
    )
    assert registry.valid_for("b1", CHURN, day(31)) == {"p_a"}
    assert registry.valid_for("b1", CHURN, day(200)) == {"p_a"}


def test_erasure_invalidates_consent_and_shreds_the_bodies(
    any_store: sessionmaker[Session],
) -> None:
    log = AuditLog(any_store)
    registry = ConsentRegistry(any_store, audit=log)
    give(registry, "p_a", [CHURN])
    give(registry, "p_b", [CHURN])
    index = registry.record(branch="b1", subject="p_a").history[0].audit_index
    registry.erase(branch="b1", subject="p_a", reason="erasure request 42")
    assert registry.valid_for("b1", CHURN, day(1)) == {"p_b"}
    assert registry.record(branch="b1", subject="p_a").erased
    with pytest.raises(BodyUnavailable):
        log.read_body(index)
    with pytest.raises(ConsentStateError, match="erased"):
        give(registry, "p_a", [RECO], at=day(2))
    coverage = {c.purpose: c for c in registry.coverage(at=day(1))}
    assert (coverage[CHURN].valid, coverage[CHURN].erased) == (1, 1)
    assert log.inclusion_proof(index).leaf_hash == log.entry(index).leaf_hash()
    assert log.verify().tree_size == log.size()


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        ("given", "given", "already given; renew"),
        ("given", "refused", "withdraw it instead"),
        ("refused", "withdrawn", "nothing to withdraw"),
        ("withdrawn", "renewed", "give it anew"),
        ("given", "backdated", "before the latest recorded event"),
    ],
    ids=["give-twice", "refuse-while-given", "withdraw-refused", "renew-withdrawn", "backdate"],
)
def test_changes_must_follow_from_the_status(
    registry: ConsentRegistry, first: str, then: str, message: str
) -> None:
    if first == "refused":
        registry.refuse(
            branch="b1",
            subject="p_a",
            purposes=[CHURN],
            notice=NOTICE,
            channel="web",
            actor="customer",
            at=T0,
        )
    else:
        give(registry, "p_a", [CHURN])
        if first == "withdrawn":
            registry.withdraw(
                branch="b1", subject="p_a", channel="web", actor="customer", at=day(1)
            )
    before = registry.record(branch="b1", subject="p_a").history
    with pytest.raises(ConsentStateError, match=message):
        if then == "given":
            give(registry, "p_a", [CHURN], at=day(2))
        elif then == "refused":
            registry.refuse(
                branch="b1",
                subject="p_a",
                purposes=[CHURN],
                notice=NOTICE,
                channel="web",
                actor="customer",
                at=day(2),
            )
        elif then == "withdrawn":
            registry.withdraw(
                branch="b1",
                subject="p_a",
                purposes=[CHURN],
                channel="web",
                actor="customer",
                at=day(2),
            )
        elif then == "renewed":
            registry.renew(
                branch="b1",
                subject="p_a",
                purposes=[CHURN],
                channel="web",
                actor="customer",
                expires_at=None,
                at=day(2),
            )
        else:
            registry.withdraw(
                branch="b1",
                subject="p_a",
                purposes=[CHURN],
                channel="web",
                actor="customer",
                at=T0 - timedelta(1),
            )
    assert registry.record(branch="b1", subject="p_a").history == before  # nothing written


def test_invalid_changes_list_every_problem(registry: ConsentRegistry) -> None:
    with pytest.raises(ConsentValidationError) as caught:
        registry.give(
            branch="b 1",
            subject="jane@example.com",
            purposes=["churn-model-training", "ads"],
            notice=NOTICE,
            channel="fax",
            actor="customer",
            at=datetime(2026, 1, 1),  # naive on purpose
        )
    problems = " | ".join(caught.value.problems)
    for expected in ("branch", "customer id", "channel", "purpose", "timezone-aware"):
        assert expected in problems
    with pytest.raises(ConsentValidationError, match="notice_hash"):
        Notice("n", "v1", "not-a-hash")
    with pytest.raises(ConsentNotFound):
        registry.withdraw(branch="b1", subject="p_nobody", channel="web", actor="customer")


def test_receipt_is_json_with_history_and_audit_references(
    any_store: sessionmaker[Session],
) -> None:
    import json

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    log = AuditLog(any_store)
    registry = ConsentRegistry(any_store, audit=log)
    give(registry, "p_a", [CHURN, MARKETING], expires_at=day(365))
    registry.withdraw(
        branch="b1",
        subject="p_a",
        purposes=[MARKETING],
        channel="web",
        actor="customer",
        at=day(1),
    )
    log.checkpoint(Ed25519PrivateKey.generate())
    receipt = json.loads(json.dumps(registry.receipt(branch="b1", subject="p_a", at=day(2))))
    statuses = {p["purpose"]: (p["status"], p["valid"]) for p in receipt["purposes"]}
    assert statuses == {
        "churn-model-training": ("given", True),
        "marketing-profiling": ("withdrawn", False),
    }
    assert [h["event"] for h in receipt["history"]] == ["given", "given", "withdrawn"]
    assert receipt["audit"]["latest_checkpoint"]["tree_size"] == 3
    for index in receipt["audit"]["entries"]:
        assert log.entry(index).subject == "p_a"


def test_coverage_counts_per_branch_and_purpose(registry: ConsentRegistry) -> None:
    give(registry, "p_a", [CHURN, RECO])
    give(registry, "p_b", [CHURN], expires_at=day(5))
    give(registry, "p_c", [CHURN], branch="b2")
    registry.withdraw(
        branch="b1", subject="p_a", purposes=[RECO], channel="web", actor="c", at=day(1)
    )
    counts = {(c.branch, c.purpose): c for c in registry.coverage(at=day(10))}
    churn = counts[("b1", CHURN)]
    assert (churn.customers, churn.valid, churn.expired) == (2, 1, 1)
    assert counts[("b1", RECO)].withdrawn == 1
    assert counts[("b2", CHURN)].valid == 1
    assert {c.branch for c in registry.coverage(at=day(10), branch="b2")} == {"b2"}


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["p_0", "p_1", "p_2"]),
        st.sampled_from(list(Purpose)),
        st.sampled_from(["give", "withdraw", "refuse"]),
    ),
    max_size=12,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_valid_for_matches_a_reference_model(
    store: sessionmaker[Session], ops: list[tuple[str, Purpose, str]]
) -> None:
    """Property: valid_for equals replaying the accepted changes on a dictionary."""
    registry = ConsentRegistry(store)
    branch = f"b-{uuid.uuid4().hex}"  # a fresh branch per example: no state carried over
    valid: dict[tuple[str, Purpose], bool] = {}
    for step, (subject, purpose, op) in enumerate(ops):
        at = day(step)
        current = valid.get((subject, purpose), False)
        try:
            if op == "give":
                give(registry, subject, [purpose], at=at, branch=branch)
            elif op == "refuse":
                registry.refuse(
                    branch=branch,
                    subject=subject,
                    purposes=[purpose],
                    notice=NOTICE,
                    channel="web",
                    actor="customer",
                    at=at,
                )
            else:
                registry.withdraw(
                    branch=branch,
                    subject=subject,
                    purposes=[purpose],
                    channel="web",
                    actor="customer",
                    at=at,
                )
        except (ConsentStateError, ConsentNotFound):
            continue
        valid[(subject, purpose)] = op == "give"
        assert current is not valid[(subject, purpose)] or op == "refuse"
    for purpose in Purpose:
        expected = {s for (s, p), ok in valid.items() if ok and p is purpose}
        assert registry.valid_for(branch, purpose, day(len(ops))) == expected
