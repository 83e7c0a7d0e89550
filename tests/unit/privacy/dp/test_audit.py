"""The one-run audit (arXiv:2305.08846): its tail bound, its ε search, guessing and the gate."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

import fedcrm.privacy
from fedcrm.privacy.dp import (
    AccountingError,
    EmpiricalAudit,
    EmpiricalPrivacyViolation,
    check_release,
    one_run_audit,
    one_run_epsilon_bound,
    one_run_p_value,
)

M = 1000


def paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's Appendix D ``p_value_DP_audit``, loop for loop, on scipy's binomial."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha = total = 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return float(min(beta + alpha * delta * 2 * m, 1.0))


def reference_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The ε where the paper's p-value crosses β, by scipy's root finder."""
    return float(optimize.brentq(lambda e: paper_p_value(m, r, v, e, delta) - beta, 0.0, 50.0))


def coins(seed: int, m: int = M) -> np.ndarray:
    return np.random.default_rng(seed).random(m) < 0.5


def perfect_scores(included: np.ndarray, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(scale=0.01, size=included.size)
    return included.astype(np.float64) + noise


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"seed{s}")
def test_scores_independent_of_inclusion_give_no_bound(seed: int) -> None:
    included = coins(seed)
    scores = np.random.default_rng(100 + seed).normal(size=M)
    audit = one_run_audit(scores, included, k_plus=100, k_minus=100, delta=1e-5)
    assert audit.epsilon_lower_bound < 0.2
    assert 70 <= audit.correct <= 130  # about half of the 200 guesses


def test_equal_scores_do_not_leak_the_order_of_the_canaries() -> None:
    # Canaries listed included-first: breaking ties by position would guess perfectly.
    included = np.sort(coins(0))[::-1]
    audit = one_run_audit(np.zeros(M), included, k_plus=100, k_minus=100, delta=1e-5)
    assert audit.epsilon_lower_bound < 0.2


def test_perfect_guesses_match_the_closed_form_tail() -> None:
    # δ = 0: P[Binomial(200, q) >= 200] = q^200 = 0.05, so ε = logit(0.05^(1/200)) ≈ 4.1936.
    included = coins(3)
    audit = one_run_audit(perfect_scores(included), included, k_plus=100, k_minus=100, delta=0.0)
    assert audit.correct == audit.guesses == 200
    q = 0.05 ** (1 / 200)
    assert audit.epsilon_lower_bound == pytest.approx(math.log(q / (1 - q)), abs=1e-4)
    assert audit.epsilon_lower_bound == pytest.approx(4.1936, abs=1e-4)
    assert stats.binom.sf(199, 200, 1 / (1 + math.exp(-audit.epsilon_lower_bound))) <= 0.05


def test_perfect_guesses_with_delta_match_the_papers_p_value() -> None:
    included = coins(4)
    audit = one_run_audit(perfect_scores(included), included, k_plus=100, k_minus=100, delta=1e-5)
    expected = reference_bound(M, 200, 200, 1e-5)
    assert audit.epsilon_lower_bound == pytest.approx(expected, abs=1e-4)
    assert 4.1 < audit.epsilon_lower_bound < 4.1936  # δ > 0 only lowers the bound
    assert audit.p_value(audit.epsilon_lower_bound) <= 0.05 < audit.p_value(expected + 1e-3)


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "printed"),
    [
        (1000, 100, 75, 1e-4, 0.673),  # arXiv:2305.08846v1, App. D example
        (100_000, 1510, 1439, 1e-5, 2.675),  # arXiv:2305.08846v1, Sec. 7 (Fig. 11)
    ],
    ids=["appendix-d", "section-7"],
)
def test_bound_reproduces_figures_printed_in_the_paper(
    m: int, r: int, v: int, delta: float, printed: float
) -> None:
    bound = one_run_epsilon_bound(m=m, guesses=r, correct=v, delta=delta)
    assert bound == pytest.approx(printed, abs=1e-3)
    assert bound == pytest.approx(reference_bound(m, r, v, delta), abs=1e-5)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(1000, 200, 150, 1.0, 1e-5), (500, 80, 60, 0.5, 1e-3), (50, 50, 45, 3.0, 0.01)],
    ids=["m1000", "m500", "m50"],
)
def test_p_value_matches_the_papers_code(m: int, r: int, v: int, eps: float, delta: float) -> None:
    got = one_run_p_value(m=m, guesses=r, correct=v, epsilon=eps, delta=delta)
    assert got == pytest.approx(paper_p_value(m, r, v, eps, delta), rel=1e-9)


def test_pure_dp_p_value_at_zero_epsilon_is_a_fair_coin_tail() -> None:
    got = one_run_p_value(m=M, guesses=200, correct=115, epsilon=0.0, delta=0.0)
    assert got == pytest.approx(stats.binom.sf(114, 200, 0.5), rel=1e-9)


def test_bound_grows_with_correct_guesses() -> None:
    bounds = [one_run_epsilon_bound(m=M, guesses=200, correct=v, delta=1e-5) for v in range(201)]
    assert bounds == sorted(bounds)
    assert bounds[100] == 0.0 < bounds[150] < bounds[180] < bounds[200]


@settings(max_examples=30, deadline=None)
@given(
    r=st.integers(min_value=1, max_value=300),
    fractions=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)),
    delta=st.sampled_from([0.0, 1e-6, 1e-4]),
)
def test_more_correct_guesses_never_lower_the_bound(
    r: int, fractions: tuple[float, float], delta: float
) -> None:
    low, high = sorted(round(f * r) for f in fractions)
    bound_low = one_run_epsilon_bound(m=M, guesses=r, correct=low, delta=delta)
    bound_high = one_run_epsilon_bound(m=M, guesses=r, correct=high, delta=delta)
    assert bound_low <= bound_high + 1e-5


def test_audit_bound_grows_as_more_guesses_are_right() -> None:
    included = coins(5)
    inside, outside = np.flatnonzero(included), np.flatnonzero(~included)
    bounds = []
    for wrong in (100, 60, 30, 10, 0):
        a, b = wrong // 2, wrong - wrong // 2  # wrong positive and wrong negative guesses
        scores = np.zeros(M)  # abstentions in the middle of the ranking
        scores[np.r_[inside[: 100 - a], outside[:a]]] = 1.0
        scores[np.r_[outside[a : a + 100 - b], inside[100 - a : 100 - a + b]]] = -1.0
        audit = one_run_audit(scores, included, k_plus=100, k_minus=100, delta=1e-5)
        assert audit.correct == 200 - wrong
        bounds.append(audit.epsilon_lower_bound)
    assert bounds == sorted(bounds)
    assert bounds[0] == 0.0 < bounds[1] < bounds[-1]


def test_release_is_blocked_when_the_bound_exceeds_the_claim() -> None:
    included = coins(6)
    audit = one_run_audit(perfect_scores(included), included, k_plus=100, k_minus=100, delta=1e-5)
    with pytest.raises(EmpiricalPrivacyViolation, match="rejects") as caught:
        check_release(1.0, audit)
    assert isinstance(caught.value, AccountingError)
    assert caught.value.audit is audit
    assert caught.value.claimed_epsilon == 1.0
    assert audit.p_value(1.0) <= 0.05


@pytest.mark.parametrize("claim", [4.2, 8.0, math.inf], ids=["just-above", "eps8", "no-dp"])
def test_release_passes_when_the_claim_is_at_least_the_bound(claim: float) -> None:
    included = coins(7)
    audit = one_run_audit(perfect_scores(included), included, k_plus=100, k_minus=100, delta=1e-5)
    check_release(claim, audit)
    check_release(claim, audit, claimed_delta=1e-5)


def test_release_refuses_an_audit_at_a_smaller_delta_than_claimed() -> None:
    included = coins(8)
    audit = one_run_audit(perfect_scores(included), included, k_plus=10, k_minus=10, delta=1e-6)
    with pytest.raises(AccountingError, match="below the claimed delta"):
        check_release(8.0, audit, claimed_delta=1e-5)


@pytest.mark.parametrize("claim", [-1.0, math.nan, True], ids=["negative", "nan", "bool"])
def test_release_refuses_a_meaningless_claim(claim: float) -> None:
    audit = EmpiricalAudit(
        m=10, k_plus=1, k_minus=1, correct=1, epsilon_lower_bound=0.0, confidence=0.95, delta=0.0
    )
    with pytest.raises(AccountingError, match="claimed_epsilon"):
        check_release(claim, audit)


@pytest.mark.parametrize(
    ("scores", "included", "kwargs", "message"),
    [
        (np.zeros(10), np.ones(10, bool), {"k_plus": 6, "k_minus": 5}, "k_plus \\+ k_minus"),
        (np.zeros(10), np.ones(10, bool), {"k_plus": 0, "k_minus": 0}, "k_plus \\+ k_minus"),
        (np.zeros(10), np.ones(9, bool), {}, "same length"),
        (np.r_[np.zeros(9), np.nan], np.ones(10, bool), {}, "finite"),
        (np.r_[np.zeros(9), np.inf], np.ones(10, bool), {}, "finite"),
        (np.array(["a"] * 10), np.ones(10, bool), {}, "real numbers"),
        (np.zeros(10), np.full(10, 2), {}, "booleans"),
        (np.zeros((2, 5)), np.ones((2, 5), bool), {}, "1-D"),
        (np.zeros(0), np.ones(0, bool), {}, "non-empty"),
        (np.zeros(10), np.ones(10, bool), {"k_plus": -1}, "k_plus"),
        (np.zeros(10), np.ones(10, bool), {"k_plus": 1.5}, "k_plus"),
        (np.zeros(10), np.ones(10, bool), {"delta": 1.0}, "delta"),
        (np.zeros(10), np.ones(10, bool), {"delta": -1e-9}, "delta"),
        (np.zeros(10), np.ones(10, bool), {"confidence": 1.0}, "confidence"),
        (np.zeros(10), np.ones(10, bool), {"confidence": 0.0}, "confidence"),
    ],
    ids=[
        "too-many-guesses",
        "no-guess",
        "lengths",
        "nan-score",
        "inf-score",
        "text-score",
        "non-boolean-inclusion",
        "two-d",
        "empty",
        "negative-k",
        "float-k",
        "delta-one",
        "negative-delta",
        "confidence-one",
        "confidence-zero",
    ],
)
def test_bad_inputs_are_refused(
    scores: np.ndarray, included: np.ndarray, kwargs: dict[str, float], message: str
) -> None:
    arguments: dict[str, float] = {"k_plus": 2, "k_minus": 2, "delta": 1e-5, **kwargs}
    with pytest.raises(AccountingError, match=message):
        one_run_audit(scores, included, **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "counts",
    [
        {"guesses": 11, "correct": 0},
        {"guesses": 5, "correct": 6},
        {"guesses": -1, "correct": 0},
    ],
    ids=["guesses-above-m", "correct-above-guesses", "negative"],
)
def test_p_value_refuses_impossible_counts(counts: dict[str, int]) -> None:
    with pytest.raises(AccountingError):
        one_run_p_value(m=10, epsilon=1.0, delta=0.0, **counts)


@pytest.mark.parametrize("epsilon", [-0.1, math.inf, math.nan], ids=["negative", "inf", "nan"])
def test_p_value_refuses_a_bad_epsilon(epsilon: float) -> None:
    with pytest.raises(AccountingError, match="epsilon"):
        one_run_p_value(m=10, guesses=4, correct=3, epsilon=epsilon, delta=0.0)


def test_audit_record_refuses_inconsistent_figures() -> None:
    with pytest.raises(AccountingError, match="correct"):
        EmpiricalAudit(
            m=10, k_plus=2, k_minus=2, correct=5, epsilon_lower_bound=0.0, confidence=0.95, delta=0
        )
    with pytest.raises(AccountingError, match="epsilon_lower_bound"):
        EmpiricalAudit(
            m=10, k_plus=2, k_minus=2, correct=4, epsilon_lower_bound=-1, confidence=0.95, delta=0
        )


def test_no_correct_guess_has_p_value_one() -> None:
    assert one_run_p_value(m=M, guesses=100, correct=0, epsilon=5.0, delta=1e-5) == 1.0
    assert one_run_epsilon_bound(m=M, guesses=100, correct=0, delta=1e-5) == 0.0


def test_the_audit_is_exported_by_fedcrm_privacy() -> None:
    assert fedcrm.privacy.one_run_audit is one_run_audit
    assert fedcrm.privacy.check_release is check_release
    assert fedcrm.privacy.EmpiricalAudit is EmpiricalAudit
    assert fedcrm.privacy.EmpiricalPrivacyViolation is EmpiricalPrivacyViolation
