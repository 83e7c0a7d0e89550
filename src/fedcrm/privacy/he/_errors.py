"""The exceptions of fedcrm.privacy.he; every TenSEAL/SEAL failure is re-raised as one of them.

Hierarchy (all subclasses of :class:`fedcrm.exceptions.FedCrmError`)::

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
"""

from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies


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
