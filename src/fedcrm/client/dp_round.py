"""A branch's record-level DP round: plan once, check the budget, train privately, account.

The branch enforces its own budget: the check runs before any training, against the branch's
persistent accountant (JSON on the branch, reloaded every round and after any restart), and a
round that would take the cumulative ε past the budget of (model, purpose) is refused with a
structured :class:`fedcrm.privacy.federated.PrivacyReport`; no parameters are sent. An admitted
round trains with at most the admitted number of steps, records the steps it took and saves the
accountant before the reply leaves the branch.

Notes:
    The noise multiplier is planned once per federation from (target ε, δ, planned rounds,
    local epochs, batch size / rows) by :func:`fedcrm.privacy.accounting.plan_for_config`. Each
    branch plans for its own row count; the plan is cached on the node (``context.state`` in
    the ClientApp) and, being a deterministic function of these inputs, is the same after a
    restart.
"""

import hashlib
import hmac
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcrm.client import branch
from fedcrm.data.preprocess import Scaler
from fedcrm.data.schema import ChurnSchema
from fedcrm.data.split import Split
from fedcrm.models.churn import TrainSettings
from fedcrm.privacy.accounting import BranchAccountant, NoisePlan, plan_for_config
from fedcrm.privacy.budget import BudgetDecision
from fedcrm.privacy.config import DPConfig
from fedcrm.privacy.dp_sgd import OPACUS_VERSION
from fedcrm.privacy.federated import FederatedDPConfig, PrivacyReport, PrivacyUnitName

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KEY_LABEL = b"fedcrm/branch-accountant/v1"


def accountant_path(privacy_dir: Path, *, model: str, purpose: str) -> Path:
    """The accountant file of one (model, purpose) in the branch's privacy folder."""
    return privacy_dir / f"{_SAFE.sub('_', model)}--{_SAFE.sub('_', purpose)}.accountant.json"


def accountant_key(pseudonymisation_key: bytes | None) -> bytes | None:
    """Derive the accountant's HMAC key from the branch key (never reuse a key as it is)."""
    if pseudonymisation_key is None:
        return None
    return hmac.new(pseudonymisation_key, _KEY_LABEL, hashlib.sha256).digest()


def privacy_unit_of(split: Split, schema: ChurnSchema) -> PrivacyUnitName:
    """``"customer"`` when each training row is a distinct customer, else ``"record"``."""
    ids = split.train[schema.id_column]
    return "customer" if bool(ids.notna().all()) and bool(ids.is_unique) else "record"


@dataclass(frozen=True)
class DPRoundOutcome:
    """What a DP round produced: new parameters (admitted only) and the privacy report."""

    report: PrivacyReport
    state_dict: dict[str, torch.Tensor] | None
    num_examples: int


@dataclass(frozen=True)
class BranchDPContext:
    """Where and under which name a branch keeps its privacy state."""

    privacy_dir: Path
    branch_name: str
    key: bytes | None = None
    """HMAC key of the accountant files (``None``: SHA-256 integrity only)."""


def plan_branch(
    dp: FederatedDPConfig, *, num_rows: int, settings: TrainSettings, rounds: int
) -> tuple[DPConfig, NoisePlan]:
    """The branch's DP configuration and the noise planned for the whole federation.

    Raises:
        fedcrm.privacy.config.InvalidDPConfig: A value is out of range.
        fedcrm.privacy.accounting.AccountingError: The batch exceeds the branch's rows, or no
            noise multiplier reaches the target.
    """
    config = dp.for_branch(
        num_rows=num_rows,
        batch_size=settings.batch_size,
        local_epochs=settings.epochs,
        rounds=rounds,
    )
    return config, plan_for_config(config, num_rows=num_rows)


def round_report(
    decision: BudgetDecision,
    *,
    reason: str,
    branch_name: str,
    dp: FederatedDPConfig,
    config: DPConfig,
    plan: NoisePlan,
    unit: PrivacyUnitName,
    steps: int,
    after: float,
) -> PrivacyReport:
    """The report of one DP round, admitted (``after``: ε after it) or refused.

    A refusal's cost is what the round would have added (0 if the accountant has no finite
    bound for it: the reason says so).
    """
    before = decision.current_epsilon
    would_add = decision.round_epsilon if math.isfinite(decision.round_epsilon) else 0.0
    return PrivacyReport(
        decision="admitted" if decision.admitted else "refused",
        reason=reason,
        branch=branch_name,
        model=dp.model,
        purpose=dp.purpose,
        privacy_unit=unit,
        epsilon_round=(after - before) if decision.admitted else would_add,
        epsilon_before=before,
        epsilon=after,
        budget=config.budget,
        delta=config.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        planned_steps=plan.steps_per_round,
        max_grad_norm=config.max_grad_norm,
        accountant=config.accountant,
        library_version=f"opacus {OPACUS_VERSION}",
    )


def private_round(
    split: Split,
    schema: ChurnSchema,
    scaler: Scaler,
    global_state: dict[str, torch.Tensor],
    settings: TrainSettings,
    *,
    dp: FederatedDPConfig,
    config: DPConfig,
    plan: NoisePlan,
    where: BranchDPContext,
    seed: int | None = None,
) -> DPRoundOutcome:
    """Run one budget-checked DP-SGD round on the branch.

    Args:
        split: The branch's rows.
        schema: Declared schema.
        scaler: The federated scaler.
        global_state: The global model.
        settings: Local optimisation settings.
        dp: The run's DP settings (model and purpose of the budget).
        config: The branch's DP configuration (from :func:`plan_branch`).
        plan: The noise planned for the federation (from :func:`plan_branch`).
        where: The branch's privacy folder, name and key.
        seed: Noise seed for reproducible experiments only (``None``: OS CSPRNG).

    Returns:
        The report and, when admitted, the new parameters.

    Raises:
        fedcrm.privacy.accounting.AccountantStateError: The stored accountant is corrupted or
            was written by another accountant (nothing is overwritten).
    """
    path = accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    accountant = BranchAccountant.open(path, accountant=config.accountant, key=where.key)
    decision = accountant.would_exceed(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        delta=config.delta,
        budget=config.budget,
    )
    unit = privacy_unit_of(split, schema)

    def report(*, reason: str, steps: int, after: float) -> PrivacyReport:
        return round_report(
            decision,
            reason=reason,
            branch_name=where.branch_name,
            dp=dp,
            config=config,
            plan=plan,
            unit=unit,
            steps=steps,
            after=after,
        )

    if not decision.admitted:
        logger.warning("%s: round refused: %s", where.branch_name, decision.reason)
        return DPRoundOutcome(
            report(reason=decision.reason, steps=0, after=decision.current_epsilon),
            None,
            len(split.train),
        )
    out = branch.train_private(
        split, schema, scaler, global_state, settings, dp=config, plan=plan, seed=seed
    )
    if out.event is not None:
        accountant.record(out.event)
        accountant.save(path, key=where.key)
    after = accountant.epsilon(config.delta)
    unit_note = (
        "privacy unit customer: one row per customer, so record-level DP-SGD is customer-level"
        if unit == "customer"
        else "privacy unit record: customers may have several rows"
    )
    steps = 0 if out.event is None else out.event.steps
    logger.info(
        "%s: DP round admitted, epsilon %.4f -> %.4f (delta %.3g, %d steps)",
        where.branch_name,
        decision.current_epsilon,
        after,
        config.delta,
        steps,
    )
    return DPRoundOutcome(
        report(reason=f"{decision.reason}; {unit_note}", steps=steps, after=after),
        out.state_dict,
        out.num_examples,
    )
