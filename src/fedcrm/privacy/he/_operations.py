"""Operations on encrypted updates: encrypt, check, sum without the secret key, decrypt.

Branches pre-weight their update by their example count (``n_k * u_k``) and encrypt it; the
server checks every envelope and adds the ciphertexts with a public-only context; branches
decrypt the aggregate and divide by the summed count.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedcrm.privacy.he import _engine
from fedcrm.privacy.he._codec import EncryptedUpdate
from fedcrm.privacy.he._contexts import HEContext
from fedcrm.privacy.he._errors import (
    ContextKindError,
    KeyMismatchError,
    ParameterMismatchError,
    StaleKeyError,
    UnknownKeyError,
    UpdateShapeError,
    ValueRangeError,
)

logger = logging.getLogger(__name__)


def _make_update(
    ctx: HEContext, length: int, summands: int, chunks: list[bytes]
) -> EncryptedUpdate:
    return EncryptedUpdate(
        key_id=ctx.key_id,
        params_fingerprint=ctx.params.fingerprint,
        length=length,
        summands=summands,
        chunks=tuple(chunks),
        checksums=tuple(zlib.crc32(c) for c in chunks),
    )


def _check_key(ctx: HEContext, key_id: str, *, what: str, index: int | None = None) -> None:
    if key_id == ctx.key_id:
        return
    generation = ctx.retired_key_ids.get(key_id)
    if generation is not None:
        raise StaleKeyError(
            f"{what} key id {key_id[:12]}... is from key generation {generation}, which has been "
            f"rotated out; the current generation is {ctx.generation} (key id "
            f"{ctx.key_id[:12]}...): load the current secret context and encrypt again",
            index=index,
        )
    raise UnknownKeyError(
        f"{what} key id {key_id[:12]}... is unknown (this context's key id is "
        f"{ctx.key_id[:12]}...): it was encrypted under another federation's key or is forged",
        index=index,
    )


def encrypt_update(
    ctx: HEContext, vector: npt.NDArray[np.floating[Any]], *, key_id: str
) -> EncryptedUpdate:
    """Encrypt a branch's pre-weighted, flattened update, packing every slot.

    Args:
        ctx: The branch's secret context (a public context also encrypts: it holds the public
            key).
        vector: 1-D array of pre-weighted values ``n_k * u_k``, each of magnitude at most
            ``ctx.params.max_abs_value``.
        key_id: The key id the round asks for (announced by the server). It must be the
            context's, so that a branch holding a stale key fails here rather than at the
            server.

    Returns:
        The encrypted update (``summands == 1``), one ciphertext per
        ``values_per_ciphertext`` values (two per complex slot).

    Raises:
        KeyMismatchError: ``key_id`` is not the context's key id.
        UpdateShapeError: ``vector`` is not a non-empty 1-D array.
        ValueRangeError: ``vector`` holds NaN/inf or a value beyond ``max_abs_value``.

    Notes:
        Public-key encryption: each ciphertext uses fresh randomness, so equal updates give
        unrelated ciphertexts. The range check is what makes the server-side sum safe: CKKS
        wraps around silently when a sum exceeds q/2.
    """
    if key_id != ctx.key_id:
        raise KeyMismatchError(
            f"asked to encrypt under key id {key_id[:12]}... but the loaded context's key id is "
            f"{ctx.key_id[:12]}... (generation {ctx.generation}); load the matching secret context"
        )
    arr = np.asarray(vector)
    if arr.ndim != 1 or arr.size == 0:
        raise UpdateShapeError(f"expected a non-empty 1-D vector, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise UpdateShapeError(f"expected a real-valued vector, got dtype {arr.dtype}")
    values = arr.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValueRangeError(f"value at index {bad} is {values[bad]}; updates must be finite")
    limit = ctx.params.max_abs_value
    peak = int(np.argmax(np.abs(values)))
    if abs(values[peak]) > limit:
        raise ValueRangeError(
            f"value at index {peak} has magnitude {abs(values[peak]):.4g}, beyond the declared "
            f"range {limit:g} (max_abs_value): a sum of {ctx.params.max_summands} such values "
            "could wrap around the modulus; clip the update or lower the weights"
        )
    ring = _engine.ring_of(ctx._ts, ctx.params.poly_modulus_degree)
    chunks = _engine.encrypt_chunks(
        ctx._ts,
        ring,
        values,
        scale=ctx.params.scale,
        per_ct=ctx.params.values_per_ciphertext,
    )
    return _make_update(ctx, int(values.size), 1, chunks)


def check_update(ctx: HEContext, update: EncryptedUpdate, *, index: int | None = None) -> None:
    """Check an update's envelope against a context without touching the ciphertexts.

    Args:
        ctx: The context (public or secret) the update must belong to.
        update: The update to check.
        index: Position in a batch, reported in the error (see :attr:`HEError.index`).

    Raises:
        StaleKeyError: It was encrypted under a rotated-out key generation.
        UnknownKeyError: It was encrypted under a key this context does not know.
        ParameterMismatchError: Its CKKS parameters differ from the context's.
        UpdateShapeError: Its chunk count does not match its length.
        ValueRangeError: Its summand count is out of range.
    """
    _check_key(ctx, update.key_id, what="the update's", index=index)
    if update.params_fingerprint != ctx.params.fingerprint:
        raise ParameterMismatchError(
            f"the update was made with CKKS parameters {update.params_fingerprint[:12]}..., "
            f"the context has {ctx.params.fingerprint[:12]}... "
            f"({ctx.params.to_dict()})",
            index=index,
        )
    if update.length < 1:
        raise UpdateShapeError(f"length must be >= 1, got {update.length}", index=index)
    expected = ctx.params.chunk_count(update.length)
    if len(update.chunks) != expected or len(update.checksums) != expected:
        raise UpdateShapeError(
            f"{len(update.chunks)} ciphertext chunks for {update.length} values; expected "
            f"{expected} ({ctx.params.values_per_ciphertext} values per chunk)",
            index=index,
        )
    if not 1 <= update.summands <= ctx.params.max_summands:
        raise ValueRangeError(
            f"summand count {update.summands} outside 1..{ctx.params.max_summands}", index=index
        )


SumEngine = Literal["numpy", "tenseal"]
"""How :func:`sum_encrypted` adds ciphertexts: coefficient arrays modulo q in NumPy, or
TenSEAL ``CKKSVector`` objects added with TenSEAL's own ``add_``. Both give identical bytes."""


def sum_encrypted(
    ctx: HEContext, updates: Sequence[EncryptedUpdate], *, engine: SumEngine = "numpy"
) -> EncryptedUpdate:
    """Add encrypted updates without the secret key (the server's aggregation step).

    Args:
        ctx: The server's public context (a secret context works too, but the server should
            never hold one).
        updates: Updates of equal length under ``ctx``'s key; sums of sums are allowed.
        engine: ``"numpy"`` (default) adds the raw coefficients modulo each prime, exactly
            SEAL's ``add_poly_coeffmod``; ``"tenseal"`` rebuilds every chunk as a TenSEAL
            ``CKKSVector`` (through SEAL's validating ciphertext loader) and adds them with
            TenSEAL's ``CKKSVector.add_``. The results are byte-identical (tested); NumPy is
            the default because it is several times faster on the server, which adds for
            every branch: 20 updates of 10,000 values, 3.0 GB/s against 0.39 GB/s on the
            2-core VM (7.7x; ``bench/he_rounds.py`` measures both). The TenSEAL path exists
            so that "real TenSEAL ciphertexts, added by the server" holds literally and the
            NumPy arithmetic is checked against it.

    Returns:
        The encrypted sum; its ``summands`` is the total of the inputs'.

    Raises:
        ValueError: ``updates`` is empty.
        KeyMismatchError: An update is under a stale or unknown key (``StaleKeyError`` /
            ``UnknownKeyError``).
        ParameterMismatchError: An update was made with other CKKS parameters.
        UpdateShapeError: Lengths differ, or an update has a wrong number of chunks.
        CiphertextCorruptedError: A chunk cannot be deserialized (CRCs are checked by
            :meth:`EncryptedUpdate.from_bytes`).
        ValueRangeError: The total summand count exceeds ``max_summands`` (the sum could wrap).

    Notes:
        The inputs are never modified and nothing is returned on error, so a caller can drop
        the update named by ``error.index`` and sum the rest. All envelope checks (key ids,
        parameters, shapes, summand count) run before any ciphertext is parsed; a chunk that
        fails to deserialize is reported during the sum, with its update's index.
    """
    if not updates:
        raise ValueError("sum_encrypted needs at least one update")
    length = updates[0].length
    for i, update in enumerate(updates):
        check_update(ctx, update, index=i)
        if update.length != length:
            raise UpdateShapeError(
                f"length {update.length} differs from update #0's {length}", index=i
            )
    total = sum(u.summands for u in updates)
    if total > ctx.params.max_summands:
        raise ValueRangeError(
            f"summing {total} encryptions exceeds max_summands = {ctx.params.max_summands}: the "
            "sum could wrap around the modulus (parameters were sized for that many branches)"
        )
    ring = _engine.ring_of(ctx._ts, ctx.params.poly_modulus_degree)
    chunks = [u.chunks for u in updates]
    if engine == "tenseal":
        return _make_update(
            ctx, length, total, _engine.sum_tenseal(ctx._ts, ring, chunks, scale=ctx.params.scale)
        )
    if engine != "numpy":
        raise ValueError(f"engine must be 'numpy' or 'tenseal', got {engine!r}")
    summed = _engine.sum_numpy(ring, chunks)
    logger.debug("summed %d encrypted updates of %d values", len(updates), length)
    return _make_update(ctx, length, total, summed)


def decrypt(ctx: HEContext, enc: EncryptedUpdate) -> npt.NDArray[np.float64]:
    """Decrypt an (aggregated) update with the branch's secret context.

    Args:
        ctx: A secret context.
        enc: The encrypted update or sum.

    Returns:
        The 1-D float64 vector of ``enc.length`` values; for a sum, divide by the summed
        example count to get the weighted mean.

    Raises:
        ContextKindError: ``ctx`` is public-only (the server's) and cannot decrypt.
        KeyMismatchError: ``enc`` is under a stale or unknown key.
        ParameterMismatchError: ``enc`` was made with other CKKS parameters.
        UpdateShapeError: ``enc`` has a wrong number of chunks for its length.
        CiphertextCorruptedError: A chunk cannot be deserialized (CRCs are checked by
            :meth:`EncryptedUpdate.from_bytes`).

    Notes:
        CKKS decryption output carries the encryption noise. Whoever holds both a ciphertext
        and its exact decryption (the server, if a branch sent the decrypted aggregate back)
        can recover information about the secret key: the passive key-recovery attack of
        Li and Micciancio, "On the Security of Homomorphic Encryption on Approximate
        Numbers" (EUROCRYPT 2021). Keep decrypted aggregates on the branches; anything sent
        back must first be perturbed by noise well above ``params.error_bound`` (DP noise
        does this) or be a coarse derived quantity (metrics).
    """
    if ctx.is_public():
        raise ContextKindError(
            "cannot decrypt with a public-only context: the secret key is held by the "
            "branches only (load the secret context with fedcrm.privacy.keys.load_secret_context)"
        )
    check_update(ctx, enc)
    ring = _engine.ring_of(ctx._ts, ctx.params.poly_modulus_degree)
    arrays = _engine.parse_chunks(ring, enc.chunks, index=None)
    return _engine.decrypt_chunks(
        ctx._ts,
        ring,
        arrays,
        length=enc.length,
        scale=ctx.params.scale,
        per_ct=ctx.params.values_per_ciphertext,
    )
