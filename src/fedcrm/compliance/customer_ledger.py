"""The per-customer ledger: which spends included each customer, and each customer's ε.

Individual accounting (Feldman & Zrnic 2021): a customer's ε composes only the DP-SGD spends
whose rows included them (the consent gate and the privacy filter leave them out of the
others). The branch writes a spend's customers before it trains, with every included
customer's cumulative ε after it (computed on the branch: this module never imports the ML
stack); a customer's ε is never lowered. See docs/privacy-analysis.md#per-customer-accounting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.db import equalities, transaction
from fedcrm.compliance.enums import Accountant, PrivacyUnit
from fedcrm.compliance.errors import CumulativeEpsilonDecrease, LedgerError
from fedcrm.compliance.models import CustomerPrivacy, CustomerSpend


@dataclass(frozen=True, slots=True)
class CustomerTotal:
    """A customer's cumulative ε for (branch, model, purpose), at ``delta``."""

    branch: str
    customer: str
    model: str
    purpose: str
    cumulative_epsilon: float
    delta: float
    privacy_unit: PrivacyUnit
    accountant: Accountant
    spends: int
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SpendCustomers:
    """One spend of a branch and the ε of every customer it included (after the spend)."""

    branch: str
    model: str
    purpose: str
    spend_id: str
    run_id: str
    round: int
    delta: float
    privacy_unit: PrivacyUnit
    accountant: Accountant
    epsilons: Mapping[str, float]


class CustomerLedger:
    """Repository of the per-customer ledger (a compliance store's two customer tables)."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def record(self, spend: SpendCustomers) -> None:
        """Store which customers a spend included and raise their totals, in one transaction.

        Raises:
            CumulativeEpsilonDecrease: A customer's new total is below the stored one.
            LedgerError: The spend is already recorded.
        """
        with transaction(self._factory) as session:
            known = session.execute(
                select(CustomerSpend.id)
                .where(
                    CustomerSpend.branch == spend.branch,
                    CustomerSpend.model == spend.model,
                    CustomerSpend.purpose == spend.purpose,
                    CustomerSpend.spend_id == spend.spend_id,
                )
                .limit(1)
            ).first()
            if known:
                raise LedgerError(f"spend {spend.spend_id} is already in the customer ledger")
            now = utcnow()
            totals = {
                row.customer: row
                for row in session.execute(
                    select(CustomerPrivacy)
                    .where(
                        CustomerPrivacy.branch == spend.branch,
                        CustomerPrivacy.model == spend.model,
                        CustomerPrivacy.purpose == spend.purpose,
                    )
                    .with_for_update()
                ).scalars()
            }
            for customer, epsilon in spend.epsilons.items():
                session.add(
                    CustomerSpend(
                        branch=spend.branch,
                        customer=customer,
                        model=spend.model,
                        purpose=spend.purpose,
                        spend_id=spend.spend_id,
                        run_id=spend.run_id,
                        round=spend.round,
                        recorded_at=now,
                    )
                )
                total = totals.get(customer)
                if total is None:
                    session.add(
                        CustomerPrivacy(
                            branch=spend.branch,
                            customer=customer,
                            model=spend.model,
                            purpose=spend.purpose,
                            cumulative_epsilon=float(epsilon),
                            delta=spend.delta,
                            privacy_unit=spend.privacy_unit,
                            accountant=spend.accountant,
                            spends=1,
                            updated_at=now,
                        )
                    )
                    continue
                if epsilon < total.cumulative_epsilon:
                    raise CumulativeEpsilonDecrease(
                        branch=f"{spend.branch}/{customer}",
                        model=spend.model,
                        purpose=spend.purpose,
                        current=total.cumulative_epsilon,
                        proposed=float(epsilon),
                    )
                total.cumulative_epsilon = float(epsilon)
                total.delta = spend.delta
                total.spends += 1
                total.updated_at = now

    def spends_by_customer(self, branch: str, model: str, purpose: str) -> dict[str, set[str]]:
        """Every customer of (branch, model, purpose) and the ids of the spends that had them."""
        query = select(CustomerSpend.customer, CustomerSpend.spend_id).where(
            CustomerSpend.branch == branch,
            CustomerSpend.model == model,
            CustomerSpend.purpose == purpose,
        )
        out: dict[str, set[str]] = {}
        with self._factory() as session:
            for customer, spend_id in session.execute(query):
                out.setdefault(customer, set()).add(spend_id)
        return out

    def recorded_spends(self, branch: str, model: str, purpose: str) -> set[str]:
        """The ids of every spend whose customers are recorded."""
        query = (
            select(CustomerSpend.spend_id)
            .where(
                CustomerSpend.branch == branch,
                CustomerSpend.model == model,
                CustomerSpend.purpose == purpose,
            )
            .distinct()
        )
        with self._factory() as session:
            return set(session.execute(query).scalars())

    def customer(self, customer: str, *, branch: str | None = None) -> list[CustomerTotal]:
        """A customer's cumulative ε per (branch, model, purpose)."""
        return self.totals(customer=customer, branch=branch)

    def totals(
        self, *, customer: str | None = None, branch: str | None = None
    ) -> list[CustomerTotal]:
        """Every customer's cumulative ε (optionally one customer's, one branch's)."""
        query = (
            select(CustomerPrivacy)
            .where(
                *equalities((CustomerPrivacy.customer, customer), (CustomerPrivacy.branch, branch))
            )
            .order_by(
                CustomerPrivacy.branch,
                CustomerPrivacy.model,
                CustomerPrivacy.purpose,
                CustomerPrivacy.customer,
            )
        )
        with self._factory() as session:
            return [
                CustomerTotal(
                    row.branch,
                    row.customer,
                    row.model,
                    row.purpose,
                    row.cumulative_epsilon,
                    row.delta,
                    row.privacy_unit,
                    row.accountant,
                    row.spends,
                    row.updated_at,
                )
                for row in session.execute(query).scalars()
            ]
