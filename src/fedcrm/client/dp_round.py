"""A branch's DP-SGD round, for every task: plan once, check the budget, train, account.

The branch enforces its own budget: the check runs before any training, against the branch's
persistent accountant (HMAC-protected JSON on the branch, reloaded every round and after any
restart, kept across runs), and a round that would take the cumulative ε past the budget of
(model, purpose) is refused with a structured :class:`fedcrm.privacy.PrivacyReport`; no
parameters are sent. An admitted round is charged first (write-ahead: its admitted steps are
saved as a reserved spend before training starts), trains with at most those steps, and is
marked released before the reply leaves the branch; a crash in between loses no spend.

The task says what a DP-SGD row is (`fedcrm.tasks.Task.private_rows`: a record, or a customer
with all their rows) and trains (`Task.train_private`); σ is planned once per federation from
(target ε, δ, planned rounds, local epochs, batch / rows) and cached in the node's
``Context.state`` (a deterministic function of these inputs: the same after a restart).
"""

import functools
import hashlib
import hmac
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedcrm import wire as k
from fedcrm.compliance import (
    Accountant,
    CustomerLedger,
    PrivacyUnit,
    SpendCustomers,
    open_store,
    sqlite_url,
)
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy import (
    OPACUS_VERSION,
    AccountantStateError,
    AccountingError,
    AccountingEvent,
    BranchAccountant,
    BudgetDecision,
    DPSGDConfig,
    NoisePlan,
    PrivacyReport,
    Spend,
    compute_epsilon,
    parse_spends,
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
        privacy_dir: The folder of its accountant files and of its per-customer ledger
            (``customers.db``, a compliance store).
        branch_name: Its name in the ledger.
        key: HMAC key of the accountant files (`accountant_key`; ``None``: SHA-256 only).
    """

    privacy_dir: Path
    branch_name: str
    key: bytes | None = None

    def customers(self) -> CustomerLedger:
        """The branch's per-customer ledger (created and migrated on first use)."""
        self.privacy_dir.mkdir(parents=True, exist_ok=True)
        return _customer_ledger(sqlite_url(self.privacy_dir / CUSTOMER_LEDGER))


@functools.lru_cache(maxsize=64)
def _customer_ledger(url: str) -> CustomerLedger:
    """One migrated store per file and process (a simulated branch's actor serves many rounds)."""
    return CustomerLedger(open_store(url))


CUSTOMER_LEDGER = "customers.db"
"""The branch's per-customer ledger in its privacy folder."""


def customer_epsilons(
    accountant: BranchAccountant,
    ledger: CustomerLedger,
    *,
    spend: Spend,
    customers: list[str],
    branch: str,
    dp: DPSGDConfig,
    delta: float,
) -> dict[str, float]:
    """Each included customer's cumulative ε after ``spend`` (individual accounting).

    A customer's history is the spends recorded with them, plus every spend whose customers
    were never recorded (version-1 accountants, spends learnt from the coordinator's ledger,
    a crash before the record): those count for everyone.
    """
    by_id = {s.spend_id: s.event for s in accountant.spends if s.spend_id is not None}
    recorded = ledger.recorded_spends(branch, dp.model, dp.purpose)
    lost = recorded - by_id.keys()
    if lost:
        raise AccountantStateError(
            f"the per-customer ledger holds {len(lost)} spend(s) of {branch} that its accountant "
            "lacks: the accountant was reset or rolled back; restore it from its backup (the "
            "coordinator's ledger sends back the spends it recorded) - never reset it"
        )
    unknown = [
        s.event
        for s in accountant.spends
        if s.spend_id != spend.spend_id and (s.spend_id is None or s.spend_id not in recorded)
    ]
    history = ledger.spends_by_customer(branch, dp.model, dp.purpose)
    groups: dict[frozenset[str], list[str]] = {}
    for customer in dict.fromkeys(customers):
        key = frozenset(history.get(customer, set()) & by_id.keys())
        groups.setdefault(key, []).append(customer)
    out: dict[str, float] = {}
    for key, members in groups.items():
        events = [*unknown, *(by_id[i] for i in sorted(key)), spend.event]
        epsilon = compute_epsilon(events, delta=delta, accountant=dp.accountant)
        out.update(dict.fromkeys(members, epsilon))
    return out


@dataclass(frozen=True)
class DPRoundOutcome:
    """The privacy report, and the update when the round was admitted."""

    report: PrivacyReport
    update: PrivateUpdate | None


def plan(dp: DPSGDConfig, rows: PrivateRows, *, rounds: int, state: RecordDict) -> NoisePlan:
    """The branch's noise for the federation (its δ, q and σ), cached in ``state``.

    Raises:
        fedcrm.exceptions.ConfigError: The configured δ is not below the branch's 1/n.
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


def open_accountant(
    where: BranchPrivacy, dp: DPSGDConfig, ctx: RoundContext
) -> tuple[BranchAccountant, Path]:
    """The branch's accountant of (model, purpose), with the ledger's spends it lacked added.

    Raises:
        fedcrm.privacy.dp.AccountantStateError: The stored accountant or the message's ledger
            spends are invalid.
    """
    path = accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    accountant = BranchAccountant.open(path, accountant=dp.accountant, key=where.key)
    from_ledger = ctx.config.get(k.KEY_LEDGER_SPENDS)
    if isinstance(from_ledger, str) and accountant.absorb(parse_spends(from_ledger)):
        accountant.save(path, key=where.key)  # the ledger knew spends this accountant lacked
    return accountant, path


def over_customer_budget(
    task: Task[Any, Any],
    data: Any,
    settings: object,
    ctx: RoundContext,
    *,
    dp: DPSGDConfig,
    rounds: int,
    where: BranchPrivacy,
) -> set[str]:
    """The privacy filter: the training customers whose own ε would pass the customer budget.

    Each customer's projected ε composes their own spends and this round's planned one; the
    plan is made again on the customers left (fewer rows sample each more often) until no
    one more is over. Nothing is recorded.

    Raises:
        fedcrm.exceptions.ConfigError: The run has no customer budget, or a DP-SGD row is
            not one customer (no per-customer figures).
    """
    budget = dp.customer_budget
    if budget is None:
        raise ConfigError("the privacy filter needs [dp] customer-budget")
    if task.private_rows(data, settings).unit != "customer":
        raise ConfigError(
            "[dp] customer-budget needs one DP-SGD row per customer; this branch's rows repeat "
            "customers (record-level), so no customer's own epsilon is kept"
        )
    accountant, _ = open_accountant(where, dp, ctx)
    customers = list(dict.fromkeys(data.subjects()["train"]))
    over: set[str] = set()
    while len(over) < len(customers):
        left = [c for c in customers if c not in over]
        rows = task.private_rows(data.keep(set(left)), settings)
        noise = plan(dp, rows, rounds=rounds, state=ctx.state)
        planned = Spend(
            AccountingEvent(noise.noise_multiplier, noise.sample_rate, noise.steps_per_round),
            "planned",
        )
        epsilons = customer_epsilons(
            accountant,
            where.customers(),
            spend=planned,
            customers=left,
            branch=where.branch_name,
            dp=dp,
            delta=noise.delta,
        )
        more = {c for c, eps in epsilons.items() if eps > budget}
        if not more:
            break
        over |= more
    return over


def privacy_state(
    task: Task[Any, Any],
    data: object,
    settings: object,
    ctx: RoundContext,
    *,
    dp: DPSGDConfig,
    rounds: int,
    where: BranchPrivacy,
) -> dict[str, str | float | int]:
    """The branch's accountant and noise plan, for the coordinator's ledger before round 1.

    Every spend with an id (reserved or released) goes along, so the coordinator records those
    the ledger lacks (a crash between training and the ledger write) and sends back those the
    accountant lacks. A branch that cannot plan says why (``plan-error``); it will refuse the
    round itself.

    Raises:
        fedcrm.privacy.dp.AccountantStateError: The stored accountant is unreadable.
    """
    rows = task.private_rows(data, settings)
    path = accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    accountant = BranchAccountant.open(path, accountant=dp.accountant, key=where.key)
    spends = [s.to_json() for s in accountant.spends if s.spend_id is not None]
    state: dict[str, str | float | int] = {
        "branch": where.branch_name,
        "unit": rows.unit,
        "spends": json.dumps(spends),
    }
    try:
        noise = plan(dp, rows, rounds=rounds, state=ctx.state)
    except FedCrmError as exc:
        state["plan-error"] = str(exc)
        return state
    state.update(
        {
            "delta": noise.delta,
            "noise-multiplier": noise.noise_multiplier,
            "sample-rate": noise.sample_rate,
            "steps": noise.steps_per_round,
            "epsilon": accountant.epsilon(noise.delta),
        }
    )
    return state


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
    run_id: str,
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
        run_id: The run (it tags the spend).

    Returns:
        The report and, when admitted, the update.

    Raises:
        fedcrm.privacy.dp.AccountantStateError: The stored accountant is corrupted, was
            written by another accountant or under another key (nothing is overwritten).
        fedcrm.privacy.dp.AccountingError: σ cannot be planned.
    """
    rows = task.private_rows(data, settings)
    noise = plan(dp, rows, rounds=rounds, state=ctx.state)
    accountant, path = open_accountant(where, dp, ctx)
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
    # Write-ahead: the admitted steps are charged and on disk before the data is touched.
    spend = accountant.reserve(
        AccountingEvent(noise.noise_multiplier, noise.sample_rate, noise.steps_per_round),
        run_id=run_id,
        server_round=ctx.server_round,
    )
    accountant.save(path, key=where.key)
    if rows.unit == "customer":  # which customers this spend includes, before it trains
        customers = where.customers()
        customers.record(
            SpendCustomers(
                branch=where.branch_name,
                model=dp.model,
                purpose=dp.purpose,
                spend_id=spend.spend_id or "",
                run_id=run_id,
                round=ctx.server_round,
                delta=noise.delta,
                privacy_unit=PrivacyUnit(rows.unit),
                accountant=Accountant(dp.accountant),
                epsilons=customer_epsilons(
                    accountant,
                    customers,
                    spend=spend,
                    customers=list(data.subjects()["train"]),  # type: ignore[attr-defined]
                    branch=where.branch_name,
                    dp=dp,
                    delta=noise.delta,
                ),
            )
        )
    update = task.train_private(data, arrays, settings, ctx, config=dp, plan=noise)
    taken = 0 if update.event is None else update.event.steps
    if taken > noise.steps_per_round:  # make_private's step limit makes this impossible
        raise AccountingError(f"the round took {taken} steps, {noise.steps_per_round} admitted")
    accountant.release(spend.spend_id or "")
    accountant.save(path, key=where.key)
    after = accountant.epsilon(noise.delta)
    steps = noise.steps_per_round  # charged: the admitted steps (an upper bound of those taken)
    logger.info(
        "%s: DP round admitted, epsilon %.4f -> %.4f (delta %.3g, %d steps)",
        where.branch_name,
        decision.current_epsilon,
        after,
        noise.delta,
        steps,
    )
    admitted = report(reason=f"{decision.reason}; {rows.note}", steps=steps, after=after)
    return DPRoundOutcome(replace(admitted, spend_id=spend.spend_id or ""), update)
