"""TenSEAL CKKS adapter for encrypted federated averaging: the only fedcrm module importing tenseal.

Branches pre-weight their update by their example count (``n_k * u_k``), encrypt it under the
federation's CKKS public key and send the ciphertext with its count; the server adds ciphertexts
with a *public-only* context and never sees a plaintext; the branches decrypt the aggregate and
divide by the summed count. Everything TenSEAL-specific stays here: other modules see plain
``bytes``, NumPy arrays and the small frozen dataclasses below, and every TenSEAL failure is
re-raised as an :class:`HEError` subclass whose message says what was wrong.

Typical use (the HE strategy wrapper and the client mod do this)::

    pair = create_contexts()                                   # key authority (fedcrm keys)
    wire = encrypt_update(pair.secret, n_k * u_k, key_id=kid).to_bytes()       # branch
    total = sum_encrypted(pair.public, [EncryptedUpdate.from_bytes(w) for w in wires])
    mean = decrypt(pair.secret, total) / sum(counts)                           # branch

Keys, ciphertexts and their parameters are explained in :class:`CKKSParameters`.

Error hierarchy (all subclasses of :class:`fedcrm.exceptions.FedCrmError`)::

    HEError                       any homomorphic-encryption failure
    ├── InvalidParametersError    parameters insecure or too small for the range (+ ConfigError)
    ├── KeyMismatchError          ciphertext or caller names a key other than the context's
    │   ├── UnknownKeyError       a key id this federation never issued
    │   └── StaleKeyError         a key id of an older, rotated-out key generation
    ├── ParameterMismatchError    update or context made with other CKKS parameters
    ├── CiphertextCorruptedError  truncated, altered or unparseable ciphertext bytes
    ├── UpdateShapeError          length / chunk count inconsistent (+ InconsistentReplies)
    ├── ValueRangeError           NaN/inf, values beyond the declared range, too many summands
    └── ContextKindError          public context where the secret one is needed, or vice versa

Implementation based on the CKKS scheme of Cheon, Kim, Kim and Song, "Homomorphic Encryption for
Arithmetic of Approximate Numbers" (ASIACRYPT 2017), through TenSEAL (Benaissa et al.,
arXiv:2104.03152) over Microsoft SEAL; the key-custody pattern follows NVIDIA FLARE's TenSEAL
filters (branches hold the secret key, the server only adds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

# The one sanctioned tenseal import (ruff bans it everywhere else); sealapi registers SEAL's
# types (Modulus, ...) that are read to check a loaded context's parameters.
import tenseal as ts
import tenseal.sealapi

from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies

__all__ = [
    "DEFAULT_PARAMETERS",
    "MAX_LOG_Q_128",
    "CKKSParameters",
    "CiphertextCorruptedError",
    "ContextKindError",
    "ContextPair",
    "EncryptedUpdate",
    "HEContext",
    "HEError",
    "InvalidParametersError",
    "KeyMismatchError",
    "ParameterMismatchError",
    "StaleKeyError",
    "SumEngine",
    "UnknownKeyError",
    "UpdateShapeError",
    "ValueRangeError",
    "check_update",
    "create_contexts",
    "decrypt",
    "encrypt_update",
    "load_context",
    "sum_encrypted",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class HEError(FedCrmError):
    """A homomorphic-encryption operation failed; the message says what was wrong.

    Args:
        message: What was wrong and, where possible, how to fix it.
        index: Position of the offending update in the batch passed in, when there is one, so
            that callers (the HE strategy wrapper) can name the branch and leave it out.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        self.index = index
        prefix = f"update #{index}: " if index is not None else ""
        super().__init__(prefix + message)


class InvalidParametersError(HEError, ConfigError):
    """CKKS parameters are insecure, unsupported, or cannot hold the declared value range."""


class KeyMismatchError(HEError):
    """A ciphertext (or the caller) names a key id other than the context's."""


class UnknownKeyError(KeyMismatchError):
    """The key id was never issued by this federation's key authority (as far as we know)."""


class StaleKeyError(KeyMismatchError):
    """The key id belongs to an older key generation that has been rotated out."""


class ParameterMismatchError(HEError):
    """An update or context was made with CKKS parameters other than the expected ones."""


class CiphertextCorruptedError(HEError):
    """Ciphertext bytes are truncated, altered in transit, or cannot be parsed."""


class UpdateShapeError(HEError, InconsistentReplies):
    """Updates disagree in length or carry a wrong number of ciphertext chunks."""


class ValueRangeError(HEError):
    """Values are non-finite or outside the range the parameters were sized for."""


class ContextKindError(HEError):
    """A public-only context was given where the secret key is needed, or the reverse."""


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------

#: Largest total coefficient-modulus size (bits) for 128-bit classical security with a ternary
#: secret, per poly modulus degree: HomomorphicEncryption.org standard (Albrecht et al., 2018),
#: Table 1; the same table SEAL enforces (``CoeffModulus::MaxBitCount``, ``sec_level_type::tc128``).
MAX_LOG_Q_128: Final[Mapping[int, int]] = MappingProxyType(
    {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
)

_MIN_PRIME_BITS: Final = 20
_MAX_PRIME_BITS: Final = 60  # SEAL's limit per RNS prime.
# Multiple of the per-value noise sigma used as the error bound. The slot noise is not Gaussian
# with one variance: it is r1(zeta_i) * s(zeta_i) with s the fixed secret key, so slots where the
# key's canonical embedding is large are noisier for every ciphertext (heavy tails: measured
# P(|e| > 4 sigma) = 3.6e-3; largest errors seen 8.7 sigma over 1.2 million fresh values and
# 11.3 sigma over 8,192 values of a 1,000-branch sum). See ``CKKSParameters.error_bound``.
_NOISE_SIGMA_FACTOR: Final = 25.0


@dataclass(frozen=True, slots=True)
class CKKSParameters:
    """CKKS parameters sized for *summation only* of pre-weighted updates.

    Args:
        poly_modulus_degree: Ring dimension N; a ciphertext has N/2 complex slots and carries
            N real values (two per slot, see Notes).
        coeff_mod_bit_sizes: RNS prime sizes. All but the last are data primes (the ciphertext
            lives modulo their product q); the last is SEAL's special prime, used only inside
            public-key encryption and key generation, never sent with a ciphertext.
        scale_bits: log2 of the CKKS scale: values are encoded as ``round(v * 2**scale_bits)``.
        max_abs_value: Declared bound on every pre-weighted value a branch encrypts
            (``|n_k * u_k|``); checked at encrypt time.
        max_summands: Most fresh ciphertexts a sum may contain (branches per round); checked
            when summing.

    Raises:
        InvalidParametersError: The parameters break the 128-bit security bound, SEAL's limits,
            or cannot hold ``max_abs_value * max_summands`` without wrapping around q.

    Notes:
        Choice of the defaults (N = 4096, primes [60, 49], scale 2^38), measured on the 2-core
        project VM with tenseal 0.3.18 (``bench/he_aggregation.py``; figures below):

        * *Only additions are needed* (branches pre-weight), so one data prime suffices: no
          rescaling, no relinearisation or Galois keys. A ciphertext is 2 polynomials x N
          coefficients x one 64-bit word per data prime, so bytes per slot are
          *independent of N* and double with each extra data prime. With TenSEAL's own
          serialization (zstd) and one real per slot, measured bytes per 4-byte float32
          were 7.20/7.57/7.86/8.02 for a 50/56/59/60-bit prime: small primes save little.
        * *Two reals per slot*: CKKS slots are complex. TenSEAL's ``ckks_vector`` fills only
          the real parts; this module encodes ``x[2i] + 1j * x[2i+1]`` through SEAL's encoder,
          which halves bytes, encryption and summation time per parameter: N values per
          ciphertext, 4.0x float32 with the 60-bit prime. The sum is unaffected (addition is
          slot-wise on complex numbers) and the noise per value is lower (a slot's noise
          splits between its real and imaginary parts).
        * *Wire form and server sum*: a chunk is the ciphertext's raw coefficients
          (little-endian uint64); the server checks each is below q and adds modulo q in
          NumPy, exactly SEAL's ``add_poly_coeffmod``, at 1.2-1.6 GB/s end to end including
          parsing and CRC checks (TenSEAL's deserialize-add-serialize path: 0.2-0.6 GB/s).
          Branches rebuild SEAL ciphertexts through SEAL's validating loader to decrypt.
          The price is on the branch: ``tenseal.sealapi`` exposes coefficients one at a time,
          so reading them costs 1-3 ms per ciphertext, about what encrypting it costs
          (100,000 parameters: about 80-130 ms per branch instead of 65-100 ms). One server
          adding for many branches is the bottleneck worth the trade.
        * *TenSEAL's own addition* stays available and tested byte-identical:
          ``sum_encrypted(..., engine="tenseal")`` loads every chunk as a TenSEAL
          ``CKKSVector`` (its protobuf loader runs SEAL's ``Ciphertext::load`` validation)
          and adds with ``CKKSVector.add_``. So the ciphertexts are real SEAL/TenSEAL
          ciphertexts that TenSEAL itself adds; NumPy is the default only because it is
          2-8x faster (``bench/he_rounds.py``: 0.5-1.5 GB/s against 0.1-0.4 GB/s).
        * *Range*: a sum of up to 1,000 values of magnitude <= 1e3 reaches 1e6. A plaintext
          coefficient is bounded by the largest slot modulus, up to sqrt(2) x 1e6 with two
          reals per slot, and must stay below q/2 = 2^59 (CKKS wraps around silently). With a
          further sqrt(2) margin: log2(1e6 * sqrt(2)) + scale_bits <= 60 - 1.5, so scale 2^38.
          ``__post_init__`` enforces this for any parameters; ``encrypt_update`` enforces
          ``max_abs_value`` and ``sum_encrypted`` ``max_summands``.
        * *Precision*: the error is absolute. Its per-value sigma is 483 * sqrt(K) / 2^38 for a
          sum of K fresh encryptions (rounding of the public-key encryption's switch off the
          special prime, r0 + r1*s, decoded into slots; predicted and measured 483). Its
          largest value over 8,192 values of a 1,000-branch sum, measured: 5.1e-7 and 6.3e-7
          (two keys); with a 59-bit prime (scale 2^37) it was 1.1e-6 and 1.3e-6. So 60 bits,
          SEAL's largest prime, is the smallest data prime that keeps a 1,000-branch sum
          within 1e-6: the relative error of the aggregate (max error / max |aggregate|) is
          below 1e-6 whenever its largest entry is >= 1; for 1,000 branches of values up to
          1e3 it is about 1e-11.
        * *N*: the smallest ring admitting a 60-bit data prime plus a special prime is
          N = 4096 (N = 2048 allows log Q <= 54 in all). N = 8192 costs the same bytes per
          value but packs in units of 8,192 values (a 3,000-parameter model would pay 2.7x
          for padding instead of 1.4x) and has 4x larger keys.
        * *Security*: log Q = 60 + 49 = 109 bits at N = 4096, exactly the
          HomomorphicEncryption.org bound for 128-bit classical security (ternary secret,
          error sigma = 3.2); SEAL refuses anything above it. Ciphertexts live modulo the
          60-bit prime only, which does not weaken the key (the bound is on the largest
          modulus the key is used with).
        * *Public-key encryption* (as the design asks, so encryption needs no secret): the
          branches hold the secret key anyway; symmetric encryption would give about 8x less
          noise and 2x faster encryption at the same ciphertext size.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 38
    max_abs_value: float = 1e3
    max_summands: int = 1000

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        bits = self.coeff_mod_bit_sizes
        if n not in MAX_LOG_Q_128:
            raise InvalidParametersError(
                f"poly_modulus_degree must be one of {sorted(MAX_LOG_Q_128)}, got {n}"
            )
        if len(bits) < 2:
            raise InvalidParametersError(
                "coeff_mod_bit_sizes needs at least a data prime and the special prime, "
                f"got {list(bits)}"
            )
        for b in bits:
            if not _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS:
                raise InvalidParametersError(
                    f"every prime must have {_MIN_PRIME_BITS}..{_MAX_PRIME_BITS} bits, "
                    f"got {list(bits)}"
                )
        if sum(bits) > MAX_LOG_Q_128[n]:
            raise InvalidParametersError(
                f"log Q = {sum(bits)} bits exceeds {MAX_LOG_Q_128[n]}, the 128-bit security "
                f"bound of the HE standard for N = {n}; use fewer or smaller primes or a larger N"
            )
        if not (math.isfinite(self.max_abs_value) and self.max_abs_value > 0):
            raise InvalidParametersError(
                f"max_abs_value must be finite and > 0, got {self.max_abs_value}"
            )
        if self.max_summands < 1:
            raise InvalidParametersError(f"max_summands must be >= 1, got {self.max_summands}")
        if self.scale_bits < 1:
            raise InvalidParametersError(f"scale_bits must be >= 1, got {self.scale_bits}")
        # Two reals per complex slot: a coefficient may reach sqrt(2) x the largest sum; keep
        # another factor sqrt(2) below q/2.
        needed = math.log2(self.max_abs_value * self.max_summands * math.sqrt(2)) + self.scale_bits
        limit = self.data_bits - 1.5
        if needed > limit:
            raise InvalidParametersError(
                f"a sum of {self.max_summands} values of magnitude {self.max_abs_value:g} at "
                f"scale 2^{self.scale_bits} needs {needed:.2f} bits but a {self.data_bits}-bit "
                f"data modulus allows {limit} (the sum would wrap around); lower "
                "scale_bits, max_abs_value or max_summands"
            )

    @property
    def data_bits(self) -> int:
        """Bits of the ciphertext modulus q (all primes but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def slot_count(self) -> int:
        """Complex slots of one ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Real values packed in one ciphertext: two per complex slot (N)."""
        return 2 * self.slot_count

    @property
    def scale(self) -> float:
        """The CKKS scale, ``2**scale_bits``."""
        return float(2**self.scale_bits)

    @property
    def capacity(self) -> float:
        """Largest magnitude every decrypted sum entry may have before a slot wraps around q/2."""
        return float(2 ** (self.data_bits - 1 - self.scale_bits)) / math.sqrt(2)

    def error_bound(self, summands: int) -> float:
        """Absolute per-value error bound of a decrypted sum of ``summands`` fresh ciphertexts.

        Args:
            summands: Number of fresh encryptions added together (1 for a single update).

        Returns:
            ``25 * sigma * sqrt(summands) / scale``, with sigma the per-value standard deviation
            of one public-key encryption's error (483 at N = 4096, measured and predicted; see
            the Notes of the class). Conservative: the largest error seen was 11.3 sigma.
        """
        n = self.poly_modulus_degree
        # Rounding noise r0 + r1*s (s ternary, 2/3 of its coefficients non-zero) plus encoding
        # rounding: coefficient variance ~ (2 + 2n/3) / 12; decoding sums n such terms into a
        # complex slot (variance n/2 times larger), split evenly between the slot's real and
        # imaginary parts, each of which carries one value.
        sigma = math.sqrt((n / 4) * (2 + 2 * n / 3) / 12)
        return _NOISE_SIGMA_FACTOR * sigma * math.sqrt(max(summands, 1)) / self.scale

    def chunk_count(self, length: int) -> int:
        """Number of ciphertexts needed for a vector of ``length`` values."""
        return -(-length // self.values_per_ciphertext)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in key sidecars)."""
        return {
            "scheme": "ckks",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "max_abs_value": self.max_abs_value,
            "max_summands": self.max_summands,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CKKSParameters:
        """Rebuild parameters from :meth:`to_dict` output, validating every field.

        Raises:
            InvalidParametersError: A field is missing, of the wrong type or out of range.
        """
        try:
            if data.get("scheme") != "ckks":
                raise InvalidParametersError(f"scheme must be 'ckks', got {data.get('scheme')!r}")
            bits = data["coeff_mod_bit_sizes"]
            if not isinstance(bits, list) or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in bits
            ):
                raise InvalidParametersError("coeff_mod_bit_sizes must be a list of integers")
            return cls(
                poly_modulus_degree=_as_int(data["poly_modulus_degree"], "poly_modulus_degree"),
                coeff_mod_bit_sizes=tuple(bits),
                scale_bits=_as_int(data["scale_bits"], "scale_bits"),
                max_abs_value=float(data["max_abs_value"]),
                max_summands=_as_int(data["max_summands"], "max_summands"),
            )
        except KeyError as exc:
            raise InvalidParametersError(f"CKKS parameters lack the field {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise InvalidParametersError(f"malformed CKKS parameters: {exc}") from exc

    @property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the canonical JSON form; updates carry it to detect mismatches."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParametersError(f"{name} must be an integer, got {value!r}")
    return value


#: The parameters of every fedcrm federation unless a key authority chooses others.
DEFAULT_PARAMETERS: Final = CKKSParameters()

# --------------------------------------------------------------------------------------------
# Contexts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, slots=True)
class HEContext:
    """An opaque CKKS context with its key id; secret (branches) or public-only (server).

    Build with :func:`create_contexts` or :func:`load_context`, never directly.

    Attributes:
        params: The parameters the context was made with.
        key_id: SHA-256 (hex) of the serialized public context: the same for the secret and
            the public context of one key, different for every key.
        generation: Key generation number (1, 2, ...) when managed by ``fedcrm.privacy.keys``;
            0 for an unmanaged context.
        retired_key_ids: Key ids of earlier generations (id -> generation), so that updates
            under them are reported as stale rather than unknown.
    """

    _ts: Any = field(repr=False)
    params: CKKSParameters
    key_id: str
    generation: int = 0
    retired_key_ids: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def is_public(self) -> bool:
        """Whether the context holds no secret key (cannot decrypt)."""
        return not bool(self._ts.has_secret_key())

    def is_private(self) -> bool:
        """Whether the context holds the secret key (can decrypt)."""
        return bool(self._ts.has_secret_key())

    def public(self) -> HEContext:
        """A public-only copy (the secret key dropped); the server's context.

        Notes:
            Uses TenSEAL's ``make_context_public`` on a copy, so this object is unchanged.
        """
        copy = self._ts.copy()
        copy.make_context_public()
        return HEContext(copy, self.params, self.key_id, self.generation, self.retired_key_ids)

    def with_history(self, *, generation: int, retired_key_ids: Mapping[str, int]) -> HEContext:
        """The same context tagged with its key generation and the retired key ids."""
        return HEContext(
            self._ts, self.params, self.key_id, generation, MappingProxyType(dict(retired_key_ids))
        )

    def serialize_public(self) -> bytes:
        """The public context (parameters + public key, no relinearisation or Galois keys).

        Notes:
            This is what the server receives; its SHA-256 is the key id. Relinearisation and
            Galois keys are left out: summation needs neither and they would only enlarge the
            file (Galois keys reach tens of MB).
        """
        return _serialize_public(self._ts)

    def serialize_secret(self) -> bytes:
        """The secret context for branches (secret key included); store it with mode 0600.

        Raises:
            ContextKindError: The context is public-only.
        """
        if self.is_public():
            raise ContextKindError("this context is public-only: it has no secret key to save")
        data: bytes = self._ts.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return data


@dataclass(frozen=True, slots=True)
class ContextPair:
    """A freshly generated key: the secret context (branches) and its public context (server)."""

    secret: HEContext
    public: HEContext

    @property
    def key_id(self) -> str:
        """The key id shared by both contexts."""
        return self.secret.key_id


def _serialize_public(ts_ctx: Any) -> bytes:
    data: bytes = ts_ctx.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return data


def _key_id(ts_ctx: Any) -> str:
    return hashlib.sha256(_serialize_public(ts_ctx)).hexdigest()


def create_contexts(*, params: CKKSParameters = DEFAULT_PARAMETERS) -> ContextPair:
    """Generate a new CKKS key and return its secret and public contexts.

    Args:
        params: CKKS parameters; the default suits pre-weighted FedAvg sums (see
            :class:`CKKSParameters`).

    Returns:
        The pair; both contexts carry the same key id.

    Raises:
        InvalidParametersError: TenSEAL/SEAL refused the parameters.

    Notes:
        This is the key authority's step: run it once, give the secret context to branches
        only, and the public context to the server. The secret key is drawn by SEAL from the
        operating system's CSPRNG.
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
    secret = HEContext(ts_ctx, params, _key_id(ts_ctx))
    logger.info(
        "generated CKKS key %s (N=%d, primes=%s, scale=2^%d)",
        secret.key_id[:12],
        params.poly_modulus_degree,
        list(params.coeff_mod_bit_sizes),
        params.scale_bits,
    )
    return ContextPair(secret=secret, public=secret.public())


def load_context(
    data: bytes,
    *,
    params: CKKSParameters,
    require: Literal["public", "secret"] | None = None,
    expected_key_id: str = "",
) -> HEContext:
    """Load a serialized context and check it against the declared parameters.

    Args:
        data: Bytes from :meth:`HEContext.serialize_public` or :meth:`HEContext.serialize_secret`.
        params: The parameters the context must have (from the key sidecar).
        require: ``"public"`` to refuse a context holding a secret key (server side),
            ``"secret"`` to refuse a public-only one (branch side), ``None`` for either.
        expected_key_id: If given, the key id the loaded context must have.

    Returns:
        The context (generation 0; ``fedcrm.privacy.keys`` tags it with its history).

    Raises:
        CiphertextCorruptedError: The bytes are not a TenSEAL context.
        ParameterMismatchError: N, the primes or the scale differ from ``params``.
        ContextKindError: The context is not of the required kind.
        UnknownKeyError: Its key id differs from ``expected_key_id``.
    """
    try:
        ts_ctx = ts.context_from(data, n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CiphertextCorruptedError(
            f"the context bytes ({len(data)} B) cannot be parsed: {exc}"
        ) from exc
    _check_context_params(ts_ctx, params)
    ctx = HEContext(ts_ctx, params, _key_id(ts_ctx))
    if require == "public" and ctx.is_private():
        raise ContextKindError(
            "refusing a context that holds the secret key where a public-only context is "
            "required (the server must never hold the secret key); give it the public context"
        )
    if require == "secret" and ctx.is_public():
        raise ContextKindError(
            "this context is public-only but the secret key is required (branch side)"
        )
    if expected_key_id and ctx.key_id != expected_key_id:
        raise UnknownKeyError(
            f"the context's key id {ctx.key_id[:12]}... differs from the expected "
            f"{expected_key_id[:12]}...: the key file and its metadata do not belong together"
        )
    return ctx


def _check_context_params(ts_ctx: Any, params: CKKSParameters) -> None:
    try:
        parms = ts_ctx.seal_context().data.key_context_data().parms()
        n = int(parms.poly_modulus_degree())
        bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
        scheme_ok = getattr(parms.scheme(), "name", "") == "CKKS"
        scale = float(ts_ctx.global_scale)
    except (ValueError, RuntimeError, AttributeError, TypeError) as exc:
        raise CiphertextCorruptedError(f"cannot read the context's parameters: {exc}") from exc
    found = f"N={n}, primes={list(bits)}, scale={scale:g}"
    want = (
        f"N={params.poly_modulus_degree}, primes={list(params.coeff_mod_bit_sizes)}, "
        f"scale=2^{params.scale_bits}"
    )
    if (
        not scheme_ok
        or n != params.poly_modulus_degree
        or bits != params.coeff_mod_bit_sizes
        or scale != params.scale
    ):
        raise ParameterMismatchError(f"context parameters ({found}) do not match ({want})")


# --------------------------------------------------------------------------------------------
# Encrypted updates
# --------------------------------------------------------------------------------------------

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
    per_ct = ctx.params.values_per_ciphertext
    scale = ctx.params.scale
    ring = _ring(ctx)
    chunks: list[bytes] = []
    try:
        encoder = tenseal.sealapi.CKKSEncoder(ctx._ts.seal_context().data)
        encryptor = ctx._ts.encryptor().data
        for start in range(0, values.size, per_ct):
            part = values[start : start + per_ct]
            if part.size % 2:
                part = np.append(part, 0.0)
            plain = tenseal.sealapi.Plaintext()
            encoder.encode((part[0::2] + 1j * part[1::2]).tolist(), scale, plain)
            ciphertext = tenseal.sealapi.Ciphertext()
            encryptor.encrypt(plain, ciphertext)
            chunks.append(_coefficients(ciphertext, ring).tobytes())
    except (ValueError, RuntimeError, TypeError) as exc:
        raise HEError(f"SEAL failed to encrypt the update: {exc}") from exc
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


def _parse_chunks(
    ring: _Ring, update: EncryptedUpdate, *, index: int | None
) -> list[npt.NDArray[np.uint64]]:
    """View each chunk as its (2, primes, N) coefficient array, checking size and range.

    CRC-32s were verified by :meth:`EncryptedUpdate.from_bytes`, where bytes enter the process.
    """
    arrays = []
    for j, chunk in enumerate(update.chunks):
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
    ring = _ring(ctx)
    if engine == "tenseal":
        return _make_update(ctx, length, total, _sum_tenseal(ctx, ring, updates))
    if engine != "numpy":
        raise ValueError(f"engine must be 'numpy' or 'tenseal', got {engine!r}")
    acc = [words.astype(np.uint64) for words in _parse_chunks(ring, updates[0], index=0)]
    scratch = np.empty(ring.shape, dtype=np.uint64)
    for i, update in enumerate(updates[1:], start=1):
        for j, words in enumerate(_parse_chunks(ring, update, index=i)):
            # Coefficient-wise addition modulo each prime, as SEAL's add_poly_coeffmod. Inputs
            # are < q <= 2^60, so the uint64 sum cannot overflow; branch-free reduction:
            # min(s, s - q) is s - q when s >= q, else s (s - q wraps around to a huge value).
            np.add(acc[j], words, out=acc[j])
            np.subtract(acc[j], ring.moduli, out=scratch)
            np.minimum(acc[j], scratch, out=acc[j])
    logger.debug("summed %d encrypted updates of %d values", len(updates), length)
    return _make_update(ctx, length, total, [a.astype("<u8", copy=False).tobytes() for a in acc])


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
    per_ct = ctx.params.values_per_ciphertext
    ring = _ring(ctx)
    out = np.empty(enc.length, dtype=np.float64)
    arrays = _parse_chunks(ring, enc, index=None)
    try:
        seal_context = ctx._ts.seal_context().data
        encoder = tenseal.sealapi.CKKSEncoder(seal_context)
        decryptor = ctx._ts.decryptor().data
        with _scratch_file() as path:
            for j, words in enumerate(arrays):
                ciphertext = _load_ciphertext(ring, ctx.params.scale, words, seal_context, path)
                plain = tenseal.sealapi.Plaintext()
                decryptor.decrypt(ciphertext, plain)
                slots = np.asarray(encoder.decode_complex(plain))
                start = j * per_ct
                count = min(per_ct, enc.length - start)
                values = np.empty(2 * slots.size)
                values[0::2], values[1::2] = slots.real, slots.imag
                out[start : start + count] = values[:count]
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        raise HEError(f"SEAL failed to decrypt the update: {exc}") from exc
    return out


# --------------------------------------------------------------------------------------------
# Raw ciphertexts: two reals per slot, coefficients on the wire, modular addition in NumPy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ring:
    """What raw-coefficient arithmetic needs from a context: N, the data primes, parms_id."""

    degree: int
    moduli: npt.NDArray[np.uint64]  # shape (1, primes, 1): broadcasts over (2, primes, N)
    parms_id: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (2, self.moduli.size, self.degree)

    @property
    def nbytes(self) -> int:
        return 2 * self.moduli.size * self.degree * 8


def _ring(ctx: HEContext) -> _Ring:
    try:
        data = ctx._ts.seal_context().data.first_context_data()
        moduli = [int(m.value()) for m in data.parms().coeff_modulus()]
        parms_id = tuple(int(w) for w in data.parms_id())
    except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise HEError(f"cannot read the context's ring: {exc}") from exc
    return _Ring(
        degree=ctx.params.poly_modulus_degree,
        moduli=np.array(moduli, dtype=np.uint64).reshape(1, -1, 1),
        parms_id=parms_id,
    )


def _coefficients(ciphertext: Any, ring: _Ring) -> npt.NDArray[np.uint64]:
    """A fresh ciphertext's coefficients (SEAL layout: polynomial, prime, coefficient)."""
    if int(ciphertext.size()) != 2 or tuple(ciphertext.parms_id()) != ring.parms_id:
        raise HEError("unexpected ciphertext shape or level from SEAL's encryptor")
    words = ciphertext.dyn_array()
    count = int(words.size())
    if count != 2 * ring.moduli.size * ring.degree:
        raise HEError(f"SEAL returned {count} coefficients, expected {ring.nbytes // 8}")
    # tenseal.sealapi offers no buffer access to a ciphertext, only element reads.
    return np.fromiter(map(words.at, range(count)), dtype="<u8", count=count)


def _seal_header(size: int) -> bytes:
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


def _seal_ciphertext_bytes(ring: _Ring, scale: float, words: npt.NDArray[np.uint64]) -> bytes:
    """``Ciphertext::save``'s uncompressed layout for a fresh-size (2-polynomial) ciphertext.

    Header; parms_id, is_ntt_form, size, poly_modulus_degree, coeff_modulus_size, scale,
    correction_factor; then the coefficient array (header, count, words).
    """
    body = struct.pack("<Q", words.size) + words.astype("<u8", copy=False).tobytes()
    array = _seal_header(16 + len(body)) + body
    members = b"".join(
        (
            struct.pack("<4Q", *ring.parms_id),
            b"\x01",  # CKKS ciphertexts are kept in NTT form
            struct.pack("<QQQdQ", 2, ring.degree, ring.moduli.size, scale, 1),
            array,
        )
    )
    return _seal_header(16 + len(members)) + members


def _load_ciphertext(
    ring: _Ring, scale: float, words: npt.NDArray[np.uint64], seal_context: Any, path: str
) -> Any:
    """Rebuild a SEAL ciphertext from coefficients through SEAL's own (validating) loader.

    ``Ciphertext.load`` checks the bytes of :func:`_seal_ciphertext_bytes` against the context.
    """
    with open(path, "wb") as handle:
        handle.write(_seal_ciphertext_bytes(ring, scale, words))
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
# The same sum through TenSEAL's own CKKSVector addition
# --------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _ckks_vector_proto(ring: _Ring, scale: float, words: npt.NDArray[np.uint64]) -> bytes:
    """A TenSEAL ``CKKSVectorProto`` (tenseal/proto/tensors.proto) holding one ciphertext.

    Fields: 1 ``sizes`` (packed uint32: the slots in use, here all N/2 complex slots),
    2 ``ciphertexts`` (SEAL-serialized bytes), 3 ``scale`` (double).
    """
    sizes = _varint(ring.degree // 2)
    ciphertext = _seal_ciphertext_bytes(ring, scale, words)
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


def _sum_tenseal(ctx: HEContext, ring: _Ring, updates: Sequence[EncryptedUpdate]) -> list[bytes]:
    """Sum chunk-wise with TenSEAL ``CKKSVector.add_`` (SEAL's ``Evaluator::add_inplace``).

    Every chunk enters TenSEAL through its protobuf loader, which runs SEAL's
    ``Ciphertext::load`` validation against the (public) context; the sum is read back as
    coefficients. Same result as the NumPy path, byte for byte.
    """
    scale = ctx.params.scale
    acc: list[Any] = []
    for i, update in enumerate(updates):
        for j, words in enumerate(_parse_chunks(ring, update, index=i)):
            try:
                vector = ts._ts_cpp.CKKSVector(ctx._ts.data, _ckks_vector_proto(ring, scale, words))
                if i == 0:
                    acc.append(vector)
                else:
                    acc[j].add_(vector)
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CiphertextCorruptedError(
                    f"TenSEAL refused chunk {j}: {exc}", index=i
                ) from exc
    out = []
    seal_context = ctx._ts.seal_context().data
    try:
        with _scratch_file() as path:
            for vector in acc:
                (ciphertext,) = vector.ciphertext()
                ciphertext.save(path)  # TenSEAL's binding of SEAL's save (zstd-compressed)
                loaded = tenseal.sealapi.Ciphertext()
                loaded.load(seal_context, path)
                out.append(_coefficients(loaded, ring).tobytes())
    except (ValueError, RuntimeError, TypeError, OSError) as exc:
        raise HEError(f"cannot read TenSEAL's sum back: {exc}") from exc
    return out
