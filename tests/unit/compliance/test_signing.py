"""Ed25519 keys and signed checkpoints (RFC 9162 §4.9-4.10 tree heads)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcrm.compliance import ExportFormatError, KeyFileError, SignatureError
from fedcrm.compliance.audit import (
    Checkpoint,
    SignedCheckpoint,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    raw_public_key,
    sign_checkpoint,
)

ROOT = hashlib.sha256(b"root").digest()


def test_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "log.pem"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_signing_key(path)
    assert raw_public_key(loaded.public_key()) == raw_public_key(key.public_key())
    assert load_public_key(tmp_path / "keys" / "log.pem.pub") == raw_public_key(key.public_key())
    with pytest.raises(KeyFileError, match="already exists"):
        generate_signing_key(path)
    replaced = generate_signing_key(path, overwrite=True)
    assert raw_public_key(replaced.public_key()) != raw_public_key(key.public_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_permissive_or_bad_key_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "log.pem"
    generate_signing_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(path)
    with pytest.raises(KeyFileError, match="not found"):
        load_signing_key(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a key")
    junk.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_signing_key(junk)
    with pytest.raises(KeyFileError):
        load_public_key(junk)


def test_signature_verifies_and_tampering_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    signed = sign_checkpoint(Checkpoint(5, ROOT, 1_700_000_000_000), key)
    signed.verify()
    signed.verify({signed.public_key})
    assert SignedCheckpoint.from_json(signed.to_json()) == signed
    bad_sig = bytearray(signed.signature)
    bad_sig[10] ^= 0x01
    for forged in (
        dataclasses.replace(signed, signature=bytes(bad_sig)),
        dataclasses.replace(signed, checkpoint=Checkpoint(6, ROOT, 1_700_000_000_000)),
        dataclasses.replace(signed, checkpoint=Checkpoint(5, ROOT, 1_700_000_000_001)),
        dataclasses.replace(signed, checkpoint=Checkpoint(5, bytes(32), 1_700_000_000_000)),
        dataclasses.replace(signed, signature=signed.signature[:-1]),
    ):
        with pytest.raises(SignatureError):
            forged.verify()
    other = raw_public_key(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(SignatureError, match="not a trusted key"):
        signed.verify({other})


def test_signed_data_is_tree_head_data_v2() -> None:
    cp = Checkpoint(tree_size=3, root_hash=ROOT, timestamp_ms=258)
    data = cp.signed_data()
    body = data[data.index(b"\x00") + 1 :]
    assert body == (
        (258).to_bytes(8, "big") + (3).to_bytes(8, "big") + b"\x20" + ROOT + b"\x00\x00"
    )


def test_checkpoint_validation_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Checkpoint(-1, ROOT, 0)
    with pytest.raises(ValueError):
        Checkpoint(1, b"short", 0)
    signed = sign_checkpoint(Checkpoint(1, ROOT, 0), Ed25519PrivateKey.generate())
    signed.save(tmp_path / "cp.json")
    assert SignedCheckpoint.load(tmp_path / "cp.json") == signed
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ExportFormatError):
        SignedCheckpoint.load(tmp_path / "bad.json")
    with pytest.raises(ExportFormatError):
        SignedCheckpoint.load(tmp_path / "none.json")
    with pytest.raises(ExportFormatError, match="lacks field"):
        SignedCheckpoint.from_json({"tree_size": 1})
