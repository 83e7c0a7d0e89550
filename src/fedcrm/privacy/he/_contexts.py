"""CKKS contexts: generating a key, loading and serializing contexts, key ids.

A context is secret (branches: it decrypts) or public-only (the server: it adds); its key id is
the SHA-256 of the serialized public context. The TenSEAL calls are in ``_engine``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from fedcrm.privacy.he import _engine
from fedcrm.privacy.he._errors import ContextKindError, ParameterMismatchError, UnknownKeyError
from fedcrm.privacy.he._parameters import DEFAULT_PARAMETERS, CKKSParameters

logger = logging.getLogger(__name__)


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
    ts_ctx = _engine.native_context(params)
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
    ts_ctx = _engine.load_native_context(data)
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
    scheme_ok, n, bits, scale = _engine.context_parameters(ts_ctx)
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
