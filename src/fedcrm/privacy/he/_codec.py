"""The FCHE wire codec of an encrypted update: envelope, JSON header, CRC-32s, chunks.

:class:`EncryptedUpdate` is what a branch sends and the server sums; ``to_bytes`` and
``from_bytes`` are its only wire form, and parsing checks every byte before anything is summed.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Final

from fedcrm.privacy.he._errors import CiphertextCorruptedError

_MAGIC: Final = b"FCHE"
_VERSION: Final = 1
_PREFIX: Final = struct.Struct(">4sBII")  # magic, version, header length, header CRC-32
_MAX_HEADER: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class EncryptedUpdate:
    """A CKKS-encrypted flat vector: what a branch sends and what the server sums.

    Attributes:
        key_id: Key id of the context it was encrypted under.
        params_fingerprint: :attr:`CKKSParameters.fingerprint` of that context.
        length: Number of plaintext values.
        summands: Number of fresh encryptions summed into it (1 for a branch's update).
        chunks: One ciphertext per ``values_per_ciphertext`` values: its raw coefficients,
            little-endian uint64 in SEAL's layout (polynomial, prime, coefficient). Parsed
            updates hold read-only views into the received bytes (no copy).
        checksums: CRC-32 of each chunk, to detect truncation or corruption in transit.

    Notes:
        The CRCs detect accidental damage only: an altered coefficient is still a valid
        ciphertext and decrypts to garbage. Authenticity of the sender is the transport's job
        (TLS and SuperNode authentication in Flower's deployment engine).
    """

    key_id: str
    params_fingerprint: str
    length: int
    summands: int
    chunks: tuple[bytes | memoryview, ...]
    checksums: tuple[int, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        """Copy with the chunks as ``bytes`` (a parsed update holds memoryviews), e.g. for Ray."""
        chunks = tuple(bytes(c) for c in self.chunks)
        fields = (self.key_id, self.params_fingerprint, self.length, self.summands, chunks)
        return (EncryptedUpdate, (*fields, self.checksums))

    @property
    def nbytes(self) -> int:
        """Ciphertext bytes (the chunks, without the small envelope header)."""
        return sum(len(c) for c in self.chunks)

    def to_bytes(self) -> bytes:
        """Serialize to the wire form.

        Layout: magic ``FCHE``, version, header size and CRC-32, JSON header (key id,
        parameter fingerprint, length, summands, chunk sizes and CRC-32s), chunks. Every byte
        is covered by a CRC-32 or a structural check.
        """
        header = json.dumps(
            {
                "key_id": self.key_id,
                "params": self.params_fingerprint,
                "length": self.length,
                "summands": self.summands,
                "chunks": [
                    [len(c), crc] for c, crc in zip(self.chunks, self.checksums, strict=True)
                ],
            },
            separators=(",", ":"),
        ).encode()
        prefix = _PREFIX.pack(_MAGIC, _VERSION, len(header), zlib.crc32(header))
        return b"".join((prefix, header, *self.chunks))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> EncryptedUpdate:
        """Parse :meth:`to_bytes` output, checking structure, sizes and CRCs.

        Args:
            data: The serialized update.

        Raises:
            CiphertextCorruptedError: The bytes are truncated, padded, altered or not an
                encrypted update; the message says which part.
        """
        # Chunks are views into ``data``; copy a mutable buffer once so they cannot change later.
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        if len(view) < _PREFIX.size:
            raise CiphertextCorruptedError(
                f"encrypted update truncated: {len(view)} B, "
                f"shorter than its {_PREFIX.size}-B prefix"
            )
        magic, version, header_len, header_crc = _PREFIX.unpack_from(view)
        if magic != _MAGIC:
            raise CiphertextCorruptedError("not a fedcrm encrypted update (bad magic bytes)")
        if version != _VERSION:
            raise CiphertextCorruptedError(
                f"unsupported encrypted-update format version {version} (expected {_VERSION})"
            )
        if header_len > _MAX_HEADER or _PREFIX.size + header_len > len(view):
            raise CiphertextCorruptedError(
                f"encrypted update truncated: header of {header_len} B announced, "
                f"{len(view) - _PREFIX.size} B present"
            )
        header_bytes = bytes(view[_PREFIX.size : _PREFIX.size + header_len])
        if zlib.crc32(header_bytes) != header_crc:
            raise CiphertextCorruptedError("encrypted-update header fails its CRC-32 check")
        try:
            header = json.loads(header_bytes)
            key_id = header["key_id"]
            fingerprint = header["params"]
            length = header["length"]
            summands = header["summands"]
            chunk_meta = [(n, crc) for n, crc in header["chunks"]]
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CiphertextCorruptedError(f"encrypted-update header is malformed: {exc}") from exc
        if not (isinstance(key_id, str) and isinstance(fingerprint, str)):
            raise CiphertextCorruptedError("encrypted-update header: key id / params not strings")
        if not all(_is_count(v) for v in (length, summands)):
            raise CiphertextCorruptedError("encrypted-update header: length / summands not counts")
        if not all(_is_count(n) and _is_count(crc) and crc < 2**32 for n, crc in chunk_meta):
            raise CiphertextCorruptedError("encrypted-update header: bad chunk sizes / CRCs")
        offset = _PREFIX.size + header_len
        expected = offset + sum(n for n, _ in chunk_meta)
        if expected != len(view):
            what = "truncated" if len(view) < expected else "has trailing bytes"
            raise CiphertextCorruptedError(
                f"encrypted update {what}: {len(view)} B present, {expected} B announced"
            )
        chunks = []
        for j, (n, crc) in enumerate(chunk_meta):
            chunk = view[offset : offset + n]  # zero-copy: ``view`` is over immutable bytes
            if zlib.crc32(chunk) != crc:
                raise CiphertextCorruptedError(f"ciphertext chunk {j} fails its CRC-32 check")
            chunks.append(chunk)
            offset += n
        return cls(
            key_id, fingerprint, length, summands, tuple(chunks), tuple(c for _, c in chunk_meta)
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
