"""CKKS encryption for federated averaging: branches encrypt, the server only adds.

Typical use (the HE strategy wrapper and the client mod do this)::

    pair = create_contexts()                                   # key authority (fedcrm keys)
    wire = encrypt_update(pair.secret, n_k * u_k, key_id=kid).to_bytes()       # branch
    total = sum_encrypted(pair.public, [EncryptedUpdate.from_bytes(w) for w in wires])
    mean = decrypt(pair.secret, total) / sum(counts)                           # branch

Other code sees ``bytes``, NumPy arrays and the frozen dataclasses below; every TenSEAL failure
is re-raised as an :class:`HEError`. CKKS (Cheon, Kim, Kim and Song, ASIACRYPT 2017) through
TenSEAL (arXiv:2104.03152) over Microsoft SEAL. See docs/he.md for the design and parameters.
"""

from fedcrm.privacy.he._codec import EncryptedUpdate
from fedcrm.privacy.he._contexts import ContextPair, HEContext, create_contexts, load_context
from fedcrm.privacy.he._errors import (
    CiphertextCorruptedError,
    ContextKindError,
    HEError,
    InvalidParametersError,
    KeyMismatchError,
    ParameterMismatchError,
    StaleKeyError,
    UnknownKeyError,
    UpdateShapeError,
    ValueRangeError,
)
from fedcrm.privacy.he._operations import (
    SumEngine,
    check_update,
    decrypt,
    encrypt_update,
    sum_encrypted,
)
from fedcrm.privacy.he._parameters import DEFAULT_PARAMETERS, MAX_LOG_Q_128, CKKSParameters

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
