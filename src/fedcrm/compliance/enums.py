"""Closed vocabularies of the compliance store (stored as their string values).

Adding a member is a schema change: the database CHECK constraints list the allowed values, so a
new member needs an Alembic migration as well.
"""

from enum import StrEnum


class PrivacyUnit(StrEnum):
    """What one differential-privacy guarantee protects (issue 3, "privacy units are explicit")."""

    RECORD = "record"
    CUSTOMER = "customer"
    BRANCH = "branch"


class NeighbouringRelation(StrEnum):
    """How neighbouring data sets differ in the DP definition the ε refers to."""

    ADD_REMOVE = "add-remove"
    """One unit added or removed (Opacus' and Flower's accountants assume this)."""
    REPLACE_ONE = "replace-one"
    """One unit replaced by another (substitution); roughly doubles ε for the same noise."""


class Mechanism(StrEnum):
    """The randomised mechanism a ledger event accounts for."""

    SUBSAMPLED_GAUSSIAN = "subsampled-gaussian"
    """DP-SGD: Poisson-subsampled Gaussian mechanism (record level, Opacus)."""
    GAUSSIAN = "gaussian"
    """Gaussian noise on clipped updates (branch level, central DP)."""
    LAPLACE = "laplace"
    """Laplace noise (local DP on a released value)."""


class SamplingMethod(StrEnum):
    """How the units entering one step were sampled (affects privacy amplification)."""

    POISSON = "poisson"
    FIXED_SIZE = "fixed-size"
    SHUFFLE = "shuffle"
    NONE = "none"
    """No sampling: every unit takes part in every step (sampling rate 1)."""


class Accountant(StrEnum):
    """The privacy accountant that computed ε."""

    RDP = "rdp"
    PRV = "prv"
    GDP = "gdp"
    PLD = "pld"


class Decision(StrEnum):
    """Whether a round was allowed to spend privacy budget."""

    ADMITTED = "admitted"
    REFUSED = "refused"


class EventType(StrEnum):
    """Kinds of audit-log events (issue 5, "Tamper-evident audit log")."""

    CONSENT_CHANGE = "consent-change"
    ROUND_MANIFEST = "round-manifest"
    LEDGER_ENTRY = "ledger-entry"
    REFUSAL = "refusal"
    KEY_GENERATION = "key-generation"
    KEY_DESTRUCTION = "key-destruction"
    """A body key was destroyed (crypto-shredding): the evidence of an erasure."""
    MODEL_RELEASE = "model-release"
    CONFIGURATION_CHANGE = "configuration-change"


class KeyScope(StrEnum):
    """Whom an audit body key belongs to."""

    SUBJECT = "subject"
    """One pseudonymous data subject; destroying it shreds their bodies."""
    LOG = "log"
    """The log itself, for events that concern no subject."""
