"""Privacy-ledger routes: totals, entries per branch, model and run, and ε burn-down.

Officer: everything. Branch key: its own branch's entries and customers. Researcher: totals
and burn-down only (aggregates per branch and model). A customer's ε (individual accounting)
comes from the per-customer ledger of the store the service runs on (a branch's
``customers.db``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from fedcrm.compliance.api.deps import (
    ROLE_ERRORS,
    CurrentAnyRole,
    CurrentCustomerReader,
    LedgerDep,
    NameQuery,
    ServicesDep,
    scope_branch,
)
from fedcrm.compliance.consent import NAME_PATTERN
from fedcrm.compliance.customer_ledger import CustomerLedger
from fedcrm.compliance.enums import Decision
from fedcrm.compliance.ledger import LedgerEntry
from fedcrm.compliance.schemas import (
    BurnDownPointPublic,
    BurnDownPublic,
    CustomerPrivacyPublic,
    LedgerEntryPublic,
    LedgerTotalPublic,
)

router = APIRouter(prefix="/ledger", tags=["ledger"])


@router.get("/totals", responses=ROLE_ERRORS)
def totals(
    principal: CurrentAnyRole, ledger: LedgerDep, branch: NameQuery = None
) -> list[LedgerTotalPublic]:
    """Return the cumulative ε of every (branch, model, purpose)."""
    scoped = scope_branch(principal, branch)
    return [LedgerTotalPublic.model_validate(total) for total in ledger.totals(branch=scoped)]


@router.get("/entries", responses=ROLE_ERRORS)
def entries(
    principal: CurrentCustomerReader,
    ledger: LedgerDep,
    branch: NameQuery = None,
    model: NameQuery = None,
    run_id: NameQuery = None,
    purpose: NameQuery = None,
    decision: Decision | None = None,
) -> list[LedgerEntryPublic]:
    """Return ledger entries, filtered by branch, model, run, purpose and decision."""
    scoped = scope_branch(principal, branch)
    found = ledger.entries(
        run_id=run_id, branch=scoped, model=model, purpose=purpose, decision=decision
    )
    return [LedgerEntryPublic.model_validate(entry) for entry in found]


@router.get("/runs/{run_id}", responses=ROLE_ERRORS)
def run_entries(
    run_id: Annotated[str, Path(pattern=NAME_PATTERN)],
    principal: CurrentCustomerReader,
    ledger: LedgerDep,
) -> list[LedgerEntryPublic]:
    """Return every entry of one run (a branch key: its own branch's)."""
    scoped = scope_branch(principal, None)
    found = ledger.entries(run_id=run_id, branch=scoped)
    return [LedgerEntryPublic.model_validate(entry) for entry in found]


def burn_down_series(entries: list[LedgerEntry]) -> list[BurnDownPublic]:
    """Group ledger entries into one ε burn-down per (branch, model, purpose).

    Points are the admitted rounds' cumulative ε, in recording order; the budget is the
    latest one in force.
    """
    groups: dict[tuple[str, str, str], list[LedgerEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.branch, entry.model, entry.purpose), []).append(entry)
    series = []
    for (branch, model, purpose), items in sorted(groups.items()):
        budgets = [item.epsilon_budget for item in items if item.epsilon_budget is not None]
        budget = budgets[-1] if budgets else None
        spent = max((item.cumulative_epsilon for item in items), default=0.0)
        points = [
            BurnDownPointPublic.model_validate(item)
            for item in items
            if item.decision is Decision.ADMITTED and item.recorded_at is not None
        ]
        series.append(
            BurnDownPublic(
                branch=branch,
                model=model,
                purpose=purpose,
                budget=budget,
                spent=spent,
                remaining=None if budget is None else max(budget - spent, 0.0),
                refusals=sum(item.decision is Decision.REFUSED for item in items),
                points=points,
            )
        )
    return series


@router.get("/burn-down", responses=ROLE_ERRORS)
def burn_down(
    principal: CurrentAnyRole,
    ledger: LedgerDep,
    branch: NameQuery = None,
    model: NameQuery = None,
) -> list[BurnDownPublic]:
    """Return the ε burn-down of every (branch, model, purpose) against its budget."""
    scoped = scope_branch(principal, branch)
    return burn_down_series(ledger.entries(branch=scoped, model=model))


@router.get("/customers/{customer_id}", responses=ROLE_ERRORS)
def customer_epsilon(
    customer_id: Annotated[str, Path(pattern=NAME_PATTERN)],
    principal: CurrentCustomerReader,
    services: ServicesDep,
    branch: NameQuery = None,
) -> list[CustomerPrivacyPublic]:
    """Return a customer's cumulative ε per (branch, model, purpose) (a branch key: its own).

    Empty when no DP-SGD spend of this store included the customer.
    """
    scoped = scope_branch(principal, branch)
    found = CustomerLedger(services.factory).customer(customer_id, branch=scoped)
    return [CustomerPrivacyPublic.model_validate(total) for total in found]
