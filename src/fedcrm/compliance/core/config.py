"""Settings of the compliance service and the configuration its Art. 30 records come from.

Settings are read once from the environment (prefix ``FEDCRM_COMPLIANCE_``) and exposed through
the cached :func:`get_settings` dependency (FastAPI docs, "Settings and Environment Variables"),
never as a module-global instance. Tests pass their own :class:`Settings` to the app factory or
override the dependency.

The records of processing (GDPR Art. 30) are generated from a :class:`RopaConfig`: given
directly (``Settings(ropa=...)``), built from a run directory's real configuration
(``FEDCRM_COMPLIANCE_RUN_DIR``, :mod:`fedcrm.compliance.core.ropa_from_run`), read from a JSON
file (``FEDCRM_COMPLIANCE_ROPA_FILE``), or, with none of these, :func:`default_ropa`, which
says that no run configuration was loaded and records no security measure as in force.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedcrm.compliance.db import sqlite_url
from fedcrm.compliance.enums import (
    Accountant,
    LegalBasis,
    Mechanism,
    NeighbouringRelation,
    PrivacyUnit,
    Purpose,
)

NOT_RECORDED = "[to be completed by the controller] not recorded in the run configuration"
"""What a record says where the configuration holds no answer (retention, transfers, ...)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Controller(_Frozen):
    """The controller (Art. 30(1)(a)): name and contact, and the DPO's contact."""

    name: str = Field(min_length=1, max_length=200)
    contact: str = Field(min_length=1, max_length=200)
    dpo_contact: str = Field(min_length=1, max_length=200)


class ProcessingActivity(_Frozen):
    """One purpose of processing and what Art. 30(1)(b)-(f) asks about it.

    ``legal_basis`` is ``None`` where nothing configured establishes one (a run without a
    consent gate); ``notes`` say so, and anything else a reader must not take for granted.
    """

    purpose: Purpose
    description: str = Field(min_length=1, max_length=2000)
    legal_basis: LegalBasis | None
    data_subjects: tuple[str, ...] = Field(min_length=1)
    data_categories: tuple[str, ...] = Field(min_length=1)
    recipients: tuple[str, ...] = ()
    third_country_transfers: str = "none"
    retention: str = Field(min_length=1, max_length=500)
    notes: tuple[str, ...] = ()


DpLevel = Literal["dp-sgd", "central", "distributed"]
"""Where the noise is added: DP-SGD on each branch, by the server, or shared by the branches."""

_LEVELS: dict[str, str] = {
    "dp-sgd": "DP-SGD on every branch",
    "central": "branch-level central DP",
    "distributed": "branch-level distributed DP",
}


class DpTarget(_Frozen):
    """A differential-privacy guarantee of one model, exactly as the run configured it.

    ``epsilon`` is the target after all planned rounds (``None`` only with a fixed
    ``noise_multiplier``), ``epsilon_scope`` says what it is kept for (per branch, for the
    federation); δ is ``delta`` or, where it differs per branch, ``delta_rule``.
    """

    model: str = Field(min_length=1, max_length=128)
    purpose: Purpose
    level: DpLevel = "dp-sgd"
    epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    epsilon_scope: str = Field(default="", max_length=300)
    budget: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    epsilon_spent: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    delta: float | None = Field(default=None, gt=0, lt=1)
    delta_rule: str = Field(default="", max_length=500)
    delta_per_branch: dict[str, float] = Field(default_factory=dict)
    privacy_unit: PrivacyUnit = PrivacyUnit.RECORD
    unit_note: str = Field(default="", max_length=1000)
    neighbouring_relation: NeighbouringRelation = NeighbouringRelation.ADD_REMOVE
    relation_note: str = Field(default="", max_length=500)
    accountant: Accountant
    mechanism: Mechanism
    mechanism_note: str = Field(default="", max_length=500)
    clipping_norm: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    sampling: str = Field(default="", max_length=200)
    not_covered: str = Field(default="", max_length=1000)

    @model_validator(mode="after")
    def _complete(self) -> DpTarget:
        if self.epsilon is None and self.noise_multiplier is None:
            raise ValueError("a DP target needs epsilon (its target) or a fixed noise_multiplier")
        if self.delta is None and not self.delta_rule:
            raise ValueError("a DP target needs delta or the rule that sets it (delta_rule)")
        return self

    def statement(self) -> str:
        """One line naming ε with its unit, δ, the accountant and the mechanism."""
        if self.epsilon is not None:
            scope = self.epsilon_scope or f"for ({self.model}, {self.purpose.value})"
            scope = f" ({scope})"
            goal = f"target ε {self.epsilon:g}{scope} after all planned rounds"
        else:
            goal = f"fixed noise multiplier {self.noise_multiplier:g} (no ε target)"
        parts = [f"{_LEVELS[self.level]}: {goal}"]
        if self.budget is not None and self.budget != self.epsilon:
            parts.append(f"budget ε {self.budget:g}")
        if self.epsilon_spent is not None:
            parts.append(f"largest ε reached {self.epsilon_spent:.3f}")
        unit = f"privacy unit {self.privacy_unit.value}"
        parts.append(f"{unit} ({self.unit_note})" if self.unit_note else unit)
        parts.append(f"δ = {self.delta_rule or f'{self.delta:g}'}")
        parts.append(f"{self.accountant.value.upper()} accountant")
        mechanism = f"mechanism {self.mechanism.value}"
        parts.append(f"{mechanism} ({self.mechanism_note})" if self.mechanism_note else mechanism)
        relation = self.relation_note or self.neighbouring_relation.value
        parts.append(f"neighbouring relation: {relation}")
        if self.clipping_norm is not None:
            parts.append(f"clipping norm {self.clipping_norm:g}")
        if self.noise_multiplier is not None and self.epsilon is not None:
            parts.append(f"fixed noise multiplier {self.noise_multiplier:g}")
        if self.sampling:
            parts.append(f"sampling: {self.sampling}")
        line = "; ".join(parts)
        return f"{line}. Not covered: {self.not_covered}" if self.not_covered else line


class CkksParameters(_Frozen):
    """CKKS parameters of the encrypted aggregation (TenSEAL / Microsoft SEAL)."""

    poly_modulus_degree: int = Field(gt=0)
    coeff_mod_bit_sizes: tuple[int, ...] = Field(min_length=2)
    global_scale_bits: int = Field(gt=0, lt=64)
    security_level_bits: int = 128
    max_abs_value: float | None = Field(default=None, gt=0)
    max_summands: int | None = Field(default=None, gt=0)
    key_id: str | None = Field(default=None, max_length=64)

    @field_validator("poly_modulus_degree")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("poly_modulus_degree must be a power of two")
        return value


class SecAggParameters(_Frozen):
    """Flower SecAgg+ parameters of the masked aggregation (Bell et al. 2020)."""

    num_shares: int = Field(gt=0)
    reconstruction_threshold: int = Field(gt=0)
    clipping_range: float = Field(gt=0)
    quantization_range: int = Field(gt=0)
    modulus_range: int = Field(gt=0)
    max_weight: float | None = Field(default=None, gt=0)


class ConsentGate(_Frozen):
    """The consent gate a run applied before training: its purpose and what it checks."""

    purpose: Purpose
    description: str = Field(min_length=1, max_length=1000)


Aggregation = Literal["plaintext", "ckks", "secagg+"]
"""How model updates reached the server."""


class SecurityMeasures(_Frozen):
    """Technical and organisational measures (Art. 30(1)(g), Art. 32).

    ``measures`` lists what is in force; ``not_in_force`` says plainly what is absent (no DP,
    plaintext updates, no consent gate), so an absence is never read as a claim.
    ``aggregation`` is ``None`` where no configuration records it.
    """

    aggregation: Aggregation | None = None
    dp_targets: tuple[DpTarget, ...] = ()
    ckks: CkksParameters | None = None
    secagg: SecAggParameters | None = None
    consent_gate: ConsentGate | None = None
    measures: tuple[str, ...] = ()
    not_in_force: tuple[str, ...] = ()


class RopaSource(_Frozen):
    """Where the records come from: a run's configuration, a configuration file, or nothing.

    ``config_sha256`` is the SHA-256 of the run's ``config.toml``, so a reader can check which
    configuration the records describe.
    """

    kind: Literal["run", "configured", "none"]
    detail: str = Field(min_length=1, max_length=1000)
    run_id: str | None = Field(default=None, max_length=200)
    config_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class RopaConfig(_Frozen):
    """What the Art. 30 records are generated from."""

    controller: Controller
    activities: tuple[ProcessingActivity, ...] = Field(min_length=1)
    branches: tuple[str, ...] = ()
    security: SecurityMeasures = SecurityMeasures()
    source: RopaSource = RopaSource(
        kind="configured", detail="a RopaConfig given as configuration (not read from a run)"
    )

    @model_validator(mode="after")
    def _unique_purposes(self) -> RopaConfig:
        purposes = [activity.purpose for activity in self.activities]
        if len(set(purposes)) != len(purposes):
            raise ValueError("each purpose may be described once")
        return self


PLACEHOLDER_CONTROLLER = Controller(
    name="fedcrm operator (configure FEDCRM_COMPLIANCE_ROPA_FILE)",
    contact="privacy@example.invalid",
    dpo_contact="dpo@example.invalid",
)
"""The example controller; ``environment = "production"`` refuses it."""

NO_RUN_LOADED = (
    "no run configuration loaded: these records describe no real run and record no security "
    "measure as in force; generate them from a run with `fedcrm compliance serve --run RUN_DIR` "
    "(or FEDCRM_COMPLIANCE_RUN_DIR)"
)


def default_ropa() -> RopaConfig:
    """Return the records used when no run and no configuration is given.

    They keep the controller and the three purposes fedcrm can process for, so the service
    answers, but they claim nothing: no DP target, no encryption, no measure in force.
    """
    unknown = "not known: no run configuration loaded"

    def activity(
        purpose: Purpose, description: str, categories: tuple[str, ...]
    ) -> ProcessingActivity:
        return ProcessingActivity(
            purpose=purpose,
            description=description,
            legal_basis=None,
            data_subjects=("customers",),
            data_categories=categories,
            recipients=(f"federation server (model updates; their protection is {unknown})",),
            third_country_transfers=NOT_RECORDED,
            retention=NOT_RECORDED,
            notes=(NO_RUN_LOADED,),
        )

    return RopaConfig(
        controller=PLACEHOLDER_CONTROLLER,
        activities=(
            activity(
                Purpose.CHURN_MODEL_TRAINING,
                "Federated training of a churn model (no run configuration loaded).",
                ("customer attributes of a churn schema", "churn label"),
            ),
            activity(
                Purpose.RECOMMENDATION_TRAINING,
                "Federated training of a recommender (no run configuration loaded).",
                ("product interactions",),
            ),
            activity(
                Purpose.MARKETING_PROFILING,
                "Scoring customers for direct marketing with trained models (no run "
                "configuration loaded).",
                ("model scores",),
            ),
        ),
        security=SecurityMeasures(not_in_force=(NO_RUN_LOADED,)),
        source=RopaSource(kind="none", detail=NO_RUN_LOADED),
    )


class Settings(BaseSettings):
    """Settings of ``fedcrm compliance serve``; environment prefix ``FEDCRM_COMPLIANCE_``.

    Args:
        database_url: The compliance store (``sqlite:///FILE`` or ``postgresql+psycopg://``).
        environment: ``production`` refuses the example controller of the built-in records.
        ropa_file: JSON file holding a :class:`RopaConfig`; with ``run_dir``, only its
            controller is used.
        run_dir: A run directory whose ``config.toml`` and ``summary.json`` the records are
            generated from (:func:`~fedcrm.compliance.core.ropa_from_run.ropa_from_run`); its
            ``compliance.db``, if any, is the store unless ``database_url`` is given.
        ropa: The configuration itself (wins over ``run_dir`` and ``ropa_file``).
        docs: Serve the OpenAPI docs (``/docs``, ``/openapi.json``).
        max_upload_bytes: Largest consent CSV accepted by the import endpoint.
    """

    model_config = SettingsConfigDict(env_prefix="FEDCRM_COMPLIANCE_", frozen=True, extra="ignore")

    database_url: str = Field(default_factory=lambda: sqlite_url("compliance.db"))
    environment: Literal["development", "production"] = "development"
    ropa_file: Path | None = None
    run_dir: Path | None = None
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
    def _load_ropa(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("ropa") is not None:
            return data
        configured = None
        if data.get("ropa_file"):
            path = Path(data["ropa_file"])
            try:
                configured = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read the RoPA file {path}: {exc}") from exc
        if data.get("run_dir"):
            return {**data, **_from_run(Path(data["run_dir"]), configured, data)}
        if configured is not None:
            data = {**data, "ropa": configured}
        return data

    @model_validator(mode="after")
    def _no_placeholders_in_production(self) -> Settings:
        if self.environment == "production" and self.ropa.controller.contact.endswith(".invalid"):
            raise ValueError(
                "production needs the real controller in the RoPA configuration "
                "(FEDCRM_COMPLIANCE_ROPA_FILE); the built-in one is a placeholder"
            )
        return self


def _from_run(run_dir: Path, configured: Any, data: dict[str, Any]) -> dict[str, Any]:
    """The records of a run (the controller from ``configured``), and its store if it has one."""
    from fedcrm.compliance.core.ropa_from_run import (
        COMPLIANCE_DB,
        RunConfigurationError,
        ropa_from_run,
    )

    controller = None
    if isinstance(configured, dict) and "controller" in configured:
        controller = Controller.model_validate(configured["controller"])
    try:
        out: dict[str, Any] = {"ropa": ropa_from_run(run_dir, controller=controller)}
    except RunConfigurationError as exc:
        raise ValueError(f"cannot build the RoPA from the run {run_dir}: {exc}") from exc
    if not data.get("database_url") and (run_dir / COMPLIANCE_DB).is_file():
        out["database_url"] = sqlite_url(run_dir / COMPLIANCE_DB)
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the settings, read from the environment once (a FastAPI dependency)."""
    return Settings()
