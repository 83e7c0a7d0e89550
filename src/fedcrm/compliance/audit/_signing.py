"""Ed25519 signing keys and signed checkpoints (tree heads) of the audit log.

A checkpoint is the tree head of RFC 9162 §4.9 (``TreeHeadDataV2``: timestamp in milliseconds,
tree size, root hash, no extensions). The signed message is the TLS presentation-language
encoding of that structure (RFC 8446 §3) preceded by a fixed context label, signed with Ed25519
(RFC 8032) as a signed tree head is in RFC 9162 §4.10. The key is identified by the SHA-256 of
its DER ``SubjectPublicKeyInfo``, as a log id is in RFC 6962 §3.2.

Notes:
    The private key file is PKCS#8 PEM written with mode 0600 and refused on load when group or
    other users can read it. A verifier must be given the log's public key out of band
    (``trusted_keys``); a key read from the export itself only proves that the export is
    self-consistent, which the verification report says.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcrm.compliance.audit._events import b64decode, b64encode
from fedcrm.compliance.audit._merkle import HASH_SIZE
from fedcrm.compliance.errors import ExportFormatError, KeyFileError, SignatureError, malformed_as

SIGNATURE_ALGORITHM = "ed25519"
_SIGNING_CONTEXT = b"fedcrm-audit-checkpoint-v1\x00"
_PUBLIC_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


def generate_signing_key(path: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create a new Ed25519 signing key and write it to ``path`` with mode 0600.

    The public key is written beside it as ``<path>.pub`` (PEM), for verifiers.

    Args:
        path: Private key file to create (PKCS#8 PEM).
        overwrite: Replace an existing key. Off by default: losing the key means no new
            checkpoint can continue the old chain of trust.

    Raises:
        KeyFileError: The file exists and ``overwrite`` is false.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a signing key") from exc
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(pem)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(public_key_pem(key.public_key()))
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key written by :func:`generate_signing_key`.

    Raises:
        KeyFileError: The file is missing, readable by group or others, or not an Ed25519
            PKCS#8 PEM key.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as exc:
        raise KeyFileError(f"signing key {path} not found") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"signing key {path} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PKCS#8 PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """Return the PEM ``SubjectPublicKeyInfo`` of a public key."""
    return key.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )


def load_public_key(path: Path) -> bytes:
    """Load a PEM public key (``<key>.pub``) and return its 32 raw bytes.

    Raises:
        KeyFileError: The file is missing or does not hold an Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"public key {path} not found") from exc
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return raw_public_key(key)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """Return the 32 raw bytes of an Ed25519 public key (RFC 8032 §5.1.5)."""
    return key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )


def key_id(public_key: bytes) -> str:
    """Return the key id: hex SHA-256 of the DER SubjectPublicKeyInfo (RFC 6962 §3.2).

    Raises:
        SignatureError: ``public_key`` is not a 32-byte Ed25519 public key.
    """
    der = _public_key(public_key).public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return hashlib.sha256(der).hexdigest()


def _public_key(public_key: bytes) -> Ed25519PublicKey:
    if len(public_key) != _PUBLIC_KEY_BYTES:
        raise SignatureError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return Ed25519PublicKey.from_public_bytes(public_key)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: the log's size, its root hash and the time (RFC 9162 §4.9).

    Args:
        tree_size: Number of entries the root covers.
        root_hash: ``MTH(D[tree_size])`` (RFC 9162 §2.1.1).
        timestamp_ms: Milliseconds since the Unix epoch, UTC.
    """

    tree_size: int
    root_hash: bytes
    timestamp_ms: int

    def __post_init__(self) -> None:
        if self.tree_size < 0:
            raise ValueError(f"tree_size must be >= 0, got {self.tree_size}")
        if len(self.root_hash) != HASH_SIZE:
            raise ValueError(f"root_hash must have {HASH_SIZE} bytes, got {len(self.root_hash)}")
        if not 0 <= self.timestamp_ms < 2**63:
            raise ValueError(f"timestamp_ms out of range: {self.timestamp_ms}")

    @property
    def timestamp(self) -> datetime:
        """The checkpoint time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC)

    def signed_data(self) -> bytes:
        """Return the bytes that are signed: a context label and ``TreeHeadDataV2``.

        ``TreeHeadDataV2`` (RFC 9162 §4.9) is ``uint64 timestamp; uint64 tree_size;
        opaque NodeHash<32..2^8-1>; Extension sth_extensions<0..2^16-1>`` (empty extensions).
        """
        return (
            _SIGNING_CONTEXT
            + struct.pack(">QQB", self.timestamp_ms, self.tree_size, len(self.root_hash))
            + self.root_hash
            + struct.pack(">H", 0)
        )


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint with its Ed25519 signature and the signer's public key."""

    checkpoint: Checkpoint
    public_key: bytes
    signature: bytes

    @property
    def tree_size(self) -> int:
        """Number of entries covered."""
        return self.checkpoint.tree_size

    @property
    def root_hash(self) -> bytes:
        """The signed root hash."""
        return self.checkpoint.root_hash

    @property
    def key_id(self) -> str:
        """Identifier of the signing key (see :func:`key_id`)."""
        return key_id(self.public_key)

    def verify(self, trusted_keys: Collection[bytes] | None = None) -> None:
        """Check the signature and, if given, that the signer is one of ``trusted_keys``.

        Args:
            trusted_keys: Raw Ed25519 public keys the verifier trusts; None accepts the
                embedded key (self-consistency only).

        Raises:
            SignatureError: The signature is invalid or the key is not trusted.
        """
        if trusted_keys is not None and self.public_key not in trusted_keys:
            raise SignatureError(
                f"checkpoint of size {self.tree_size} is signed by key {self.key_id[:16]}…, "
                "which is not a trusted key"
            )
        if len(self.signature) != _SIGNATURE_BYTES:
            raise SignatureError(
                f"checkpoint of size {self.tree_size}: an Ed25519 signature has 64 bytes, "
                f"got {len(self.signature)}"
            )
        try:
            _public_key(self.public_key).verify(self.signature, self.checkpoint.signed_data())
        except InvalidSignature as exc:
            raise SignatureError(
                f"checkpoint of size {self.tree_size} has an invalid signature"
            ) from exc

    def to_json(self) -> dict[str, Any]:
        """Return the signed checkpoint as a JSON object."""
        return {
            "tree_size": self.tree_size,
            "root_hash": self.root_hash.hex(),
            "timestamp_ms": self.checkpoint.timestamp_ms,
            "signature_algorithm": SIGNATURE_ALGORITHM,
            "key_id": self.key_id,
            "public_key": b64encode(self.public_key),
            "signature": b64encode(self.signature),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SignedCheckpoint:
        """Rebuild a signed checkpoint from :meth:`to_json` output (signature not checked).

        Raises:
            ExportFormatError: A field is missing or malformed.
        """
        with malformed_as(ExportFormatError, "checkpoint"):
            if data.get("signature_algorithm", SIGNATURE_ALGORITHM) != SIGNATURE_ALGORITHM:
                raise ExportFormatError(
                    f"unsupported signature algorithm {data['signature_algorithm']!r}"
                )
            tree_size = data["tree_size"]
            timestamp_ms = data["timestamp_ms"]
            if not isinstance(tree_size, int) or not isinstance(timestamp_ms, int):
                raise ExportFormatError("checkpoint tree_size and timestamp_ms must be integers")
            checkpoint = Checkpoint(
                tree_size=tree_size,
                root_hash=bytes.fromhex(str(data["root_hash"])),
                timestamp_ms=timestamp_ms,
            )
            return cls(
                checkpoint=checkpoint,
                public_key=b64decode(str(data["public_key"]), what="checkpoint public key"),
                signature=b64decode(str(data["signature"]), what="checkpoint signature"),
            )

    def save(self, path: Path) -> None:
        """Write the checkpoint to a JSON file (keep it apart from the log, for ``--since``)."""
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> SignedCheckpoint:
        """Read a checkpoint written by :meth:`save`.

        Raises:
            ExportFormatError: The file is missing or not a checkpoint.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ExportFormatError(f"checkpoint file {path} not found") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportFormatError(f"{path} is not a JSON checkpoint file") from exc
        if not isinstance(data, dict):
            raise ExportFormatError(f"{path} is not a JSON checkpoint file")
        return cls.from_json(data)


def sign_checkpoint(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> SignedCheckpoint:
    """Sign a checkpoint with the log's Ed25519 key (RFC 9162 §4.10, RFC 8032)."""
    return SignedCheckpoint(
        checkpoint=checkpoint,
        public_key=raw_public_key(key.public_key()),
        signature=key.sign(checkpoint.signed_data()),
    )
