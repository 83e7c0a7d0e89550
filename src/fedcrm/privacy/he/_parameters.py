"""CKKS parameters for summation-only aggregation: sizes, the security bound and the value range.

:class:`CKKSParameters` validates a parameter set when it is built (128-bit security, SEAL's
limits, no wrap-around for the declared range); the reasoning behind the defaults is in
docs/he.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from fedcrm.privacy.he._errors import InvalidParametersError

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
        The defaults (N = 4096, primes [60, 49], scale 2^38) are the smallest ring and data
        prime that keep a 1,000-branch sum of values up to 1e3 within 1e-6 of the plaintext sum
        at 128-bit security (log Q = 109, the HomomorphicEncryption.org bound for N = 4096),
        with two reals per complex slot: about 4x float32 on the wire. The measurements and
        the argument for each choice are in docs/he.md ("Parameters").
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
            docs/he.md, "Precision"). Conservative: the largest error seen was 11.3 sigma.
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
