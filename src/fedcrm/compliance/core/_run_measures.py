"""The security measures of a run (Art. 30(1)(g), Art. 32), read from its configuration.

Each measure in force is stated with the figures the run used; each absent one is stated as
absent (:data:`NO_DP`, :data:`PLAINTEXT`, ...), never left for a reader to assume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from fedcrm.compliance.core._run_tables import Section, as_float
from fedcrm.compliance.core.config import (
    Aggregation,
    CkksParameters,
    ConsentGate,
    DpTarget,
    SecAggParameters,
    SecurityMeasures,
)
from fedcrm.compliance.enums import Accountant, Mechanism, PrivacyUnit, Purpose, coerce_member

DEFAULT_DELTA_RULE: Final = "1/(10n) per branch (n = its DP-SGD rows; δ must stay below 1/n)"
"""δ of a DP-SGD run without ``[dp] delta``, worded as ``summary.json`` states it."""
NO_DP: Final = (
    "differential privacy: none: no differential privacy (neither DP-SGD on the branches nor "
    "branch-level central DP); model updates, the released model and the metrics carry no noise"
)
NO_DP_SGD: Final = (
    "DP-SGD on the branches: none: the only differential privacy is branch-level, with a whole "
    "branch as its privacy unit"
)
PLAINTEXT: Final = (
    "encryption of model updates: none: model updates are sent in plaintext; the server sees "
    "every branch's update"
)
NO_CONSENT_GATE: Final = (
    "consent gate: none: the run did not check consent; every row of every branch was used"
)
NO_AUDIT_LOG: Final = (
    "audit log: none: the run has no compliance store, so no consent change, round manifest or "
    "model release was logged"
)
NO_ROBUST: Final = "robust aggregation: none: the server takes the plain weighted mean"
_DP_SGD_MECHANISM: Final = "DP-SGD: Poisson-subsampled Gaussian, per-example clipping"
_CENTRAL_NOT_COVERED: Final = (
    "the training metrics branches report and the evaluation aggregates are released without noise"
)
_CENTRAL_MODES: Final = {
    "server-fixed": "the server clips each branch's update to norm C and adds Gaussian noise to "
    "their mean (Flower DifferentialPrivacyServerSideFixedClipping); the server sees each "
    "update before the noise",
    "server-adaptive": "the server clips each branch's update to norm C, C following the "
    "{quantile:g} quantile of the update norms, and adds Gaussian noise to their mean (Flower "
    "DifferentialPrivacyServerSideAdaptiveClipping); the server sees each update before the noise",
    "client-fixed": "each branch clips its update to norm C, the server adds Gaussian noise to "
    "their mean (Flower DifferentialPrivacyClientSideFixedClipping); the server sees each "
    "clipped update before the noise",
    "client-adaptive": "each branch clips its update to norm C, C following the {quantile:g} "
    "quantile of the update norms; the server adds Gaussian noise to their mean (Flower "
    "DifferentialPrivacyClientSideAdaptiveClipping); the server sees each clipped update",
    "distributed": "each branch clips its update to norm C and adds its share of the Gaussian "
    "noise before encrypting; the sum carries the full noise if at least {honest} branches are "
    "honest",
}


@dataclass(frozen=True)
class TaskFacts:
    """What the compliance side knows of a registered task without importing it."""

    model: str
    purpose: Purpose
    label: str
    unit: PrivacyUnit
    categories: tuple[str, ...]
    pseudonymised_export: bool


TASKS: Final = {
    "churn": TaskFacts(
        "churn",
        Purpose.CHURN_MODEL_TRAINING,
        "churn model",
        PrivacyUnit.CUSTOMER,
        ("customer attributes of the declared churn schema", "churn label"),
        True,
    ),
    "recommendation": TaskFacts(
        "recommender",
        Purpose.RECOMMENDATION_TRAINING,
        "recommender",
        PrivacyUnit.CUSTOMER,
        ("product interactions: pseudonymous customer, item, time of the interaction",),
        False,
    ),
}


@dataclass
class Measures:
    """The measures found so far: in force, and plainly absent."""

    in_force: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)


def _member(cls: Any, value: str, where: str, problems: list[str], fallback: Any) -> Any:
    found = coerce_member(cls, value, where, problems)
    return fallback if found is None else found


def _agree(name: str, ours: object, theirs: object, problems: list[str]) -> None:
    """Add a problem if ``summary.json`` states ``theirs`` where ``config.toml`` has ``ours``."""
    if theirs is None:
        return
    a, b = as_float(ours), as_float(theirs)
    same = math.isclose(a, b, rel_tol=1e-9) if a is not None and b is not None else ours == theirs
    if not same:
        problems.append(f"summary.json states {name} {theirs!r} but config.toml has {ours!r}")


def dp_sgd_target(
    dp: Section, privacy: Mapping[str, Any] | None, *, task: TaskFacts | None, purpose: Purpose
) -> DpTarget:
    """The DP-SGD guarantee of ``[dp]``, with what ``summary.json`` says the run reached."""
    problems = dp.problems
    epsilon = dp.number("target-epsilon")
    delta = dp.optional_number("delta")
    accountant = dp.text("accountant")
    clip = dp.number("max-grad-norm")
    budget = dp.optional_number("max-epsilon") or epsilon
    reached = privacy or {}
    _agree("privacy target_epsilon", epsilon, reached.get("target_epsilon"), problems)
    _agree("privacy accountant", accountant, reached.get("accountant"), problems)
    _agree("privacy max_grad_norm", clip, reached.get("max_grad_norm"), problems)
    _agree("privacy budget", budget, reached.get("budget"), problems)
    rule = DEFAULT_DELTA_RULE if delta is None else f"{delta:g}"
    _agree("privacy delta_rule", rule, reached.get("delta_rule"), problems)
    branches = [b for b in reached.get("branches", []) if isinstance(b, dict)]
    unit = reached.get("privacy_unit") or (task.unit if task else PrivacyUnit.RECORD).value
    model = dp.text("model", task.model if task else None)
    kept_for = dp.text("purpose", purpose.value)
    scope = reached.get("epsilon_scope") or f"per branch, cumulative for ({model}, {kept_for})"
    return DpTarget(
        model=model,
        purpose=_member(Purpose, kept_for, "[dp] purpose", problems, purpose),
        level="dp-sgd",
        epsilon=epsilon,
        epsilon_scope=str(scope),
        budget=budget,
        epsilon_spent=as_float(reached.get("epsilon_max")),
        delta=delta,
        delta_rule=rule if delta is None else f"{delta:g} on every branch",
        delta_per_branch={
            str(b["branch"]): float(b["delta"]) for b in branches if as_float(b.get("delta"))
        },
        privacy_unit=_member(PrivacyUnit, unit, "privacy unit", problems, PrivacyUnit.RECORD),
        unit_note=str(reached.get("unit_note", "")),
        relation_note=str(reached.get("neighbouring_relation", "add/remove one DP-SGD row")),
        accountant=_member(Accountant, accountant, "[dp] accountant", problems, Accountant.RDP),
        mechanism=Mechanism.SUBSAMPLED_GAUSSIAN,
        mechanism_note=str(reached.get("mechanism", _DP_SGD_MECHANISM)),
        clipping_norm=clip,
        noise_multiplier=dp.optional_number("noise-multiplier"),
        sampling="Poisson subsampling of each branch's DP-SGD rows",
        not_covered=str(reached.get("not_covered", "")),
    )


def central_target(
    central: Section, spent: Mapping[str, Any] | None, *, purpose: Purpose, min_train: int
) -> DpTarget:
    """The branch-level guarantee of ``[central-dp]`` (server-side, client-side, distributed)."""
    problems = central.problems
    mode = central.text("mode")
    if mode not in _CENTRAL_MODES:
        problems.append(f"{central.where}: mode must be one of {sorted(_CENTRAL_MODES)}")
    epsilon = central.optional_number("target-epsilon")
    delta = central.number("delta")
    accountant = central.text("accountant")
    reached = spent or {}
    _agree("central_dp delta", delta, reached.get("delta"), problems)
    _agree("central_dp accountant", accountant, reached.get("accountant"), problems)
    honest = central.optional_integer("min-honest-branches") or min_train
    model, kept_for = central.text("model"), central.text("purpose", purpose.value)
    how = _CENTRAL_MODES.get(mode, mode).format(
        quantile=central.number("target-quantile", 0.5), honest=honest
    )
    return DpTarget(
        model=model,
        purpose=_member(Purpose, kept_for, "[central-dp] purpose", problems, purpose),
        level="distributed" if mode == "distributed" else "central",
        epsilon=epsilon,
        epsilon_scope=f"for any one branch's data, cumulative for ({model}, {kept_for})",
        budget=central.optional_number("max-epsilon") or epsilon,
        epsilon_spent=as_float(reached.get("epsilon")),
        delta=delta,
        privacy_unit=PrivacyUnit.BRANCH,
        unit_note=f"{mode}: {how}",
        relation_note="add/remove one branch's data",
        accountant=_member(
            Accountant, accountant, "[central-dp] accountant", problems, Accountant.RDP
        ),
        mechanism=Mechanism.GAUSSIAN,
        mechanism_note=str(reached.get("noise", "Gaussian noise on the sum of clipped updates")),
        clipping_norm=central.number("clipping-norm"),
        noise_multiplier=central.optional_number("noise-multiplier"),
        sampling="none (q = 1, no amplification claimed)",
        not_covered=_CENTRAL_NOT_COVERED,
    )


def _ckks(keyring: Mapping[str, Any], problems: list[str]) -> CkksParameters | None:
    """The current generation's CKKS parameters from ``keys/keyring.json``."""
    generations = keyring.get("generations")
    current = keyring.get("current")
    entry = next(
        (g for g in generations or [] if isinstance(g, dict) and g.get("generation") == current),
        None,
    )
    params = entry.get("params") if entry else None
    if not isinstance(params, dict) or params.get("scheme") != "ckks":
        problems.append("keys/keyring.json: no CKKS parameters for the current generation")
        return None
    try:
        return CkksParameters(
            poly_modulus_degree=params["poly_modulus_degree"],
            coeff_mod_bit_sizes=tuple(params["coeff_mod_bit_sizes"]),
            global_scale_bits=params["scale_bits"],
            max_abs_value=params.get("max_abs_value"),
            max_summands=params.get("max_summands"),
            key_id=entry.get("key_id") if entry else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"keys/keyring.json: malformed CKKS parameters: {exc}")
        return None


def _he_line(ckks: CkksParameters | None) -> str:
    what = "CKKS homomorphic encryption of model updates (TenSEAL / Microsoft SEAL)"
    how = (
        "branches encrypt their count-weighted updates; the server adds ciphertexts holding the "
        "public context only"
    )
    if ckks is None:
        return f"{what}: {how} (parameters not recorded: the run has no keys/keyring.json)"
    key = f", key id {ckks.key_id[:16]}…" if ckks.key_id else ""
    return (
        f"{what}: N = {ckks.poly_modulus_degree}, coefficient primes "
        f"{list(ckks.coeff_mod_bit_sizes)} bits, scale 2^{ckks.global_scale_bits}, "
        f"{ckks.security_level_bits}-bit security{key}; {how}"
    )


def aggregation_measures(
    aggregation: Section, keyring: Mapping[str, Any] | None, found: Measures
) -> tuple[Aggregation, CkksParameters | None, SecAggParameters | None]:
    """How updates reached the server, and the robust aggregator, as configured."""
    problems = aggregation.problems
    mode = aggregation.text("mode")
    ckks = secagg = None
    kind: Aggregation = "plaintext"
    if mode == "he":
        kind = "ckks"
        ckks = None if keyring is None else _ckks(keyring, problems)
        found.in_force.append(_he_line(ckks))
    elif mode == "secagg":
        kind = "secagg+"
        secagg = SecAggParameters(
            num_shares=aggregation.integer("secagg-num-shares"),
            reconstruction_threshold=aggregation.integer("secagg-threshold"),
            clipping_range=aggregation.number("secagg-clipping-range"),
            quantization_range=aggregation.integer("secagg-quantization-range"),
            modulus_range=aggregation.integer("secagg-modulus-range"),
            max_weight=aggregation.optional_number("secagg-max-weight"),
        )
        found.in_force.append(
            "SecAgg+ secure aggregation (Flower; Bell et al. 2020): each branch masks its "
            "quantized update and the server unmasks only their sum; "
            f"{secagg.num_shares} key shares per branch, reconstruction threshold "
            f"{secagg.reconstruction_threshold}, quantization range {secagg.quantization_range}, "
            f"modulus range {secagg.modulus_range}, clipping range {secagg.clipping_range:g}"
        )
    elif mode == "plain":
        found.absent.append(PLAINTEXT)
    else:
        problems.append(f"{aggregation.where}: mode must be plain, he or secagg, got {mode!r}")
    robust = aggregation.text("robust", "none")
    detail = {
        "krum": f"Krum (Blanchard et al. 2017), f = {aggregation.integer('krum-malicious', 1)}",
        "multi-krum": f"Multi-Krum (Blanchard et al. 2017), f = "
        f"{aggregation.integer('krum-malicious', 1)}, m = "
        f"{aggregation.integer('multi-krum-select', 2)}",
        "median": "coordinate-wise median (Yin et al. 2018)",
        "trimmed-mean": f"coordinate-wise trimmed mean (Yin et al. 2018), β = "
        f"{aggregation.number('trim-beta', 0.1):g}",
    }
    if robust == "none":
        found.absent.append(NO_ROBUST)
    else:
        found.in_force.append(f"robust aggregation: {detail.get(robust, robust)}")
    return kind, ckks, secagg


def consent_measures(
    consent: Section | None, record: Mapping[str, Any] | None, purpose: Purpose, found: Measures
) -> ConsentGate | None:
    """The consent gate and the audit log of a consent-gated run, or their plain absence."""
    if consent is None:
        found.absent += [NO_CONSENT_GATE, NO_AUDIT_LOG]
        return None
    gate = ConsentGate(
        purpose=purpose,
        description=f"consent gate ({purpose.value}): on every branch and for every message "
        "(federated statistics, training, evaluation) only customers whose consent for the "
        "purpose is valid at that time are kept (given or renewed; not expired, withdrawn, "
        "refused or erased); a branch whose data is not collected for the purpose refuses the "
        "run; each training round commits to the customers it used in a round manifest",
    )
    found.in_force.append(gate.description)
    summary = record or {}
    entries = summary.get("audit_entries")
    if isinstance(entries, int):
        verified = "verified" if summary.get("audit_verified") is True else "NOT verified"
        found.in_force.append(
            "tamper-evident audit log (RFC 9162 Merkle tree, Ed25519-signed checkpoints) of the "
            f"consent changes, round manifests and the model release: {entries} entries, "
            f"{verified} at the end of the run; {summary.get('manifests', '?')} round manifests, "
            f"{summary.get('rows_used', '?')} training rows used, "
            f"{summary.get('rows_excluded', '?')} left out by the consent gate"
        )
    else:
        found.in_force.append(
            "audit log in the run's compliance store (not summarised: the run has no "
            "summary.json compliance section)"
        )
    return gate


def security_measures(
    *,
    aggregation: Section,
    keyring: Mapping[str, Any] | None,
    targets: list[DpTarget],
    consent: Section | None,
    consent_record: Mapping[str, Any] | None,
    purpose: Purpose,
    task: TaskFacts | None,
) -> SecurityMeasures:
    """Every measure of the run: in force with its figures, or stated as absent."""
    found = Measures(
        in_force=[
            "federated training: each branch trains on its own rows; the server receives model "
            "updates and aggregate metrics, never rows"
        ]
    )
    if task is not None and task.pseudonymised_export:
        found.in_force.append(
            "pseudonymisation: customer ids replaced by keyed HMAC-SHA-256 pseudonyms (a key "
            "per branch) before training"
        )
    kind, ckks, secagg = aggregation_measures(aggregation, keyring, found)
    found.in_force += [target.statement() for target in targets]
    if not targets:
        found.absent.append(NO_DP)
    elif all(target.level != "dp-sgd" for target in targets):
        found.absent.append(NO_DP_SGD)
    if targets:
        refusal = (
            "; a round that would take ε past the budget is refused"
            if all(target.budget is not None for target in targets)
            else ""
        )
        found.in_force.append(
            "privacy ledger: every round's ε, δ, accountant and mechanism, admitted or refused"
            + refusal
        )
    gate = consent_measures(consent, consent_record, purpose, found)
    return SecurityMeasures(
        aggregation=kind,
        dp_targets=tuple(targets),
        ckks=ckks,
        secagg=secagg,
        consent_gate=gate,
        measures=tuple(found.in_force),
        not_in_force=tuple(found.absent),
    )
