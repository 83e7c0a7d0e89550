"""Audit events: canonical leaves, body encryption bound to the leaf header, pseudonyms only."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest

from fedcrm.compliance import AuditError, BodyUnavailable, EventType
from fedcrm.compliance.audit import AuditEvent, LogEntry, canonical_json, leaf_hash
from fedcrm.compliance.audit._events import new_body_key, open_body, seal

T0 = datetime(2026, 11, 22, 12, 0, 0, 123456, tzinfo=UTC)


def sealed(
    body: dict[str, object] | None = None, subject: str | None = "p_0123"
) -> tuple[LogEntry, bytes]:
    key = new_body_key()
    event = AuditEvent(EventType.CONSENT_CHANGE, body or {"status": "withdrawn"}, subject, T0)
    return seal(event, index=7, key_id="k" * 32, key=key), key


def test_body_round_trip_and_leaf_is_canonical_json() -> None:
    entry, key = sealed({"status": "given", "purpose": "churn-model-training"})
    assert open_body(entry, key) == {"status": "given", "purpose": "churn-model-training"}
    leaf = json.loads(entry.leaf_data())
    assert leaf["seq"] == 7
    assert leaf["type"] == "consent-change"
    assert leaf["time"] == "2026-11-22T12:00:00.123456Z"
    assert "churn-model-training" not in entry.leaf_data().decode()  # the body is never in clear
    assert entry.leaf_data() == canonical_json(leaf)
    assert entry.leaf_hash() == leaf_hash(entry.leaf_data())
    assert LogEntry.from_json(entry.to_json()) == entry


@pytest.mark.parametrize(
    "change",
    [
        {"index": 8},
        {"subject": "p_9999"},
        {"event_type": EventType.REFUSAL},
        {"time": datetime(2026, 11, 22, 12, 0, 1, tzinfo=UTC)},
    ],
    ids=["index", "subject", "type", "time"],
)
def test_body_is_bound_to_its_header(change: dict[str, object]) -> None:
    entry, key = sealed()
    moved = dataclasses.replace(entry, **change)  # type: ignore[arg-type]
    with pytest.raises(BodyUnavailable, match="does not authenticate"):
        open_body(moved, key)


def test_shredded_or_wrong_key_cannot_decrypt() -> None:
    entry, _key = sealed()
    with pytest.raises(BodyUnavailable, match="crypto-shredded"):
        open_body(entry, None)
    with pytest.raises(BodyUnavailable):
        open_body(entry, new_body_key())
    flipped = bytearray(entry.ciphertext)
    flipped[0] ^= 1
    with pytest.raises(BodyUnavailable):
        open_body(dataclasses.replace(entry, ciphertext=bytes(flipped)), _key)


@pytest.mark.parametrize(
    "subject",
    ["Jane Doe", "jane@example.com", "", "x" * 129],
    ids=["name", "email", "empty", "too-long"],
)
def test_personal_data_is_refused_as_subject(subject: str) -> None:
    with pytest.raises(ValueError, match="pseudonym"):
        AuditEvent(EventType.CONSENT_CHANGE, {}, subject)


def test_event_validation() -> None:
    with pytest.raises(ValueError, match="timezone"):
        AuditEvent(EventType.CONSENT_CHANGE, {}, None, datetime(2026, 1, 1))
    with pytest.raises(AuditError, match="plain JSON"):
        AuditEvent(EventType.CONSENT_CHANGE, {"when": T0})
    with pytest.raises(AuditError, match="plain JSON"):
        AuditEvent(EventType.CONSENT_CHANGE, {"eps": float("nan")})
    with pytest.raises(ValueError):
        AuditEvent("not-an-event", {})  # type: ignore[arg-type]
    assert AuditEvent("refusal", {}).event_type is EventType.REFUSAL  # type: ignore[arg-type]
