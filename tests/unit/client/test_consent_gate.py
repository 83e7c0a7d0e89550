"""The branch's consent gate: which rows a round may use, refusals, and the round manifest."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
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
from fedcrm.data.split import Split
from fedcrm.exceptions import ConfigError

NOW = datetime(2026, 6, 1, tzinfo=UTC)
CHURN = Purpose.CHURN_MODEL_TRAINING
NOTICE = Notice.from_text("n", "v1", "text")


def _frame(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"customer_id": ids, "x": range(len(ids))})


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


def _split() -> Split:
    return Split(
        train=_frame(["p_ok1", "p_ok2", "p_gone", "p_no", "p_never", "p_stale"]),
        val=_frame(["p_val", "p_gone"]),
        test=_frame(["p_never"]),
    )


def test_gate_keeps_valid_rows_and_counts_the_rest(consent: BranchConsent) -> None:
    at = NOW + timedelta(seconds=1)
    result = apply_gate(_split(), id_column="customer_id", purpose=CHURN, consent=consent, at=at)
    assert isinstance(result, GateResult)
    assert list(result.split.train["customer_id"]) == ["p_ok1", "p_ok2", "p_stale"]
    assert list(result.split.val["customer_id"]) == ["p_val"] and result.split.test.empty
    assert result.rows_before == 6
    assert result.excluded == {"withdrawn": 1, "refused": 1, "no-consent": 1}
    assert result.excluded_by_split == {
        "train": result.excluded,
        "val": {"withdrawn": 1},
        "test": {"no-consent": 1},
    }
    # The same branch with a one-year retention period also leaves out the stale decision.
    kept = BranchConsent(**{**consent.__dict__, "retention": timedelta(days=365)})
    retained = apply_gate(_split(), id_column="customer_id", purpose=CHURN, consent=kept, at=at)
    assert isinstance(retained, GateResult)
    assert retained.excluded["retention"] == 1
    assert list(retained.split.train["customer_id"]) == ["p_ok1", "p_ok2"]

    manifest = commit_round(
        retained, id_column="customer_id", consent=kept, run_id="run-1", server_round=4
    )
    assert (manifest.rows_before, manifest.rows_after, manifest.leaves) == (6, 2, 2)
    assert manifest.snapshot_version == retained.snapshot.version >= 0
    (archived,) = ManifestArchive(kept.folder).rounds("run-1")
    assert archived.round == 4 and archived.manifest == manifest
    assert ManifestArchive(kept.folder).membership("p_ok1", archived).included


def test_purpose_binding_refuses_the_run(consent: BranchConsent) -> None:
    recs = BranchConsent(
        **{**consent.__dict__, "collected": frozenset({Purpose.RECOMMENDATION_TRAINING})}
    )
    refusal = apply_gate(_split(), id_column="customer_id", purpose=CHURN, consent=recs, at=NOW)
    assert isinstance(refusal, ConsentRefusal)
    assert refusal.code is RefusalCode.PURPOSE_NOT_COLLECTED
    profiling = Purpose.MARKETING_PROFILING
    none = apply_gate(_split(), id_column="customer_id", purpose=profiling, consent=consent, at=NOW)
    assert isinstance(none, ConsentRefusal) and none.code is RefusalCode.NO_VALID_CONSENT
    assert not (consent.folder / "salts.json").exists()  # a refusal commits to nothing


def test_purposes_are_parsed_strictly() -> None:
    assert parse_purposes("churn-model-training, recommendation-training") == {
        CHURN,
        Purpose.RECOMMENDATION_TRAINING,
    }
    with pytest.raises(ConfigError, match="unknown purpose"):
        parse_purposes("churn-model-training,sales")
