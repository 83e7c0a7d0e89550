"""Round manifests: commitments, roots, records, the branch's archive and membership proofs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fedcrm.compliance import ManifestError, ProofError, Purpose
from fedcrm.compliance.audit import MerkleTree, leaf_hash
from fedcrm.compliance.manifest import (
    ConsentRefusal,
    ManifestArchive,
    RefusalCode,
    RoundManifest,
    SaltStore,
    commitment,
    manifest_leaves,
    merkle_root,
    parse_consent_record,
    verify_membership,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)
FIELDS = {
    "branch": "b1",
    "purpose": Purpose.CHURN_MODEL_TRAINING,
    "snapshot_version": 7,
    "rows_before": 5,
    "rows_after": 3,
    "excluded": {"withdrawn": 1, "no-consent": 1},
}


def _commit(archive: ManifestArchive, customers: list[str], rnd: int) -> RoundManifest:
    return archive.commit(
        run_id="run-1",
        server_round=rnd,
        customers=customers,
        manifest_fields={**FIELDS, "rows_after": len(customers), "rows_before": len(customers)}
        | {"excluded": {}},
        created_at=NOW,
    )


def test_root_is_rfc9162_over_sorted_salted_commitments() -> None:
    salts = {"p_a": b"\x01" * 16, "p_b": b"\x02" * 16}
    leaves = manifest_leaves(["p_b", "p_a"], salts)
    assert leaves == sorted(leaf_hash(commitment(salts[c], c)) for c in ("p_a", "p_b"))
    assert merkle_root(leaves) == MerkleTree(leaves).root()
    # Another salt gives another commitment: the root reveals nothing without the salts.
    assert commitment(b"\x03" * 16, "p_a") != commitment(salts["p_a"], "p_a")
    with pytest.raises(ManifestError, match="no commitment salt"):
        manifest_leaves(["p_c"], salts)
    with pytest.raises(ManifestError, match="twice"):
        manifest_leaves(["p_a", "p_a"], salts)
    with pytest.raises(ManifestError, match="16 bytes"):
        commitment(b"short", "p_a")


def test_records_round_trip_and_carry_no_ids(tmp_path: Path) -> None:
    archive = ManifestArchive(tmp_path / "consent")
    manifest = archive.commit(
        run_id="run-1",
        server_round=1,
        customers=["p_a", "p_b", "p_c"],
        manifest_fields=FIELDS,
        created_at=NOW,
    )
    record = manifest.to_record()
    assert parse_consent_record(record) == manifest
    assert not any("p_a" in str(value) for value in record.values())
    refusal = ConsentRefusal("b2", Purpose.CHURN_MODEL_TRAINING, RefusalCode.NO_VALID_CONSENT, "x")
    assert parse_consent_record(refusal.to_record()) == refusal
    for broken in (
        {**record, "manifest-root": "zz"},
        {**record, "manifest-rows-after": 9},
        {**record, "manifest-excluded-withdrawn": 5},
        {**record, "consent-purpose": "selling-data"},
        {k: v for k, v in record.items() if k != "manifest-leaves"},
        {**record, "consent-admitted": 2},
    ):
        with pytest.raises(ManifestError):
            parse_consent_record(broken)


def test_membership_proves_in_and_out(tmp_path: Path) -> None:
    archive = ManifestArchive(tmp_path / "consent")
    first = _commit(archive, ["p_a", "p_b", "p_c", "p_d", "p_e"], 1)
    second = _commit(archive, ["p_a", "p_c", "p_d", "p_e"], 2)  # p_b withdrew
    third = _commit(archive, ["p_a", "p_c", "p_d", "p_e"], 3)
    assert third.root == second.root != first.root
    assert len(list((archive.folder / "leaves").iterdir())) == 2  # one file per distinct root
    rounds = archive.rounds("run-1")
    memberships = [archive.membership("p_b", r) for r in rounds]
    assert [m.included for m in memberships] == [True, False, False]
    proof = memberships[0]
    assert proof.leaf_index is not None
    salt = SaltStore(archive.folder / "salts.json").load()["p_b"]
    verify_membership(
        customer="p_b",
        salt=salt,
        root=first.root,
        leaf_index=proof.leaf_index,
        tree_size=proof.tree_size,
        proof=list(proof.proof),
    )
    with pytest.raises(ProofError):  # the same proof does not fit round 2's root
        verify_membership(
            customer="p_b",
            salt=salt,
            root=second.root,
            leaf_index=proof.leaf_index,
            tree_size=proof.tree_size,
            proof=list(proof.proof),
        )
    # No id is stored on disk besides the salts file; salts are 0600.
    assert "p_b" not in (archive.folder / "runs" / "run-1" / "round-0001.json").read_text()
    assert (archive.folder / "salts.json").stat().st_mode & 0o777 == 0o600
    # Forgetting a salt (erasure) makes the customer unlinkable; the roots still verify.
    assert archive.salts.forget("p_b")
    with pytest.raises(ManifestError, match="no commitment salt"):
        archive.membership("p_b", rounds[0])
    assert archive.leaves(first.root)


def test_damaged_archive_and_salts_are_refused(tmp_path: Path) -> None:
    archive = ManifestArchive(tmp_path / "consent")
    manifest = _commit(archive, ["p_a", "p_b"], 1)
    leaves_file = archive.folder / "leaves" / f"{manifest.root}.txt"
    lines = leaves_file.read_text().split()
    leaves_file.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(ManifestError, match="malformed or not sorted"):
        archive.leaves(manifest.root)
    leaves_file.write_text(lines[0] + "\n")
    with pytest.raises(ManifestError, match="do not hash"):
        archive.leaves(manifest.root)
    salts = archive.folder / "salts.json"
    salts.chmod(0o644)
    with pytest.raises(ManifestError, match="0600"):
        archive.salts.load()
    salts.chmod(0o600)
    salts.write_text(json.dumps({"salts": {"p_a": "00"}}))
    with pytest.raises(ManifestError, match="16 bytes"):
        archive.salts.load()
    with pytest.raises(ManifestError, match="run id"):
        archive.rounds("../etc")
