"""The TenSEAL adapter and raw SEAL engine: the only fedcrm module that imports tenseal.

It packs two reals per complex slot through SEAL's encoder, sends a ciphertext as its raw
coefficients, adds them modulo q in NumPy, and rebuilds SEAL ciphertexts and TenSEAL
``CKKSVector`` protobufs byte by byte for decryption and TenSEAL's own addition. That reads
and writes TenSEAL/SEAL's internal serialization formats, so it holds only for the TenSEAL
version in :data:`SEAL_FORMAT_TENSEAL` (tests/unit/privacy/test_he_engine.py checks it).
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt

# The one sanctioned tenseal import (ruff bans it everywhere else); sealapi registers SEAL's
# types (Modulus, ...) that are read to check a loaded context's parameters.
import tenseal as ts
import tenseal.sealapi

from fedcrm.privacy.he._errors import CiphertextCorruptedError, HEError, InvalidParametersError
from fedcrm.privacy.he._parameters import CKKSParameters

#: The TenSEAL release whose formats this module reads and writes: ``CKKSVectorProto``, SEAL's
#: ``Ciphertext::save`` layout and the coefficient order of ``dyn_array``. Bump it only after
#: tests/unit/privacy/test_he_engine.py passes against the new release.
SEAL_FORMAT_TENSEAL: Final = "0.3.18"

Chunk: TypeAlias = bytes | memoryview
"""One ciphertext's raw coefficients as carried by an update."""


def tenseal_version() -> str:
    """The version of the TenSEAL package actually imported."""
    return str(ts.__version__)


# --------------------------------------------------------------------------------------------
# Contexts (TenSEAL's own API)
# --------------------------------------------------------------------------------------------


def native_context(params: CKKSParameters) -> Any:
    """A new TenSEAL CKKS context with a fresh key (public-key encryption, one thread).

    Raises:
        InvalidParametersError: TenSEAL/SEAL refused the parameters.
    """
    try:
        ts_ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
            n_threads=1,
        )
    except (ValueError, RuntimeError) as exc:
        raise InvalidParametersError(f"TenSEAL refused the CKKS parameters: {exc}") from exc
    ts_ctx.global_scale = params.scale
    return ts_ctx


def load_native_context(data: bytes) -> Any:
    """Parse a serialized TenSEAL context.

    Raises:
        CiphertextCorruptedError: The bytes are not a TenSEAL context.
    """
    try:
        return ts.context_from(data, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CiphertextCorruptedError(
            f"the context bytes ({len(data)} B) cannot be parsed: {exc}"
        ) from exc


def context_parameters(ts_ctx: Any) -> tuple[bool, int, tuple[int, ...], float]:
    """Read (is CKKS, N, prime sizes, scale) from a TenSEAL context's SEAL parameters.

    Raises:
        CiphertextCorruptedError: The parameters cannot be read.
    """
    try:
        parms = ts_ctx.seal_context().data.key_context_data().parms()
        n = int(parms.poly_modulus_degree())
        bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
        scheme_ok = getattr(parms.scheme(), "name", "") == "CKKS"
        scale = float(ts_ctx.global_scale)
    except (ValueError, RuntimeError, AttributeError, TypeError) as exc:
        raise CiphertextCorruptedError(f"cannot read the context's parameters: {exc}") from exc
    return scheme_ok, n, bits, scale


# --------------------------------------------------------------------------------------------
# Raw ciphertexts: two reals per slot, coefficients on the wire
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ring:
    """What raw-coefficient arithmetic needs from a context: N, the data primes, parms_id."""

    degree: int
    moduli: npt.NDArray[np.uint64]  # shape (1, primes, 1): broadcasts over (2, primes, N)
    parms_id: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(polynomials, primes, N) of a fresh ciphertext's coefficient array."""
        return (2, self.moduli.size, self.degree)

    @property
    def nbytes(self) -> int:
        """Bytes of one chunk (a fresh ciphertext's coefficients, 8 B each)."""
        return 2 * self.moduli.size * self.degree * 8


def ring_of(ts_ctx: Any, degree: int) -> Ring:
    """The ring of a TenSEAL context (its first data level).

    Raises:
        HEError: SEAL's context data cannot be read.
    """
    try:
        data = ts_ctx.seal_context().data.first_context_data()
        moduli = [int(m.value()) for m in data.parms().coeff_modulus()]
        parms_id = tuple(int(w) for w in data.parms_id())
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise HEError(f"cannot read the context's ring: {exc}") from exc
    return Ring(
        degree=degree,
        moduli=np.array(moduli, dtype=np.uint64).reshape(1, -1, 1),
        parms_id=parms_id,
    )


def coefficients(ciphertext: Any, ring: Ring) -> npt.NDArray[np.uint64]:
    """A fresh ciphertext's coefficients (SEAL layout: polynomial, prime, coefficient)."""
    if int(ciphertext.size()) != 2 or tuple(ciphertext.parms_id()) != ring.parms_id:
        raise HEError("unexpected ciphertext shape or level from SEAL's encryptor")
    words = ciphertext.dyn_array()
    count = int(words.size())
    if count != 2 * ring.moduli.size * ring.degree:
        raise HEError(f"SEAL returned {count} coefficients, expected {ring.nbytes // 8}")
    # tenseal.sealapi offers no buffer access to a ciphertext, only element reads.
    return np.fromiter(map(words.at, range(count)), dtype="<u8", count=count)


def encrypt_chunks(
    ts_ctx: Any, ring: Ring, values: npt.NDArray[np.float64], *, scale: float, per_ct: int
) -> list[bytes]:
    """Encrypt ``values`` with the public key, ``per_ct`` reals (two per slot) per ciphertext.

    Raises:
        HEError: SEAL failed.
    """
    chunks: list[bytes] = []
    try:
        encoder = tenseal.sealapi.CKKSEncoder(ts_ctx.seal_context().data)
        encryptor = ts_ctx.encryptor().data
        for start in range(0, values.size, per_ct):
            part = values[start : start + per_ct]
            if part.size % 2:
                part = np.append(part, 0.0)
            plain = tenseal.sealapi.Plaintext()
            encoder.encode((part[0::2] + 1j * part[1::2]).tolist(), scale, plain)
            ciphertext = tenseal.sealapi.Ciphertext()
            encryptor.encrypt(plain, ciphertext)
            chunks.append(coefficients(ciphertext, ring).tobytes())
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HEError(f"SEAL failed to encrypt the update: {exc}") from exc
    return chunks


def decrypt_chunks(
    ts_ctx: Any,
    ring: Ring,
    arrays: Sequence[npt.NDArray[np.uint64]],
    *,
    length: int,
    scale: float,
    per_ct: int,
) -> npt.NDArray[np.float64]:
    """Decrypt coefficient arrays (from :func:`parse_chunks`) into ``length`` reals.

    Raises:
        HEError: SEAL failed (its loader refused a ciphertext, or decryption failed).
    """
    out = np.empty(length, dtype=np.float64)
    try:
        seal_context = ts_ctx.seal_context().data
        encoder = tenseal.sealapi.CKKSEncoder(seal_context)
        decryptor = ts_ctx.decryptor().data
        with _scratch_file() as path:
            for j, words in enumerate(arrays):
                ciphertext = _load_ciphertext(ring, scale, words, seal_context, path)
                plain = tenseal.sealapi.Plaintext()
                decryptor.decrypt(ciphertext, plain)
                slots = np.asarray(encoder.decode_complex(plain))
                start = j * per_ct
                count = min(per_ct, length - start)
                values = np.empty(2 * slots.size)
                values[0::2], values[1::2] = slots.real, slots.imag
                out[start : start + count] = values[:count]
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        raise HEError(f"SEAL failed to decrypt the update: {exc}") from exc
    return out


def seal_header(size: int) -> bytes:
    """SEAL's 16-byte serialization header, uncompressed, for the linked SEAL version."""
    version = tenseal.sealapi.Serialization.SEALHeader()
    return struct.pack(
        "<HBBBBHQ",
        int(version.magic),
        int(version.header_size),
        int(version.version_major),
        int(version.version_minor),
        0,  # compr_mode_type::none
        0,
        size,
    )


def seal_ciphertext_bytes(ring: Ring, scale: float, words: npt.NDArray[np.uint64]) -> bytes:
    """``Ciphertext::save``'s uncompressed layout for a fresh-size (2-polynomial) ciphertext.

    Header; parms_id, is_ntt_form, size, poly_modulus_degree, coeff_modulus_size, scale,
    correction_factor; then the coefficient array (header, count, words).
    """
    body = struct.pack("<Q", words.size) + words.astype("<u8", copy=False).tobytes()
    array = seal_header(16 + len(body)) + body
    members = b"".join(
        (
            struct.pack("<4Q", *ring.parms_id),
            b"\x01",  # CKKS ciphertexts are kept in NTT form
            struct.pack("<QQQdQ", 2, ring.degree, ring.moduli.size, scale, 1),
            array,
        )
    )
    return seal_header(16 + len(members)) + members


def _load_ciphertext(
    ring: Ring, scale: float, words: npt.NDArray[np.uint64], seal_context: Any, path: str
) -> Any:
    """Rebuild a SEAL ciphertext from coefficients through SEAL's own (validating) loader.

    ``Ciphertext.load`` checks the bytes of :func:`seal_ciphertext_bytes` against the context.
    """
    with open(path, "wb") as handle:
        handle.write(seal_ciphertext_bytes(ring, scale, words))
    ciphertext = tenseal.sealapi.Ciphertext()
    ciphertext.load(seal_context, path)
    return ciphertext


@contextlib.contextmanager
def _scratch_file() -> Iterator[str]:
    """A path for SEAL's path-only ``load``: an anonymous in-memory file where available.

    Ciphertexts are not secret; this is plumbing, not a confidentiality measure.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("fedcrm-ciphertext", os.MFD_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
    else:  # pragma: no cover - non-Linux
        with tempfile.TemporaryDirectory(prefix="fedcrm-he-") as folder:
            yield os.path.join(folder, "ciphertext")


# --------------------------------------------------------------------------------------------
# Summation: modular addition in NumPy, or TenSEAL's own CKKSVector addition
# --------------------------------------------------------------------------------------------


def parse_chunks(
    ring: Ring, chunks: Sequence[Chunk], *, index: int | None
) -> list[npt.NDArray[np.uint64]]:
    """View each chunk as its (2, primes, N) coefficient array, checking size and range.

    CRC-32s were verified by ``EncryptedUpdate.from_bytes``, where bytes enter the process.

    Raises:
        CiphertextCorruptedError: A chunk has the wrong size or a coefficient >= its prime.
    """
    arrays = []
    for j, chunk in enumerate(chunks):
        if len(chunk) != ring.nbytes:
            raise CiphertextCorruptedError(
                f"chunk {j} has {len(chunk)} B, expected {ring.nbytes} (2 polynomials x "
                f"{ring.degree} coefficients x {ring.moduli.size} primes x 8 B)",
                index=index,
            )
        words = np.frombuffer(chunk, dtype="<u8").reshape(ring.shape)
        if (words.max(axis=(0, 2)) >= ring.moduli.ravel()).any():  # one pass, no temporary
            raise CiphertextCorruptedError(
                f"chunk {j} holds coefficients >= the ciphertext modulus: not a ciphertext "
                "under these parameters",
                index=index,
            )
        arrays.append(words)
    return arrays


def sum_numpy(ring: Ring, updates: Sequence[Sequence[Chunk]]) -> list[bytes]:
    """Add the updates' chunks coefficient-wise modulo each prime (SEAL's add_poly_coeffmod).

    Raises:
        CiphertextCorruptedError: A chunk is malformed (the index names its update).
    """
    acc = [words.astype(np.uint64) for words in parse_chunks(ring, updates[0], index=0)]
    scratch = np.empty(ring.shape, dtype=np.uint64)
    for i, chunks in enumerate(updates[1:], start=1):
        for j, words in enumerate(parse_chunks(ring, chunks, index=i)):
            # Inputs are < q <= 2^60, so the uint64 sum cannot overflow; branch-free reduction:
            # min(s, s - q) is s - q when s >= q, else s (s - q wraps around to a huge value).
            np.add(acc[j], words, out=acc[j])
            np.subtract(acc[j], ring.moduli, out=scratch)
            np.minimum(acc[j], scratch, out=acc[j])
    return [a.astype("<u8", copy=False).tobytes() for a in acc]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def ckks_vector_proto(ring: Ring, scale: float, words: npt.NDArray[np.uint64]) -> bytes:
    """A TenSEAL ``CKKSVectorProto`` (tenseal/proto/tensors.proto) holding one ciphertext.

    Fields: 1 ``sizes`` (packed uint32: the slots in use, here all N/2 complex slots),
    2 ``ciphertexts`` (SEAL-serialized bytes), 3 ``scale`` (double).
    """
    sizes = _varint(ring.degree // 2)
    ciphertext = seal_ciphertext_bytes(ring, scale, words)
    return b"".join(
        (
            b"\x0a",
            _varint(len(sizes)),
            sizes,
            b"\x12",
            _varint(len(ciphertext)),
            ciphertext,
            b"\x19",
            struct.pack("<d", scale),
        )
    )


def sum_tenseal(
    ts_ctx: Any, ring: Ring, updates: Sequence[Sequence[Chunk]], *, scale: float
) -> list[bytes]:
    """Sum chunk-wise with TenSEAL ``CKKSVector.add_`` (SEAL's ``Evaluator::add_inplace``).

    Every chunk enters TenSEAL through its protobuf loader, which runs SEAL's
    ``Ciphertext::load`` validation against the (public) context; the sum is read back as
    coefficients. Same result as :func:`sum_numpy`, byte for byte.

    Raises:
        CiphertextCorruptedError: TenSEAL refused a chunk (the index names its update).
        HEError: The sum cannot be read back.
    """
    acc: list[Any] = []
    for i, chunks in enumerate(updates):
        for j, words in enumerate(parse_chunks(ring, chunks, index=i)):
            try:
                vector = ts._ts_cpp.CKKSVector(ts_ctx.data, ckks_vector_proto(ring, scale, words))
                if i == 0:
                    acc.append(vector)
                else:
                    acc[j].add_(vector)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CiphertextCorruptedError(
                    f"TenSEAL refused chunk {j}: {exc}", index=i
                ) from exc
    out = []
    seal_context = ts_ctx.seal_context().data
    try:
        with _scratch_file() as path:
            for vector in acc:
                (ciphertext,) = vector.ciphertext()
                ciphertext.save(path)  # TenSEAL's binding of SEAL's save (zstd-compressed)
                loaded = tenseal.sealapi.Ciphertext()
                loaded.load(seal_context, path)
                out.append(coefficients(loaded, ring).tobytes())
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        raise HEError(f"cannot read TenSEAL's sum back: {exc}") from exc
    return out
