"""Settings of the compliance service and the configuration its Art. 30 records come from.

Settings are read once from the environment (prefix ``FEDCRM_COMPLIANCE_``) and exposed through
the cached :func:`get_settings` dependency (FastAPI docs, "Settings and Environment Variables"),
never as a module-global instance. Tests pass their own :class:`Settings` to the app factory or
override the dependency.

The records of processing (GDPR Art. 30) are generated from a :class:`RopaConfig`: given
directly (``Settings(ropa=...)``), from a JSON file (``FEDCRM_COMPLIANCE_ROPA_FILE``), or the
built-in description of fedcrm's own processing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedcrm.compliance.db import sqlite_url
from fedcrm.compliance.enums import LegalBasis, PrivacyUnit, Purpose


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Controller(_Frozen):
    """The controller (Art. 30(1)(a)): name and contact, and the DPO's contact."""

    name: str = Field(min_length=1, max_length=200)
    contact: str = Field(min_length=1, max_length=200)
    dpo_contact: str = Field(min_length=1, max_length=200)


class ProcessingActivity(_Frozen):
    """One purpose of processing and what Art. 30(1)(b)-(f) asks about it."""

    purpose: Purpose
    description: str = Field(min_length=1, max_length=2000)
    legal_basis: LegalBasis
    data_subjects: tuple[str, ...] = Field(min_length=1)
    data_categories: tuple[str, ...] = Field(min_length=1)
    recipients: tuple[str, ...] = ()
    third_country_transfers: str = "none"
    retention: str = Field(min_length=1, max_length=500)


class DpTarget(_Frozen):
    """A differential-privacy target of one model: the budget a run may spend."""

    model: str = Field(min_length=1, max_length=128)
    purpose: Purpose
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    privacy_unit: PrivacyUnit = PrivacyUnit.RECORD


class CkksParameters(_Frozen):
    """CKKS parameters of the encrypted aggregation (TenSEAL / Microsoft SEAL)."""

    poly_modulus_degree: int = Field(gt=0)
    coeff_mod_bit_sizes: tuple[int, ...] = Field(min_length=2)
    global_scale_bits: int = Field(gt=0, lt=64)
    security_level_bits: int = 128

    @field_validator("poly_modulus_degree")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("poly_modulus_degree must be a power of two")
        return value


class SecurityMeasures(_Frozen):
    """Technical and organisational measures (Art. 30(1)(g), Art. 32)."""

    dp_targets: tuple[DpTarget, ...] = ()
    ckks: CkksParameters | None = None
    measures: tuple[str, ...] = ()


class RopaConfig(_Frozen):
    """What the Art. 30 records are generated from."""

    controller: Controller
    activities: tuple[ProcessingActivity, ...] = Field(min_length=1)
    branches: tuple[str, ...] = ()
    security: SecurityMeasures = SecurityMeasures()

    @model_validator(mode="after")
    def _unique_purposes(self) -> RopaConfig:
        purposes = [activity.purpose for activity in self.activities]
        if len(set(purposes)) != len(purposes):
            raise ValueError("each purpose may be described once")
        return self


def default_ropa() -> RopaConfig:
    """Return the description of fedcrm's own processing (used when none is configured)."""
    crm = ("customer account data", "service usage", "billing history", "churn label")
    return RopaConfig(
        controller=Controller(
            name="fedcrm operator (configure FEDCRM_COMPLIANCE_ROPA_FILE)",
            contact="privacy@example.invalid",
            dpo_contact="dpo@example.invalid",
        ),
        activities=(
            ProcessingActivity(
                purpose=Purpose.CHURN_MODEL_TRAINING,
                description="Federated training of a churn model; data never leaves branches.",
                legal_basis=LegalBasis.CONSENT,
                data_subjects=("customers",),
                data_categories=crm,
                recipients=("federation server (encrypted, noised model updates only)",),
                retention="model updates: not stored; models: until superseded, at most 2 years",
            ),
            ProcessingActivity(
                purpose=Purpose.RECOMMENDATION_TRAINING,
                description="Federated training of a recommender on purchase interactions.",
                legal_basis=LegalBasis.CONSENT,
                data_subjects=("customers",),
                data_categories=("product interactions", "ratings"),
                recipients=("federation server (encrypted, noised model updates only)",),
                retention="models: until superseded, at most 2 years",
            ),
            ProcessingActivity(
                purpose=Purpose.MARKETING_PROFILING,
                description="Scoring customers for direct marketing with the trained models.",
                legal_basis=LegalBasis.CONSENT,
                data_subjects=("customers",),
                data_categories=("model scores",),
                recipients=("branch marketing team",),
                retention="scores: 90 days",
            ),
        ),
        security=SecurityMeasures(
            dp_targets=(
                DpTarget(
                    model="churn", purpose=Purpose.CHURN_MODEL_TRAINING, epsilon=8.0, delta=1e-5
                ),
                DpTarget(
                    model="recommender",
                    purpose=Purpose.RECOMMENDATION_TRAINING,
                    epsilon=8.0,
                    delta=1e-5,
                ),
            ),
            ckks=CkksParameters(
                poly_modulus_degree=8192,
                coeff_mod_bit_sizes=(60, 40, 40, 60),
                global_scale_bits=40,
            ),
            measures=(
                "federated learning: raw customer data stays at each branch",
                "DP-SGD (Opacus) with per-branch privacy accountant and ledger",
                "CKKS homomorphic encryption of model updates (public context on the server)",
                "pseudonymous customer ids; consent gate before every round",
                "tamper-evident audit log (RFC 9162 Merkle tree, Ed25519 checkpoints)",
                "crypto-shredding of per-customer audit keys on erasure",
                "API keys stored hashed (SHA-256), role-based access",
            ),
        ),
    )


class Settings(BaseSettings):
    """Settings of ``fedcrm compliance serve``; environment prefix ``FEDCRM_COMPLIANCE_``.

    Args:
        database_url: The compliance store (``sqlite:///FILE`` or ``postgresql+psycopg://``).
        environment: ``production`` refuses the example controller of the built-in records.
        ropa_file: JSON file holding a :class:`RopaConfig`.
        ropa: The configuration itself (wins over ``ropa_file``).
        docs: Serve the OpenAPI docs (``/docs``, ``/openapi.json``).
        max_upload_bytes: Largest consent CSV accepted by the import endpoint.
    """

    model_config = SettingsConfigDict(env_prefix="FEDCRM_COMPLIANCE_", frozen=True, extra="ignore")

    database_url: str = Field(default_factory=lambda: sqlite_url("compliance.db"))
    environment: Literal["development", "production"] = "development"
    ropa_file: Path | None = None
    ropa: RopaConfig = Field(default_factory=default_ropa)
    docs: bool = True
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0)

    @field_validator("database_url")
    @classmethod
    def _supported_url(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql")):
            raise ValueError("database_url must be sqlite:///FILE or postgresql+psycopg://...")
        return value

    @model_validator(mode="before")
    @classmethod
    def _load_ropa_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("ropa_file") and data.get("ropa") is None:
            path = Path(data["ropa_file"])
            try:
                data = {**data, "ropa": json.loads(path.read_text(encoding="utf-8"))}
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read the RoPA file {path}: {exc}") from exc
        return data

    @model_validator(mode="after")
    def _no_placeholders_in_production(self) -> Settings:
        if self.environment == "production" and self.ropa.controller.contact.endswith(".invalid"):
            raise ValueError(
                "production needs the real controller in the RoPA configuration "
                "(FEDCRM_COMPLIANCE_ROPA_FILE); the built-in one is a placeholder"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the settings, read from the environment once (a FastAPI dependency)."""
    return Settings()
