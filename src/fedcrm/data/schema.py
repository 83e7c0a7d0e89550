"""The declared CRM churn schemas: every branch encodes its rows from these, never from its data.

A schema fixes the feature list, each feature's kind, the categorical vocabularies, the label
and its positive value, and the customer-id column. Two branches that follow the same schema
produce arrays of the same shape and meaning without looking at each other's data.
"""

from dataclasses import dataclass, field
from enum import StrEnum


class FeatureKind(StrEnum):
    """How a raw column is represented and encoded."""

    NUMERIC = "numeric"
    """A real number; standardised with federated mean and standard deviation."""
    BINARY = "binary"
    """0 or 1 (also accepted as the strings "0"/"1"); used as is."""
    CATEGORICAL = "categorical"
    """One of a declared vocabulary; one-hot encoded in vocabulary order."""


@dataclass(frozen=True)
class Feature:
    """One input column of a churn schema.

    Attributes:
        name: Column name in the branch export.
        kind: How the column is represented.
        categories: The vocabulary of a categorical feature, in encoding order.
        nullable: Whether missing values are allowed (numeric only; imputed with the
            federated mean).
        log1p: Apply ``log1p`` before standardising (heavy-tailed, non-negative amounts).
    """

    name: str
    kind: FeatureKind
    categories: tuple[str, ...] = ()
    nullable: bool = False
    log1p: bool = False

    def __post_init__(self) -> None:
        if self.kind is FeatureKind.CATEGORICAL and len(self.categories) < 2:
            raise ValueError(f"categorical feature {self.name!r} needs at least 2 categories")
        if self.kind is not FeatureKind.CATEGORICAL and self.categories:
            raise ValueError(f"only categorical features take categories ({self.name!r})")
        if self.nullable and self.kind is not FeatureKind.NUMERIC:
            raise ValueError(f"only numeric features may be nullable ({self.name!r})")

    @property
    def width(self) -> int:
        """Number of model inputs this feature encodes to."""
        return len(self.categories) if self.kind is FeatureKind.CATEGORICAL else 1


@dataclass(frozen=True)
class ChurnSchema:
    """A CRM churn table: customer id, features and a binary label.

    Attributes:
        name: Short name used on the command line (``telco``, ``mlc``).
        features: Input features in encoding order.
        label: Label column.
        label_values: The two accepted label values, negative first.
        id_column: Customer identifier column (pseudonymised by the loader).
        region_column: Optional column naming the branch's region; not a model input.
    """

    name: str
    features: tuple[Feature, ...]
    label: str = "churn"
    label_values: tuple[str, str] = ("no", "yes")
    id_column: str = "customer_id"
    region_column: str | None = None
    _by_name: dict[str, Feature] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"schema {self.name!r} declares a feature twice")
        reserved = {self.label, self.id_column, self.region_column}
        if reserved & set(names):
            raise ValueError(f"schema {self.name!r}: a feature reuses a reserved column name")
        object.__setattr__(self, "_by_name", {f.name: f for f in self.features})

    @property
    def numeric(self) -> tuple[Feature, ...]:
        """The numeric features, in order (the ones that need federated statistics)."""
        return tuple(f for f in self.features if f.kind is FeatureKind.NUMERIC)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a branch export must have (region column excluded)."""
        return (self.id_column, *(f.name for f in self.features), self.label)

    @property
    def input_dim(self) -> int:
        """Width of the encoded feature matrix."""
        return sum(f.width for f in self.features)

    def feature(self, name: str) -> Feature:
        """Return the feature called ``name``.

        Raises:
            KeyError: The schema has no such feature.
        """
        return self._by_name[name]


_YES_NO = ("No", "Yes")
_INTERNET_ADDON = ("No", "Yes", "No internet service")


def _telco() -> ChurnSchema:
    binary = ["female", "senior_citizen", "partner", "dependents", "phone_service"]
    addons = [
        "online_security",
        "online_backup",
        "device_protection",
        "tech_support",
        "streaming_tv",
        "streaming_movies",
    ]
    return ChurnSchema(
        name="telco",
        features=(
            *(Feature(b, FeatureKind.BINARY) for b in binary),
            Feature("tenure", FeatureKind.NUMERIC),
            Feature("multiple_lines", FeatureKind.CATEGORICAL, ("No", "Yes", "No phone service")),
            Feature("internet_service", FeatureKind.CATEGORICAL, ("DSL", "Fiber optic", "No")),
            *(Feature(a, FeatureKind.CATEGORICAL, _INTERNET_ADDON) for a in addons),
            Feature(
                "contract", FeatureKind.CATEGORICAL, ("Month-to-month", "One year", "Two year")
            ),
            Feature("paperless_billing", FeatureKind.BINARY),
            Feature(
                "payment_method",
                FeatureKind.CATEGORICAL,
                (
                    "Electronic check",
                    "Mailed check",
                    "Bank transfer (automatic)",
                    "Credit card (automatic)",
                ),
            ),
            Feature("monthly_charges", FeatureKind.NUMERIC),
            # Blank for customers with tenure 0 (11 rows in the IBM data).
            Feature("total_charges", FeatureKind.NUMERIC, nullable=True, log1p=True),
        ),
        label_values=_YES_NO,
    )


def _mlc() -> ChurnSchema:
    usage = [
        f"total_{period}_{what}"
        for period in ("day", "eve", "night", "intl")
        for what in ("minutes", "calls", "charge")
    ]
    return ChurnSchema(
        name="mlc",
        features=(
            Feature("account_length", FeatureKind.NUMERIC),
            Feature(
                "area_code",
                FeatureKind.CATEGORICAL,
                ("area_code_408", "area_code_415", "area_code_510"),
            ),
            Feature("international_plan", FeatureKind.CATEGORICAL, ("no", "yes")),
            Feature("voice_mail_plan", FeatureKind.CATEGORICAL, ("no", "yes")),
            Feature("number_vmail_messages", FeatureKind.NUMERIC),
            *(Feature(u, FeatureKind.NUMERIC) for u in usage),
            Feature("number_customer_service_calls", FeatureKind.NUMERIC),
        ),
        label_values=("no", "yes"),
        region_column="state",
    )


TELCO = _telco()
"""IBM Telco customer churn (7,043 customers, modeldata ``wa_churn``)."""

MLC = _mlc()
"""MLC++ telecom churn (5,000 customers with US ``state``, modeldata ``mlc_churn``)."""

SCHEMAS: dict[str, ChurnSchema] = {TELCO.name: TELCO, MLC.name: MLC}


def get_schema(name: str) -> ChurnSchema:
    """Return the declared schema called ``name``.

    Raises:
        KeyError: No schema has that name; the message lists the known ones.
    """
    try:
        return SCHEMAS[name]
    except KeyError:
        raise KeyError(f"unknown schema {name!r}; choose one of {sorted(SCHEMAS)}") from None
