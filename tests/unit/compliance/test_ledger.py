"""The privacy ledger: invariants on cumulative ε, validation, queries, audit coupling."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import (
    Accountant,
    CumulativeEpsilonDecrease,
    Decision,
    EventType,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    PrivacyUnit,
    SamplingMethod,
)
from fedcrm.compliance.audit import AuditLog
from support import ledger_entry

PURPOSE = "churn-model-training"


def entry(**changes: Any) -> LedgerEntry:
    return ledger_entry(**changes)


def test_append_and_queries(store: sessionmaker[Session]) -> None:
    ledger = PrivacyLedger(store)
    first = ledger.append(entry())
    assert first.id is not None and first.recorded_at is not None
    ledger.append(entry(round=2, cumulative_epsilon=0.7))
    ledger.append(entry(branch="south", cumulative_epsilon=0.5))
    ledger.append(entry(run_id="run-2", model="recs", cumulative_epsilon=1.0))
    assert ledger.cumulative_epsilon("north", "churn", PURPOSE) == pytest.approx(0.7)
    assert ledger.cumulative_epsilon("north", "churn", "marketing-profiling") == 0.0
    assert [e.round for e in ledger.by_branch("north") if e.model == "churn"] == [1, 2]
    assert len(ledger.by_run("run-1")) == 3
    assert len(ledger.by_model("recs")) == 1
    assert len(ledger.entries(run_id="run-1", branch="north", model="churn", purpose=PURPOSE)) == 2
    stored = ledger.entries(branch="south")[0]
    assert stored.privacy_unit is PrivacyUnit.RECORD
    assert stored.recorded_at is not None and stored.recorded_at.tzinfo is not None
    totals = ledger.totals(branch="north")
    assert [(t.branch, t.model) for t in totals] == [("north", "churn"), ("north", "recs")]
    assert [t.cumulative_epsilon for t in totals] == pytest.approx([0.7, 1.0])


def test_lowering_cumulative_epsilon_is_refused(store: sessionmaker[Session]) -> None:
    ledger = PrivacyLedger(store)
    ledger.append(entry(cumulative_epsilon=1.5))
    with pytest.raises(CumulativeEpsilonDecrease, match="would lower it") as caught:
        ledger.append(entry(round=2, cumulative_epsilon=1.2))
    assert caught.value.current == 1.5 and caught.value.proposed == 1.2
    assert len(ledger.entries()) == 1
    assert ledger.cumulative_epsilon("north", "churn", PURPOSE) == 1.5
    # Other (branch, model, purpose) scopes are independent.
    ledger.append(entry(branch="south", cumulative_epsilon=0.1))


def test_refusals(store: sessionmaker[Session]) -> None:
    ledger = PrivacyLedger(store)
    ledger.append(entry(cumulative_epsilon=2.8))
    refusal = entry(
        round=2,
        epsilon=0.4,
        cumulative_epsilon=2.8,
        decision=Decision.REFUSED,
        reason="round would reach ε=3.2 > budget 3.0",
    )
    stored = ledger.append(refusal)
    assert stored.decision is Decision.REFUSED
    assert ledger.cumulative_epsilon("north", "churn", PURPOSE) == 2.8
    with pytest.raises(LedgerError, match="spends no budget"):
        ledger.append(dataclasses.replace(refusal, cumulative_epsilon=3.2))
    with pytest.raises(LedgerError, match="reason"):
        entry(decision=Decision.REFUSED, reason=" ")


def test_validation_lists_every_problem() -> None:
    with pytest.raises(LedgerError) as caught:
        entry(
            delta=1.0,
            sampling_rate=0.0,
            clipping_norm=0.0,
            noise_multiplier=-1.0,
            epsilon=math.inf,
            cumulative_epsilon=-0.1,
            round=-1,
            branch="",
            privacy_unit="household",
            epsilon_budget=0.0,
        )
    message = str(caught.value)
    assert "10 problem(s)" in message
    for fragment in (
        "delta",
        "sampling_rate",
        "clipping_norm",
        "noise_multiplier",
        "finite",
        "cumulative_epsilon",
        "round",
        "branch",
        "household",
        "epsilon_budget",
    ):
        assert fragment in message
    with pytest.raises(LedgerError, match="means sampling_rate 1"):
        entry(sampling_method=SamplingMethod.NONE, sampling_rate=0.5)
    coerced = entry(privacy_unit="customer", decision="admitted", accountant="prv")
    assert coerced.privacy_unit is PrivacyUnit.CUSTOMER and coerced.accountant is Accountant.PRV


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=12))
def test_cumulative_epsilon_never_decreases(
    store: sessionmaker[Session], proposals: list[float]
) -> None:
    ledger = PrivacyLedger(store)
    branch = f"b{abs(hash(tuple(proposals))) % 10**9}"
    best = ledger.cumulative_epsilon(branch, "churn", PURPOSE)
    history = [best]
    for value in proposals:
        try:
            ledger.append(entry(branch=branch, epsilon=0.1, cumulative_epsilon=value))
        except CumulativeEpsilonDecrease:
            assert value < best
        else:
            assert value >= best
            best = value
        history.append(ledger.cumulative_epsilon(branch, "churn", PURPOSE))
    assert history == sorted(history)
    stored = [e.cumulative_epsilon for e in ledger.entries(branch=branch)]
    assert stored == sorted(stored)


def test_entries_are_audited_atomically(store: sessionmaker[Session]) -> None:
    audit = AuditLog(store)
    ledger = PrivacyLedger(store, audit=audit)
    stored = ledger.append(entry())
    ledger.append(
        entry(round=2, cumulative_epsilon=0.4, decision=Decision.REFUSED, reason="budget")
    )
    assert [e.event_type for e in audit.entries()] == [EventType.LEDGER_ENTRY, EventType.REFUSAL]
    body = audit.read_body(0)
    assert body["id"] == stored.id and body["cumulative_epsilon"] == 0.4
    assert body["privacy_unit"] == "record"
    assert audit.entries()[0].subject is None
    with pytest.raises(CumulativeEpsilonDecrease):
        ledger.append(entry(round=3, cumulative_epsilon=0.1))
    assert audit.size() == 2  # a rejected append writes nothing, in either table
