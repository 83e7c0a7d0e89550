"""``fedcrm compliance lineage``: a branch's manifests, and one customer's rounds and models."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from typer.testing import CliRunner

from fedcrm.compliance import Purpose, open_store
from fedcrm.compliance.cli import app
from fedcrm.compliance.lineage import LineageStore
from fedcrm.compliance.manifest import ManifestArchive


def test_lineage_for_a_branch_and_a_customer(db_url: str, tmp_path: Path) -> None:
    branch_dir = tmp_path / "branch-00"
    archive = ManifestArchive(branch_dir / "consent")
    store = LineageStore(open_store(db_url, migrate=False))
    for rnd, customers in ((1, ["p_a", "p_b"]), (2, ["p_a"])):
        manifest = archive.commit(
            run_id="run-1",
            server_round=rnd,
            customers=customers,
            manifest_fields={
                "branch": "branch-00",
                "purpose": Purpose.CHURN_MODEL_TRAINING,
                "snapshot_version": 2,
                "rows_before": 2,
                "rows_after": len(customers),
                "excluded": {"withdrawn": 2 - len(customers)} if rnd == 2 else {},
            },
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
        )
        store.record_manifest(run_id="run-1", server_round=rnd, manifest=manifest)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"m")
    release = store.record_release(run_id="run-1", model="churn", path=model, last_round=2)

    shown = CliRunner().invoke(app, ["lineage", "--db", db_url, "--branch", "branch-00"])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith("run-1 round 1 branch-00: 2/2 rows (excluded: none)")
    assert "1/2 rows (excluded: 1 withdrawn)" in lines[1]
    assert release.sha256[:12] in lines[1]

    args = ["lineage", "--db", db_url, "--branch", "branch-00", "--branch-dir", str(branch_dir)]
    mine = CliRunner().invoke(app, [*args, "--customer", "p_b"])
    assert mine.exit_code == 0, mine.output
    first, second = mine.output.splitlines()
    assert first.startswith("run-1 round 1: included (leaf") and "root matches" in first
    assert second.startswith("run-1 round 2: not included")
    unknown = CliRunner().invoke(app, [*args, "--customer", "p_zz"])
    assert unknown.exit_code == 1 and "no commitment salt" in unknown.output
    incomplete = CliRunner().invoke(app, ["lineage", "--db", db_url, "--customer", "p_b"])
    assert incomplete.exit_code == 2
