"""Consent for simulated branches: the pooled evaluation rows go through the branches' gate."""

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from fedcrm.compliance import ConsentRegistry, Notice, Purpose, open_store, sqlite_url
from fedcrm.data.split import split_frame
from fedcrm.simulation.consent_setup import (
    ConsentSetup,
    gate_branches,
    setup_branch_consent,
    write_consent_csv,
)
from fedcrm.tasks import SimulatedBranch

NOW = datetime(2026, 6, 1, tzinfo=UTC)
NOTICE = Notice.from_text("n", "v1", "text")


def _subjects(prefix: str) -> dict[str, list[str]]:
    """A branch's customers per part, as its task lists them (`TaskExperiment.subjects`)."""

    def part(*ids: str) -> list[str]:
        return [f"{prefix}_{i}" for i in ids]

    return {"train": part("ok", "gone", "never"), "val": part("ok2"), "test": part("ok3", "no")}


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
    branches = [
        SimulatedBranch(0, "b0", tmp_path / "000", {}),
        SimulatedBranch(1, "b1", tmp_path / "001", {}),
    ]
    subjects = [_subjects("a"), _subjects("c")]
    kept, report = gate_branches(
        setup, list(zip(branches, subjects, strict=True)), url=url, at=NOW + timedelta(days=1)
    )
    assert kept == {0: {"a_ok", "a_ok2", "a_ok3"}, 1: set()}
    assert [[c for c in s["test"] if c in kept[i]] for i, s in enumerate(subjects)] == [
        ["a_ok3"],
        [],
    ]
    assert [c for c in subjects[0]["train"] if c in kept[0]] == ["a_ok"]
    assert report["purpose"] == Purpose.CHURN_MODEL_TRAINING.value
    assert report["rows_before"] == {"train": 6, "val": 2, "test": 4}
    assert report["rows_excluded"] == {"train": 5, "val": 1, "test": 3}
    assert report["excluded_by_reason"]["test"] == {"purpose-not-collected": 2, "refused": 1}
    assert report["excluded_by_reason"]["train"] == {
        "no-consent": 1,
        "purpose-not-collected": 3,
        "withdrawn": 1,
    }
    assert report["refused_branches"] == {"b1": "purpose-not-collected"}


def test_branch_consent_is_made_up_imported_and_declared(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "compliance.db")
    setup = ConsentSetup(
        withdrawn_share=0.1, refused_share=0.1, no_consent_share=0.1, uncovered_branches=(1,)
    )
    branches = []
    for pid in (0, 1):
        folder = tmp_path / f"{pid:03d}"
        folder.mkdir()
        (folder / "branch.json").write_text(json.dumps({"partition_id": pid}), encoding="utf-8")
        branches.append(SimulatedBranch(pid, f"b{pid}", folder, {}))
    customers = [f"p{i}" for i in range(20)]
    made_up = setup_branch_consent(
        setup, [(b, customers) for b in branches], url=url, seed=0, now=NOW
    )
    assert made_up == {
        name: {"given": 14, "withdrawn": 2, "refused": 2, "no-consent": 2} for name in ("b0", "b1")
    }
    for branch in branches:
        assert (branch.folder / "consent.csv").exists()
        info = json.loads((branch.folder / "branch.json").read_text(encoding="utf-8"))
        assert info["purposes"] == setup.collected_for(branch.partition_id)
    assert setup.collected_for(1) == [Purpose.RECOMMENDATION_TRAINING.value]
    # The imported registry is what the gate reads: 14 customers valid on the covered branch.
    kept, report = gate_branches(
        setup,
        [(b, {"train": customers}) for b in branches],
        url=url,
        at=NOW + timedelta(seconds=1),
    )
    assert len(kept[0]) == 14 and kept[1] == set()
    assert report["excluded_by_reason"]["train"] == {
        "no-consent": 2,
        "purpose-not-collected": 20,
        "refused": 2,
        "withdrawn": 2,
    }


def test_simulated_consent_is_independent_of_the_branch_split(tmp_path: Path) -> None:
    """The drift fix: ``default_rng([7, 0])`` is ``default_rng(7)``, the split's stream.

    Branch 0's consent permutation used to be its split's permutation, so the customers marked
    as withdrawn or refusing were the first rows of its test set. On a one-class branch the
    split permutes all rows with the run's seed; the excluded share must be alike in both parts.
    """
    customers = [f"p_{i}" for i in range(1000)]
    frame = pd.DataFrame({"customer_id": customers, "churn": 0})
    split = split_frame(frame, label="churn", seed=7)
    setup = ConsentSetup(withdrawn_share=0.05, refused_share=0.05, no_consent_share=0.0)
    path = tmp_path / "consent.csv"
    write_consent_csv(path, customers, setup, partition_id=0, now=NOW, seed=7)
    with path.open(encoding="utf-8") as handle:
        left_out = {
            row["customer_id"] for row in csv.DictReader(handle) if row["status"] != "given"
        }
    assert len(left_out) == 100

    def share(part: pd.DataFrame) -> float:
        return sum(c in left_out for c in part["customer_id"]) / len(part)

    test, train = share(split.test), share(split.train)
    assert 0.04 < test < 0.2 and 0.04 < train < 0.2, (test, train)  # was 0.5 and 0.0
