"""Records of processing (GDPR Art. 30) generated from a run directory's real configuration.

``fedcrm simulate`` writes ``config.toml`` (the resolved experiment) into every run directory,
``summary.json`` at its end (with a ``privacy`` section for DP runs), and, for HE runs,
``keys/keyring.json``. :func:`ropa_from_run` reads them (TOML and JSON only, no ML import) and
builds the :class:`~fedcrm.compliance.core.config.RopaConfig`: the measures in force with their
figures, exactly as the run used them, and a plain statement of each measure that is not
("no differential privacy", "none: model updates are sent in plaintext").
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from fedcrm.compliance.core._run_measures import (
    TASKS,
    TaskFacts,
    central_target,
    dp_sgd_target,
    security_measures,
)
from fedcrm.compliance.core._run_tables import Section
from fedcrm.compliance.core.config import (
    NOT_RECORDED,
    PLACEHOLDER_CONTROLLER,
    Controller,
    DpTarget,
    ProcessingActivity,
    RopaConfig,
    RopaSource,
    SecurityMeasures,
)
from fedcrm.compliance.enums import LegalBasis, Purpose, coerce_member
from fedcrm.compliance.errors import ComplianceError

CONFIG_FILE: Final = "config.toml"
SUMMARY_FILE: Final = "summary.json"
KEYRING_FILE: Final = "keys/keyring.json"
SCHEMA_FILE: Final = "schema.json"
"""Optional: the run's declared data schema (:class:`DataSchema`), for the data categories."""
COMPLIANCE_DB: Final = "compliance.db"
_KEPT: Final = (
    ("model.safetensors", "released model"),
    ("items.npz", "released model"),
    ("metrics.jsonl", "per-round metrics"),
    ("ledger.db", "privacy ledger"),
    ("compliance.db", "compliance store"),
    ("audit-log.jsonl", "signed audit-log export"),
    ("checkpoints", "ciphertext checkpoints"),
    ("keys", "CKKS keys, secret key included"),
    ("branches", "branch data and pseudonymisation keys"),
)


class RunConfigurationError(ComplianceError):
    """A run directory's ``config.toml``, ``summary.json`` or key ring is missing or malformed.

    Args:
        problems: Every problem found (the message lists them all).
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class SchemaFeature(BaseModel):
    """One feature column of the declared schema."""

    model_config = ConfigDict(frozen=True, from_attributes=True, extra="ignore")

    name: str
    kind: str


class DataSchema(BaseModel):
    """The declared schema of a run's branch exports (``schema.json``), when it is known.

    The fields are those of ``fedcrm.data.ChurnSchema``, so
    ``DataSchema.model_validate(get_schema(name), from_attributes=True)`` converts one where
    the data layer may be imported (the compliance package may not).
    """

    model_config = ConfigDict(frozen=True, from_attributes=True, extra="ignore")

    name: str
    id_column: str
    label: str
    features: tuple[SchemaFeature, ...]

    def categories(self) -> tuple[str, ...]:
        """The data categories: the pseudonymous id, the features by kind, and the label."""
        kinds: dict[str, list[str]] = {}
        for feature in self.features:
            kinds.setdefault(str(feature.kind), []).append(feature.name)
        return (
            f"pseudonymous customer id ({self.id_column}, keyed HMAC pseudonym)",
            *(f"{kind} attributes: {', '.join(names)}" for kind, names in kinds.items()),
            f"label: {self.label}",
        )


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds for its records, parsed but not yet interpreted.

    Attributes:
        run_id: The run directory's name.
        config: ``config.toml``, parsed.
        config_sha256: SHA-256 (hex) of ``config.toml``'s bytes.
        summary: ``summary.json``, parsed; ``None`` if the run did not finish.
        keyring: ``keys/keyring.json`` of an HE run; ``None`` otherwise.
        schema: ``schema.json``; ``None`` if the run directory has none.
        kept: What the run directory keeps (for the retention entry).
    """

    run_id: str
    config: dict[str, Any]
    config_sha256: str
    summary: dict[str, Any] | None = None
    keyring: dict[str, Any] | None = None
    schema: DataSchema | None = None
    kept: tuple[str, ...] = ()


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: not readable JSON: {exc}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: not a JSON object")
        return None
    return data


def read_run(run_dir: Path) -> RunFiles:
    """Read a run directory's ``config.toml``, ``summary.json``, key ring and schema.

    Raises:
        RunConfigurationError: ``config.toml`` is missing or not TOML, or a JSON file is
            malformed (every problem listed).
    """
    path = run_dir / CONFIG_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RunConfigurationError(
            [
                f"{path}: cannot read the run's configuration ({exc.strerror or exc}); is "
                f"{run_dir} a run directory of `fedcrm simulate`?"
            ]
        ) from exc
    try:
        config = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RunConfigurationError([f"{path}: not valid TOML: {exc}"]) from exc
    problems: list[str] = []
    summary = _read_json(run_dir / SUMMARY_FILE, problems)
    keyring = _read_json(run_dir / KEYRING_FILE, problems)
    schema_data = _read_json(run_dir / SCHEMA_FILE, problems)
    schema = None
    if schema_data is not None:
        try:
            schema = DataSchema.model_validate(schema_data)
        except ValidationError as exc:
            problems.append(f"{run_dir / SCHEMA_FILE}: not a data schema: {exc}")
    if problems:
        raise RunConfigurationError(problems)
    kept = tuple(f"{what} ({name})" for name, what in _KEPT if (run_dir / name).exists())
    return RunFiles(
        run_id=run_dir.name,
        config=config,
        config_sha256=hashlib.sha256(raw).hexdigest(),
        summary=summary,
        keyring=keyring,
        schema=schema,
        kept=kept,
    )


def ropa_from_run(
    run_dir: Path, *, controller: Controller | None = None, schema: DataSchema | None = None
) -> RopaConfig:
    """Build the Art. 30 records of the run in ``run_dir`` from its real configuration.

    Args:
        run_dir: A run directory of ``fedcrm simulate`` (it holds ``config.toml``).
        controller: The controller; default the placeholder, which production refuses.
        schema: The run's data schema; default the run directory's ``schema.json``, if any.

    Raises:
        RunConfigurationError: The files are missing, malformed or contradict each other.
    """
    return build_ropa(read_run(run_dir), controller=controller, schema=schema)


def build_ropa(
    run: RunFiles, *, controller: Controller | None = None, schema: DataSchema | None = None
) -> RopaConfig:
    """Build the records from a run's parsed files (see :func:`ropa_from_run`).

    Raises:
        RunConfigurationError: A value the records need is missing or malformed, or
            ``summary.json`` contradicts ``config.toml`` (every problem listed).
    """
    problems: list[str] = []
    root = Section(run.config, CONFIG_FILE, problems)
    summary = run.summary or {}
    task = TASKS.get(root.text("task", "churn"))
    federation = root.section("federation") or Section({}, f"{CONFIG_FILE} [federation]", problems)
    dp, central, consent = (root.section(key) for key in ("dp", "central-dp", "compliance"))
    privacy, spent = _object(summary, "privacy"), _object(summary, "central_dp")
    if dp is None and privacy is not None:
        problems.append(f"{SUMMARY_FILE} has a privacy section but {CONFIG_FILE} has no [dp]")
    if central is None and spent is not None:
        problems.append(f"{SUMMARY_FILE} has central_dp but {CONFIG_FILE} has no [central-dp]")
    purpose = _purpose(task, (consent, dp, central), problems)
    try:
        targets: list[DpTarget] = []
        if dp is not None:
            targets.append(dp_sgd_target(dp, privacy, task=task, purpose=purpose))
        if central is not None:
            min_train = federation.integer("min-train-nodes", 2)
            targets.append(central_target(central, spent, purpose=purpose, min_train=min_train))
        security = security_measures(
            aggregation=root.section("aggregation")
            or Section({}, f"{CONFIG_FILE} [aggregation]", problems),
            keyring=run.keyring,
            targets=targets,
            consent=consent,
            consent_record=_object(summary, "compliance"),
            purpose=purpose,
            task=task,
        )
        branches = tuple(
            str(b["name"])
            for b in summary.get("branches", [])
            if isinstance(b, dict) and isinstance(b.get("name"), str)
        )
        activity = _activity(
            root, federation, run, purpose, task, security, branches, schema or run.schema
        )
        if problems:
            raise RunConfigurationError(problems)
        return RopaConfig(
            controller=controller or PLACEHOLDER_CONTROLLER,
            activities=(activity,),
            branches=branches,
            security=security,
            source=RopaSource(
                kind="run",
                detail=f"generated from {', '.join(_sources(run))} of run {run.run_id}",
                run_id=run.run_id,
                config_sha256=run.config_sha256,
            ),
        )
    except ValidationError as exc:
        raise RunConfigurationError([*problems, f"the run's records are invalid: {exc}"]) from exc


def _object(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    return value if isinstance(value, dict) else None


def _sources(run: RunFiles) -> list[str]:
    found = [CONFIG_FILE]
    found += [SUMMARY_FILE] if run.summary is not None else []
    found += [KEYRING_FILE] if run.keyring is not None else []
    found += [SCHEMA_FILE] if run.schema is not None else []
    return found


def _purpose(
    task: TaskFacts | None, tables: Sequence[Section | None], problems: list[str]
) -> Purpose:
    """The purpose of ``[compliance]``, else of ``[dp]`` or ``[central-dp]``, else the task's."""
    for table in tables:
        if table is not None and table.has("purpose"):
            where = f"{table.where} purpose"
            found = coerce_member(Purpose, table.text("purpose"), where, problems)
            return found or Purpose.CHURN_MODEL_TRAINING
    if task is None:
        problems.append(
            f"{CONFIG_FILE}: an unknown task and no purpose in [compliance], [dp] or [central-dp]"
        )
        return Purpose.CHURN_MODEL_TRAINING
    return task.purpose


def _recipients(security: SecurityMeasures) -> tuple[str, ...]:
    protection = {
        "plaintext": "in plaintext",
        "ckks": "CKKS-encrypted: the server adds ciphertexts",
        "secagg+": "SecAgg+-masked: the server sees only their sum",
    }[security.aggregation or "plaintext"]
    levels = {target.level for target in security.dp_targets}
    if "dp-sgd" in levels:
        noise = "noised by DP-SGD on each branch"
    elif "distributed" in levels:
        noise = "each carrying its branch's share of the DP noise"
    elif "central" in levels:
        noise = "not noised on arrival: the server adds the DP noise to their aggregate"
    else:
        noise = "without noise"
    return (
        f"federation server: model updates ({protection}; {noise}) and aggregate evaluation "
        "metrics",
        "the participating branches: the released model",
    )


def _activity(
    root: Section,
    federation: Section,
    run: RunFiles,
    purpose: Purpose,
    task: TaskFacts | None,
    security: SecurityMeasures,
    branches: tuple[str, ...],
    schema: DataSchema | None,
) -> ProcessingActivity:
    """The run's one processing activity: its training purpose."""
    name = root.text("name")
    partition = root.section("partition")
    planned = partition.optional_integer("num-branches") if partition else None
    count = len(branches) or planned
    label = task.label if task else f"{root.text('task')} model"
    notes = [_simulation_note(root, security)]
    gate = security.consent_gate
    consent = root.section("compliance")
    if gate is None:
        notes.append(
            "legal basis: not established by the run configuration (no consent gate ran) "
            "[to be completed by the controller]"
        )
    elif consent is not None:
        shares = [consent.number(key, 0.0) for key in _SHARES]
        notes.append(
            "the consent records were simulated for this run: "
            f"{shares[0]:.0%} withdrawn, {shares[1]:.0%} refused, {shares[2]:.0%} without "
            "consent on each branch"
        )
    if run.summary is None:
        notes.append(
            f"the run directory has no {SUMMARY_FILE} (an unfinished run?): the figures reached "
            "(ε spent, δ per branch, audit-log entries) are not known"
        )
    if schema is not None:
        categories = schema.categories()
    elif task is not None and task.pseudonymised_export:
        declared = federation.text("schema", "?")
        categories = (
            f"customer attributes of the declared churn schema '{declared}' (its feature list "
            f"is not in the run directory: no {SCHEMA_FILE})",
            *task.categories[1:],
        )
    else:
        categories = task.categories if task else (NOT_RECORDED,)
    kept = f"{NOT_RECORDED}; the run directory keeps: {', '.join(run.kept)}" if run.kept else ""
    return ProcessingActivity(
        purpose=purpose,
        description=f"Federated training of the {label} for {purpose.value} (run {name}): "
        f"{count or 'an unrecorded number of'} branches, "
        f"{federation.integer('num-rounds')} rounds of {federation.text('strategy', 'fedavg')}; "
        "each branch trains on its own customers' rows.",
        legal_basis=None if gate is None else LegalBasis.CONSENT,
        data_subjects=("customers of the participating branches",),
        data_categories=categories,
        recipients=_recipients(security),
        third_country_transfers=NOT_RECORDED,
        retention=kept or NOT_RECORDED,
        notes=tuple(notes),
    )


_SHARES: Final = ("withdrawn-share", "refused-share", "no-consent-share")


def _simulation_note(root: Section, security: SecurityMeasures) -> str:
    dataset = root.text("dataset", "?")
    note = (
        "simulated federation (fedcrm simulate): one process held the pooled data set "
        f"'{dataset}' and cut it into the virtual branches"
    )
    baselines = root.section("baselines")
    if baselines is not None and baselines.flag("enabled", True):
        gated = (
            " of the customers with valid consent at the end of the run"
            if security.consent_gate
            else ""
        )
        note += f"; it also trained the centralised baselines on the pooled rows{gated}"
    return note
