"""The branch's consent gate: which rows a round may use, refusals, and the round manifest."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedcrm.client.consent_gate import (
    BranchConsent,
    GateResult,
    apply_gate,
    commit_round,
    parse_purposes,
)
from fedcrm.compliance import ConsentRegistry, Notice, Purpose, open_store, sqlite_url
from fedcrm.compliance.manifest import ConsentRefusal, ManifestArchive, RefusalCode
from fedcrm.exceptions import ConfigError

NOW = datetime(2026, 6, 1, tzinfo=UTC)
CHURN = Purpose.CHURN_MODEL_TRAINING
NOTICE = Notice.from_text("n", "v1", "text")


@pytest.fixture
def consent(tmp_path: Path) -> BranchConsent:
    url = sqlite_url(tmp_path / "consent.db")
    registry = ConsentRegistry(open_store(url))
    give = {"purposes": [CHURN], "notice": NOTICE, "channel": "web", "actor": "customer"}
    for subject in ("p_ok1", "p_ok2", "p_val", "p_gone", "p_stale"):
        at = NOW - timedelta(days=400 if subject == "p_stale" else 10)
        registry.give(branch="b1", subject=subject, at=at, **give)  # type: ignore[arg-type]
    registry.withdraw(branch="b1", subject="p_gone", channel="web", actor="customer", at=NOW)
    registry.refuse(branch="b1", subject="p_no", at=NOW - timedelta(days=5), **give)  # type: ignore[arg-type]
    return BranchConsent(url=url, branch="b1", folder=tmp_path / "branch-consent")


SUBJECTS = {
    "train": ["p_ok1", "p_ok2", "p_gone", "p_no", "p_never", "p_stale"],
    "val": ["p_val", "p_gone"],
    "test": ["p_never"],
}
"""A branch's customer pseudonyms per part, as its task lists them (`Task.subjects`)."""


def _kept(result: GateResult, part: str) -> list[str]:
    """The customers of ``part`` the gate keeps, in the part's order."""
    return [c for c in SUBJECTS[part] if c in result.kept]


def test_gate_keeps_valid_rows_and_counts_the_rest(consent: BranchConsent) -> None:
    at = NOW + timedelta(seconds=1)
    result = apply_gate(SUBJECTS, purpose=CHURN, consent=consent, at=at)
    assert isinstance(result, GateResult)
    assert result.kept == {"p_ok1", "p_ok2", "p_stale", "p_val"}
    assert result.train_customers == _kept(result, "train") == ["p_ok1", "p_ok2", "p_stale"]
    assert _kept(result, "val") == ["p_val"] and _kept(result, "test") == []
    assert result.rows_before == 6
    assert result.excluded == {"withdrawn": 1, "refused": 1, "no-consent": 1}
    assert result.excluded_by_split == {
        "train": result.excluded,
        "val": {"withdrawn": 1},
        "test": {"no-consent": 1},
    }
    # The same branch with a one-year retention period also leaves out the stale decision.
    kept = BranchConsent(**{**consent.__dict__, "retention": timedelta(days=365)})
    retained = apply_gate(SUBJECTS, purpose=CHURN, consent=kept, at=at)
    assert isinstance(retained, GateResult)
    assert retained.excluded["retention"] == 1
    assert retained.train_customers == ["p_ok1", "p_ok2"]

    manifest = commit_round(retained, consent=kept, run_id="run-1", server_round=4)
    assert (manifest.rows_before, manifest.rows_after, manifest.leaves) == (6, 2, 2)
    assert manifest.snapshot_version == retained.snapshot.version >= 0
    (archived,) = ManifestArchive(kept.folder).rounds("run-1")
    assert archived.round == 4 and archived.manifest == manifest
    assert ManifestArchive(kept.folder).membership("p_ok1", archived).included


def test_purpose_binding_refuses_the_run(consent: BranchConsent) -> None:
    recs = BranchConsent(
        **{**consent.__dict__, "collected": frozenset({Purpose.RECOMMENDATION_TRAINING})}
    )
    refusal = apply_gate(SUBJECTS, purpose=CHURN, consent=recs, at=NOW)
    assert isinstance(refusal, ConsentRefusal)
    assert refusal.code is RefusalCode.PURPOSE_NOT_COLLECTED
    profiling = Purpose.MARKETING_PROFILING
    none = apply_gate(SUBJECTS, purpose=profiling, consent=consent, at=NOW)
    assert isinstance(none, ConsentRefusal) and none.code is RefusalCode.NO_VALID_CONSENT
    assert not (consent.folder / "salts.json").exists()  # a refusal commits to nothing


def test_a_branch_without_a_consented_training_customer_refuses(consent: BranchConsent) -> None:
    subjects = {"train": ["p_gone", "p_never"], "val": ["p_ok1"], "test": []}
    refusal = apply_gate(subjects, purpose=CHURN, consent=consent, at=NOW + timedelta(seconds=1))
    assert isinstance(refusal, ConsentRefusal) and refusal.code is RefusalCode.NO_VALID_CONSENT


def test_purposes_are_parsed_strictly() -> None:
    assert parse_purposes("churn-model-training, recommendation-training") == {
        CHURN,
        Purpose.RECOMMENDATION_TRAINING,
    }
    with pytest.raises(ConfigError, match="unknown purpose"):
        parse_purposes("churn-model-training,sales")


def test_exclude_moves_customers_out_of_the_round_and_counts_them() -> None:
    from fedcrm.client.consent_gate import GateResult, exclude
    from fedcrm.compliance.manifest import ExclusionReason

    snapshot = object()
    gate = GateResult(
        kept={"a", "b", "c", "v"},
        snapshot=snapshot,  # type: ignore[arg-type]
        rows_before=4,
        train_customers=["a", "b", "c"],
        excluded={"refused": 1},
        excluded_by_split={"train": {"refused": 1}},
    )
    out = exclude(gate, {"b", "c"}, ExclusionReason.PRIVACY_BUDGET)
    assert out.train_customers == ["a"] and out.kept == {"a", "v"}
    assert out.excluded == {"refused": 1, "privacy-budget": 2}
    assert out.excluded_by_split["train"] == {"refused": 1, "privacy-budget": 2}
    assert out.rows_before - len(out.train_customers) == sum(out.excluded.values())
    assert exclude(gate, set(), ExclusionReason.PRIVACY_BUDGET) is gate
