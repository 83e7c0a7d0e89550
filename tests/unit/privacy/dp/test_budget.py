"""Budget decisions and policies (pure, no accountant)."""

import math

import pytest

from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.dp import BudgetPolicy, PrivacyBudgetExceeded, decide


def test_round_within_budget_is_admitted() -> None:
    decision = decide(
        current_epsilon=1.0, projected_epsilon=2.5, budget=3.0, delta=1e-5, accountant="rdp"
    )
    assert decision.admitted
    assert decision.decision == "admitted"
    assert decision.round_epsilon == pytest.approx(1.5)
    decision.raise_if_refused()


def test_round_past_budget_is_refused_with_reason() -> None:
    decision = decide(
        current_epsilon=2.9, projected_epsilon=3.2, budget=3.0, delta=1e-5, accountant="prv"
    )
    assert not decision.admitted
    assert "3.2000" in decision.reason and "3.0000" in decision.reason
    with pytest.raises(PrivacyBudgetExceeded) as info:
        decision.raise_if_refused()
    assert info.value.decision is decision
    assert isinstance(info.value, FedCrmError)


def test_exactly_at_budget_is_admitted_and_non_finite_is_refused() -> None:
    at = decide(current_epsilon=0, projected_epsilon=3.0, budget=3.0, delta=1e-5, accountant="rdp")
    assert at.admitted
    nan = decide(
        current_epsilon=0, projected_epsilon=math.inf, budget=3.0, delta=1e-5, accountant="rdp"
    )
    assert not nan.admitted
    assert "no finite epsilon" in nan.reason


@pytest.mark.parametrize("budget", [0.0, -1.0, math.inf, math.nan])
def test_invalid_budget_is_an_error(budget: float) -> None:
    with pytest.raises(ValueError, match="budget must be a finite number > 0"):
        decide(current_epsilon=0, projected_epsilon=1, budget=budget, delta=1e-5, accountant="rdp")


def test_policy_per_model_and_purpose() -> None:
    policy = BudgetPolicy(default=8.0, limits={("churn", "retention"): 3.0})
    assert policy.limit_for(model="churn", purpose="retention") == 3.0
    assert policy.limit_for(model="recommender", purpose="marketing") == 8.0
    strict = BudgetPolicy(limits={("churn", "retention"): 3.0})
    with pytest.raises(KeyError, match="no privacy budget"):
        strict.limit_for(model="churn", purpose="marketing")
    with pytest.raises(ValueError, match="finite number > 0"):
        BudgetPolicy(default=0.0)
