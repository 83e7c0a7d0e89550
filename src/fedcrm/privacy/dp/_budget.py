"""Privacy budgets: the admit/refuse decision taken before every local round.

Pure functions and dataclasses: the decision compares the ε a branch has spent, and the ε it
would have spent after the proposed round, with its budget (the figures come from
:class:`fedcrm.privacy.dp.BranchAccountant`). A refusal is a value, not an exception: the
client turns it into a structured reply (no exceptions across the network boundary); code
that must not continue calls :meth:`BudgetDecision.raise_if_refused`.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from fedcrm.exceptions import FedCrmError

Decision = Literal["admitted", "refused"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetDecision:
    """The outcome of a budget check for one proposed round.

    Attributes:
        decision: ``"admitted"`` or ``"refused"``.
        current_epsilon: ε the branch has spent before the round.
        projected_epsilon: ε it would have spent after the round.
        budget: The maximum ε allowed.
        delta: δ at which both ε figures are stated.
        accountant: Accountant that computed them (``"rdp"`` or ``"prv"``).
        reason: Human-readable explanation, fit for a ledger entry or an error reply.
    """

    decision: Decision
    current_epsilon: float
    projected_epsilon: float
    budget: float
    delta: float
    accountant: str
    reason: str

    @property
    def admitted(self) -> bool:
        """Whether the round may run."""
        return self.decision == "admitted"

    @property
    def round_epsilon(self) -> float:
        """ε the proposed round adds (projected minus current)."""
        return self.projected_epsilon - self.current_epsilon

    def raise_if_refused(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` when the round was refused.

        Raises:
            PrivacyBudgetExceeded: The decision is ``"refused"``.
        """
        if not self.admitted:
            raise PrivacyBudgetExceeded(self)


class PrivacyBudgetExceeded(FedCrmError):
    """A round was refused because it would push ε past the branch's budget.

    Args:
        decision: The refusal, with projected ε, budget and reason.
    """

    def __init__(self, decision: BudgetDecision) -> None:
        self.decision = decision
        super().__init__(decision.reason)


def decide(
    *,
    current_epsilon: float,
    projected_epsilon: float,
    budget: float,
    delta: float,
    accountant: str,
) -> BudgetDecision:
    """Admit a round only if the projected cumulative ε stays within the budget.

    A round is refused when the projected ε is above the budget, or is not a finite number (an
    accountant that cannot bound the loss must not be read as "no loss").

    Args:
        current_epsilon: ε spent so far.
        projected_epsilon: ε after the proposed round.
        budget: Maximum ε, > 0.
        delta: δ of both figures.
        accountant: Name of the accountant that produced them.

    Returns:
        The structured decision.

    Raises:
        ValueError: ``budget`` is not a finite number > 0.
    """
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    figures = f"(accountant {accountant}, delta {delta:g})"
    decision: Decision
    if not math.isfinite(projected_epsilon):
        decision = "refused"
        reason = f"refused: the accountant gives no finite epsilon for this round {figures}"
    elif projected_epsilon > budget:
        decision = "refused"
        reason = (
            f"refused: cumulative epsilon would reach {projected_epsilon:.4f}, above the "
            f"budget {budget:.4f} (spent so far {current_epsilon:.4f}) {figures}"
        )
    else:
        decision = "admitted"
        reason = (
            f"admitted: cumulative epsilon {current_epsilon:.4f} -> {projected_epsilon:.4f} "
            f"within budget {budget:.4f} {figures}"
        )
    return BudgetDecision(
        decision=decision,
        current_epsilon=current_epsilon,
        projected_epsilon=projected_epsilon,
        budget=budget,
        delta=delta,
        accountant=accountant,
        reason=reason,
    )


@dataclass(frozen=True, slots=True)
class BudgetPolicy:
    """Maximum ε per model and purpose on one branch.

    Args:
        default: Budget for any (model, purpose) not listed; ``None`` means "must be listed".
        limits: ``{(model, purpose): max_epsilon}``.

    Raises:
        ValueError: A budget is not a finite number > 0.
    """

    default: float | None = None
    limits: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = list(self.limits.values())
        if self.default is not None:
            values.append(self.default)
        for value in values:
            if isinstance(value, bool) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"every budget must be a finite number > 0, got {value!r}")
        object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))

    def limit_for(self, *, model: str, purpose: str) -> float:
        """Return the budget of one model and purpose.

        Raises:
            KeyError: No budget is set for the pair and there is no default.
        """
        limit = self.limits.get((model, purpose), self.default)
        if limit is None:
            raise KeyError(f"no privacy budget set for model {model!r} and purpose {purpose!r}")
        return limit
