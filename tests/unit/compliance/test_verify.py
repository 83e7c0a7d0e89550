"""Export and offline verification of the audit log, and the ``fedcrm audit`` sub-app."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedcrm.compliance import AuditVerificationError, EventType, ExportFormatError
from fedcrm.compliance.audit import (
    AuditEvent,
    AuditLog,
    Checkpoint,
    IssueKind,
    LogEntry,
    MerkleTree,
    SignedCheckpoint,
    raw_public_key,
    sign_checkpoint,
    verify_export,
)
from fedcrm.compliance.audit.cli import app

runner = CliRunner()


def build(log: AuditLog, key: Ed25519PrivateKey, tmp_path: Path) -> tuple[Path, SignedCheckpoint]:
    """Ten events, a checkpoint saved apart (size 6), more events, a final checkpoint, export."""
    for i in range(6):
        log.append(AuditEvent(EventType.ROUND_MANIFEST, {"round": i}, None))
    early = log.checkpoint(key)
    early.save(tmp_path / "early-checkpoint.json")
    for i in range(6, 10):
        log.append(AuditEvent(EventType.CONSENT_CHANGE, {"i": i}, f"p_{i:04d}"))
    log.checkpoint(key)
    return log.export(tmp_path / "audit.jsonl"), early


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def rewrite_history(path: Path, key: Ed25519PrivateKey, reorder: list[int], out: Path) -> None:
    """An attacker holding the log key rewrites the log: entries in the order ``reorder``
    (indexes renumbered, leaf hashes recomputed), old checkpoints replaced by a new one."""
    lines = read_lines(path)
    header = lines[0]
    old = [
        LogEntry.from_json({k: v for k, v in ln.items() if k not in ("kind", "leaf_hash")})
        for ln in lines
        if ln["kind"] == "entry"
    ]
    entries = [
        LogEntry(
            index=new_index,
            event_type=old[i].event_type,
            subject=old[i].subject,
            time=old[i].time,
            key_id=old[i].key_id,
            algorithm=old[i].algorithm,
            nonce=old[i].nonce,
            ciphertext=old[i].ciphertext,
        )
        for new_index, i in enumerate(reorder)
    ]
    tree = MerkleTree([e.leaf_hash() for e in entries])
    forged = sign_checkpoint(Checkpoint(tree.size, tree.root(), 1_900_000_000_000), key)
    header["entries"], header["checkpoints"] = len(entries), 1
    new_lines = [header]
    new_lines += [
        {"kind": "entry", **e.to_json(), "leaf_hash": e.leaf_hash().hex()} for e in entries
    ]
    new_lines.append({"kind": "checkpoint", **forged.to_json()})
    write_lines(out, new_lines)


def test_export_verifies(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path, early = build(audit_log, signing_key, tmp_path)
    trusted = {raw_public_key(signing_key.public_key())}
    report = verify_export(path, tmp_path / "early-checkpoint.json", trusted_keys=trusted)
    assert report.ok, report.summary()
    assert report.tree_size == 10
    assert report.checkpoints_valid == 2
    assert report.since_checkpoint == early
    assert report.keys_trusted
    assert report.root_hash == audit_log.root()
    assert "result: OK" in report.summary()
    assert '"i": 7' not in path.read_text()  # bodies are exported encrypted only
    untrusted = verify_export(path)
    assert untrusted.ok and any("no trusted public key" in w for w in untrusted.warnings)


def test_one_byte_edit_in_export_is_located(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path, _ = build(audit_log, signing_key, tmp_path)
    lines = read_lines(path)
    ct = lines[1 + 3]["ct"]
    lines[1 + 3]["ct"] = ("B" if ct[0] != "B" else "C") + ct[1:]
    write_lines(path, lines)
    report = verify_export(path)
    assert not report.ok
    assert any(
        i.kind == IssueKind.ENTRY and i.entry_index == 3 and i.line == 5 for i in report.issues
    )
    assert any(
        i.kind == IssueKind.CHECKPOINT and i.checkpoint == 0 and "altered entries: 3" in i.message
        for i in report.issues
    )
    with pytest.raises(AuditVerificationError, match="entry 3"):
        verify_export(path, strict=True)


@pytest.mark.parametrize(
    "order",
    [[0, 1, 3, 4, 5, 6, 7, 8, 9], [0, 2, 1, 3, 4, 5, 6, 7, 8, 9]],
    ids=["drop-entry-2", "swap-entries-1-2"],
)
def test_rewritten_history_breaks_consistency_from_saved_checkpoint(
    audit_log: AuditLog,
    signing_key: Ed25519PrivateKey,
    tmp_path: Path,
    order: list[int],
) -> None:
    path, early = build(audit_log, signing_key, tmp_path)
    forged = tmp_path / "forged.jsonl"
    rewrite_history(path, signing_key, order, forged)
    # The forgery is self-consistent: only a checkpoint saved earlier can expose it.
    assert verify_export(forged).ok
    report = verify_export(forged, early)
    assert not report.ok
    [issue] = report.issues
    assert issue.kind == IssueKind.CONSISTENCY
    assert issue.checkpoint == -1
    assert f"size {early.tree_size}" in issue.message


def test_truncated_export_is_refused(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path, early = build(audit_log, signing_key, tmp_path)
    lines = [ln for ln in read_lines(path) if not (ln["kind"] == "entry" and ln["seq"] >= 8)]
    write_lines(path, lines)
    report = verify_export(path, early)
    assert not report.ok
    messages = " ".join(str(i) for i in report.issues)
    assert "header announces 10 entries" in messages
    assert "covers 10 entries but the log has only 8" in messages


def test_bad_signature_and_untrusted_key_are_refused(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path, early = build(audit_log, signing_key, tmp_path)
    lines = read_lines(path)
    cps = [ln for ln in lines if ln["kind"] == "checkpoint"]
    sig = cps[1]["signature"]
    cps[1]["signature"] = ("A" if sig[0] != "A" else "B") + sig[1:]
    write_lines(path, lines)
    report = verify_export(path)
    assert [(i.kind, i.checkpoint) for i in report.issues] == [(IssueKind.SIGNATURE, 1)]
    assert report.checkpoints_valid == 1
    stranger = {raw_public_key(Ed25519PrivateKey.generate().public_key())}
    report = verify_export(path, trusted_keys=stranger)
    assert {i.checkpoint for i in report.issues if i.kind == IssueKind.SIGNATURE} == {0, 1}
    # A --since checkpoint signed by another key.
    other = sign_checkpoint(early.checkpoint, Ed25519PrivateKey.generate())
    report = verify_export(path, other)
    assert any(i.checkpoint == -1 and i.kind == IssueKind.SIGNATURE for i in report.issues)


def test_unusable_exports(tmp_path: Path) -> None:
    with pytest.raises(ExportFormatError):
        verify_export(tmp_path / "missing.jsonl")
    (tmp_path / "x.jsonl").write_text('{"kind": "entry"}\n')
    with pytest.raises(ExportFormatError, match="no header"):
        verify_export(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text('{"kind": "header", "format": "other", "version": 1}\n')
    with pytest.raises(ExportFormatError, match="verifier reads"):
        verify_export(tmp_path / "y.jsonl")


def test_garbage_lines_are_reported(
    audit_log: AuditLog, signing_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    path, _ = build(audit_log, signing_key, tmp_path)
    text = path.read_text().splitlines()
    text[2] = text[2][:-5]  # a cut line: not JSON any more
    path.write_text("\n".join(text) + "\n")
    report = verify_export(path)
    assert any(i.kind == IssueKind.FORMAT and i.line == 3 for i in report.issues)
    assert any(i.kind == IssueKind.CHECKPOINT for i in report.issues)


def test_empty_log_has_nothing_proven(audit_log: AuditLog, tmp_path: Path) -> None:
    report = verify_export(audit_log.export(tmp_path / "empty.jsonl"))
    assert not report.ok
    assert "no valid signed checkpoint" in report.issues[0].message


# --- the typer sub-app (mounted by the lead as `fedcrm audit`) ---


def test_cli_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    key = tmp_path / "log-key.pem"
    result = runner.invoke(app, ["keygen", str(key)])
    assert result.exit_code == 0, result.output
    from fedcrm.compliance import open_store, sqlite_url

    factory = open_store(sqlite_url(db))
    log = AuditLog(factory)
    for i in range(4):
        log.append(AuditEvent(EventType.MODEL_RELEASE, {"version": i}))
    early = tmp_path / "early.json"
    result = runner.invoke(
        app, ["checkpoint", "--db", str(db), "--key", str(key), "--out", str(early)]
    )
    assert result.exit_code == 0, result.output
    log.append(AuditEvent(EventType.MODEL_RELEASE, {"version": 4}))
    out = tmp_path / "audit.jsonl"
    latest = tmp_path / "latest.json"
    result = runner.invoke(
        app,
        [
            "export",
            str(out),
            "--db",
            sqlite_url(db),
            "--sign-key",
            str(key),
            "--checkpoint-out",
            str(latest),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "exported 5 entries" in result.output
    factory.kw["bind"].dispose()

    pub = f"{key}.pub"
    result = runner.invoke(app, ["verify", str(out), "--since", str(early), "--public-key", pub])
    assert result.exit_code == 0, result.output
    assert "result: OK" in result.output
    result = runner.invoke(app, ["verify", str(out), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["tree_size"] == 5

    lines = read_lines(out)
    lines[1]["time"] = "2000-01-01T00:00:00.000000Z"  # back-date the first event
    write_lines(out, lines)
    result = runner.invoke(app, ["verify", str(out), "--since", str(early)])
    assert result.exit_code == 1
    assert "FAIL [entry, line 2, entry 0]" in result.output

    result = runner.invoke(app, ["verify", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert "error:" in result.output


def test_cli_help_and_failures(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("verify", "export", "checkpoint", "keygen"):
        assert command in result.output
    result = runner.invoke(app, ["verify", "--help"])
    assert result.exit_code == 0 and "--since" in result.output
    key = tmp_path / "k.pem"
    assert runner.invoke(app, ["keygen", str(key)]).exit_code == 0
    assert runner.invoke(app, ["keygen", str(key)]).exit_code == 2
    result = runner.invoke(
        app, ["export", str(tmp_path / "o.jsonl"), "--db", str(tmp_path / "none.db")]
    )
    assert result.exit_code == 2
