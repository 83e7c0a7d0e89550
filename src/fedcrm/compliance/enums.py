"""Closed vocabularies of the compliance store (stored as their string values).

Adding a member is a schema change: the database CHECK constraints list the allowed values, so a
new member needs an Alembic migration as well.
"""

from enum import StrEnum
from typing import TypeVar

_Member = TypeVar("_Member", bound=StrEnum)


def coerce_member(
    enum_cls: type[_Member], value: str, name: str, problems: list[str]
) -> _Member | None:
    """Return the member of ``enum_cls`` that ``value`` is or names.

    Returns None after adding ``name``'s problem (with the allowed values) to ``problems``, so a
    validator can collect every problem before it raises.
    """
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_cls)
        problems.append(f"{name} must be one of {allowed}; got {value!r}")
        return None


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


class Purpose(StrEnum):
    """Processing purposes a customer can consent to (W3C DPV ``dpv:Purpose`` instances)."""

    CHURN_MODEL_TRAINING = "churn-model-training"
    """Training the federated churn model on the customer's records."""
    RECOMMENDATION_TRAINING = "recommendation-training"
    """Training the federated recommender on the customer's interactions."""
    MARKETING_PROFILING = "marketing-profiling"
    """Profiling the customer for direct marketing (GDPR Art. 21(2): objection is absolute)."""


class LegalBasis(StrEnum):
    """GDPR Art. 6(1) legal bases, named after the W3C DPV ``dpv:LegalBasis`` concepts."""

    CONSENT = "consent"
    """Art. 6(1)(a); DPV ``dpv:Consent``."""
    EXPLICIT_CONSENT = "explicit-consent"
    """Art. 9(2)(a) for special categories; DPV ``dpv:ExplicitlyExpressedConsent``."""
    CONTRACT = "contract"
    """Art. 6(1)(b); DPV ``dpv:Contract``."""
    LEGAL_OBLIGATION = "legal-obligation"
    """Art. 6(1)(c); DPV ``dpv:LegalObligation``."""
    LEGITIMATE_INTEREST = "legitimate-interest"
    """Art. 6(1)(f); DPV ``dpv:LegitimateInterest``."""


class ConsentStatus(StrEnum):
    """Consent states and history events (DPV ``dpv:ConsentStatus``, ISO/IEC TS 27560).

    Every member is also an event of the append-only history, except that ``expired`` is normally
    derived from the expiry time rather than recorded.
    """

    GIVEN = "given"
    REFUSED = "refused"
    WITHDRAWN = "withdrawn"
    EXPIRED = "expired"
    RENEWED = "renewed"

    @property
    def is_valid(self) -> bool:
        """Whether this status allows processing (given or renewed, before expiry)."""
        return self in VALID_STATUSES


VALID_STATUSES = (ConsentStatus.GIVEN, ConsentStatus.RENEWED)
"""The statuses that allow processing until they expire (:attr:`ConsentStatus.is_valid`)."""


class Channel(StrEnum):
    """Where the customer expressed the decision (ISO/IEC TS 27560 "interaction channel")."""

    WEB = "web"
    MOBILE_APP = "mobile-app"
    IN_BRANCH = "in-branch"
    PHONE = "phone"
    EMAIL = "email"
    POST = "post"
    API = "api"


class CollectionMethod(StrEnum):
    """How the decision was captured (DPV ``dpv:ConsentRecord`` / ISO/IEC TS 27560 method)."""

    ONLINE_FORM = "online-form"
    PAPER_FORM = "paper-form"
    SIGNED_DOCUMENT = "signed-document"
    VERBAL_RECORDED = "verbal-recorded"
    BRANCH_IMPORT = "branch-import"
    """Migrated from a branch's own records by a bulk CSV import."""


class Role(StrEnum):
    """Roles of the compliance service's API keys."""

    OFFICER = "officer"
    """Reads everything; administers consent for every branch."""
    BRANCH = "branch"
    """Reads and administers its own branch's customers only."""
    RESEARCHER = "researcher"
    """Aggregates only: ledger totals and consent coverage counts, no per-customer data."""
