"""A branch's DP-SGD round, for every task: plan once, check the budget, train, account.

The branch enforces its own budget: the check runs before any training, against the branch's
persistent accountant (HMAC-protected JSON on the branch, reloaded every round and after any
restart), and a round that would take the cumulative ε past the budget of (model, purpose) is
refused with a structured :class:`fedcrm.privacy.PrivacyReport`; no parameters are
sent. An admitted round trains with at most the admitted number of steps, records the steps it
took and saves the accountant before the reply leaves the branch.

The task says what a DP-SGD row is (`fedcrm.tasks.Task.private_rows`: a record, or a customer
with all their rows) and trains (`Task.train_private`); σ is planned once per federation from
(target ε, δ, planned rounds, local epochs, batch / rows) and cached in the node's
``Context.state`` (a deterministic function of these inputs: the same after a restart).
"""

import hashlib
import hmac
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedcrm.privacy import (
    OPACUS_VERSION,
    BranchAccountant,
    BudgetDecision,
    DPSGDConfig,
    NoisePlan,
    PrivacyReport,
    plan_for_config,
)
from fedcrm.tasks import Arrays, PrivateRows, PrivateUpdate, RoundContext, Task

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KEY_LABEL = b"fedcrm/branch-accountant/v1"
_PLAN_STATE = "dp-plan"


def accountant_path(privacy_dir: Path, *, model: str, purpose: str) -> Path:
    """The accountant file of one (model, purpose) in the branch's privacy folder."""
    return privacy_dir / f"{_SAFE.sub('_', model)}--{_SAFE.sub('_', purpose)}.accountant.json"


def accountant_key(pseudonymisation_key: bytes | None) -> bytes | None:
    """Derive the accountant's HMAC key from the branch key (never reuse a key as it is)."""
    if pseudonymisation_key is None:
        return None
    return hmac.new(pseudonymisation_key, _KEY_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True)
class BranchPrivacy:
    """Where and under which name a branch keeps its privacy state.

    Attributes:
        privacy_dir: The folder of its accountant files.
        branch_name: Its name in the ledger.
        key: HMAC key of the accountant files (`accountant_key`; ``None``: SHA-256 only).
    """

    privacy_dir: Path
    branch_name: str
    key: bytes | None = None


@dataclass(frozen=True)
class DPRoundOutcome:
    """The privacy report, and the update when the round was admitted."""

    report: PrivacyReport
    update: PrivateUpdate | None


def plan(dp: DPSGDConfig, rows: PrivateRows, *, rounds: int, state: RecordDict) -> NoisePlan:
    """The branch's noise for the federation (its δ, q and σ), cached in ``state``.

    Raises:
        fedcrm.exceptions.ConfigError: δ = 1/n with fewer than 2 rows.
        fedcrm.privacy.dp.AccountingError: The batch exceeds the rows, or no σ reaches the
            target.
    """
    fingerprint = json.dumps(
        [dp.to_run_config(include_ledger=False), rows.rows, rows.batch_size, rows.epochs, rounds],
        sort_keys=True,
    )
    cached = state.config_records.get(_PLAN_STATE)
    if cached is not None and cached.get("fingerprint") == fingerprint:
        return NoisePlan(**json.loads(str(cached["plan"])))
    noise = plan_for_config(
        dp, num_rows=rows.rows, batch_size=rows.batch_size, local_epochs=rows.epochs, rounds=rounds
    )
    state.config_records[_PLAN_STATE] = ConfigRecord(
        {"fingerprint": fingerprint, "plan": json.dumps(asdict(noise))}
    )
    logger.info(
        "DP noise planned for %d rounds: sigma %.4f, q %.5f, %d steps/round, epsilon %.4f",
        rounds,
        noise.noise_multiplier,
        noise.sample_rate,
        noise.steps_per_round,
        noise.planned_epsilon,
    )
    return noise


def round_report(
    decision: BudgetDecision,
    *,
    reason: str,
    branch_name: str,
    dp: DPSGDConfig,
    plan: NoisePlan,
    rows: PrivateRows,
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
        privacy_unit=rows.unit,
        epsilon_round=(after - before) if decision.admitted else would_add,
        epsilon_before=before,
        epsilon=after,
        budget=dp.budget,
        delta=plan.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        planned_steps=plan.steps_per_round,
        max_grad_norm=dp.max_grad_norm,
        accountant=dp.accountant,
        library_version=f"opacus {OPACUS_VERSION}",
    )


def private_round(
    task: Task[Any, Any],
    data: object,
    arrays: Arrays,
    settings: object,
    ctx: RoundContext,
    *,
    dp: DPSGDConfig,
    rounds: int,
    where: BranchPrivacy,
) -> DPRoundOutcome:
    """Run one budget-checked DP-SGD round of ``task`` on the branch.

    Args:
        task: The run's task.
        data: The branch's (consent-gated) data.
        arrays: The global model.
        settings: The task's settings.
        ctx: The round (the plan is cached in ``ctx.state``).
        dp: The run's DP settings (model and purpose of the budget).
        rounds: The planned rounds (σ covers all of them).
        where: The branch's privacy folder, name and key.

    Returns:
        The report and, when admitted, the update.

    Raises:
        fedcrm.privacy.dp.AccountantStateError: The stored accountant is corrupted, was
            written by another accountant or under another key (nothing is overwritten).
        fedcrm.privacy.dp.AccountingError: σ cannot be planned.
    """
    rows = task.private_rows(data, settings)
    noise = plan(dp, rows, rounds=rounds, state=ctx.state)
    path = accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    accountant = BranchAccountant.open(path, accountant=dp.accountant, key=where.key)
    decision = accountant.would_exceed(
        noise_multiplier=noise.noise_multiplier,
        sample_rate=noise.sample_rate,
        steps=noise.steps_per_round,
        delta=noise.delta,
        budget=dp.budget,
    )

    def report(*, reason: str, steps: int, after: float) -> PrivacyReport:
        return round_report(
            decision,
            reason=reason,
            branch_name=where.branch_name,
            dp=dp,
            plan=noise,
            rows=rows,
            steps=steps,
            after=after,
        )

    if not decision.admitted:
        logger.warning("%s: round refused: %s", where.branch_name, decision.reason)
        refused = report(reason=decision.reason, steps=0, after=decision.current_epsilon)
        return DPRoundOutcome(refused, None)
    update = task.train_private(data, arrays, settings, ctx, config=dp, plan=noise)
    if update.event is not None:
        accountant.record(update.event)
        accountant.save(path, key=where.key)
    after = accountant.epsilon(noise.delta)
    steps = 0 if update.event is None else update.event.steps
    logger.info(
        "%s: DP round admitted, epsilon %.4f -> %.4f (delta %.3g, %d steps)",
        where.branch_name,
        decision.current_epsilon,
        after,
        noise.delta,
        steps,
    )
    admitted = report(reason=f"{decision.reason}; {rows.note}", steps=steps, after=after)
    return DPRoundOutcome(admitted, update)
