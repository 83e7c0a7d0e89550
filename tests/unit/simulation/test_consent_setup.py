"""Consent for simulated branches: the pooled evaluation rows go through the branches' gate."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from fedcrm.compliance import ConsentRegistry, Notice, Purpose, open_store, sqlite_url
from fedcrm.data.split import Split
from fedcrm.simulation.consent_setup import ConsentSetup, gate_pooled_splits

NOW = datetime(2026, 6, 1, tzinfo=UTC)
NOTICE = Notice.from_text("n", "v1", "text")


def _split(prefix: str) -> Split:
    def frame(*ids: str) -> pd.DataFrame:
        return pd.DataFrame({"customer_id": [f"{prefix}_{i}" for i in ids], "x": range(len(ids))})

    return Split(train=frame("ok", "gone", "never"), val=frame("ok2"), test=frame("ok3", "no"))


def test_pooled_rows_are_gated_like_the_branches(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "compliance.db")
    registry = ConsentRegistry(open_store(url))
    given = {"notice": NOTICE, "channel": "web", "actor": "customer"}
    at = NOW - timedelta(days=10)
    for branch, prefix in (("b0", "a"), ("b1", "c")):
        for suffix in ("ok", "gone", "ok2", "ok3"):
            registry.give(
                branch=branch,
                subject=f"{prefix}_{suffix}",
                purposes=[Purpose.CHURN_MODEL_TRAINING],
                at=at,
                **given,  # type: ignore[arg-type]
            )
        registry.withdraw(branch=branch, subject=f"{prefix}_gone", channel="web", actor="c", at=NOW)
        registry.refuse(
            branch=branch,
            subject=f"{prefix}_no",
            purposes=[Purpose.CHURN_MODEL_TRAINING],
            at=at,
            **given,  # type: ignore[arg-type]
        )
    # Branch 1 holds data collected for recommendations only: it refuses, and none of its
    # rows is evaluated on, however valid their consent.
    setup = ConsentSetup(uncovered_branches=(1,))
    branches = [(0, "b0", tmp_path / "000"), (1, "b1", tmp_path / "001")]
    gated, report = gate_pooled_splits(
        setup,
        branches,
        [_split("a"), _split("c")],
        url=url,
        id_column="customer_id",
        at=NOW + timedelta(days=1),
    )
    assert [list(s.test["customer_id"]) for s in gated] == [["a_ok3"], []]
    assert list(gated[0].train["customer_id"]) == ["a_ok"]
    assert report["rows_before"] == {"train": 6, "val": 2, "test": 4}
    assert report["rows_excluded"] == {"train": 5, "val": 1, "test": 3}
    assert report["excluded_by_reason"]["test"] == {"purpose-not-collected": 2, "refused": 1}
    assert report["excluded_by_reason"]["train"] == {
        "no-consent": 1,
        "purpose-not-collected": 3,
        "withdrawn": 1,
    }
    assert report["refused_branches"] == {"b1": "purpose-not-collected"}
