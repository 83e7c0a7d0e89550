"""One-run empirical privacy audit: a statistical lower bound on ε from canaries in one training.

Implementation based on Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1)
Training Run" (arXiv:2305.08846). m canaries are each put into the training data with
probability 1/2; after one training run an auditor guesses "in" for the k+ canaries it scores
highest and "out" for the k- it scores lowest. Under (ε, δ)-DP, many correct guesses are
unlikely; the audit returns the largest ε it can reject at the given confidence. Pure NumPy;
see docs/privacy-analysis.md for what such a bound shows and what it does not.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedcrm.privacy.dp._errors import AccountingError, EmpiricalPrivacyViolation

_BISECTION_TOLERANCE = 1e-6
_MAX_EPSILON = 1e4


def _count(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise AccountingError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _audit_delta(delta: object) -> float:
    if isinstance(delta, bool) or not (isinstance(delta, int | float) and 0.0 <= delta < 1.0):
        raise AccountingError(f"delta must satisfy 0 <= delta < 1, got {delta!r}")
    return float(delta)


def _confidence(confidence: object) -> float:
    if isinstance(confidence, bool) or not (
        isinstance(confidence, int | float) and 0.0 < confidence < 1.0
    ):
        raise AccountingError(f"confidence must satisfy 0 < confidence < 1, got {confidence!r}")
    return float(confidence)


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise AccountingError(
            f"need 0 <= correct <= guesses <= m, got correct={correct}, guesses={guesses}, m={m}"
        )


def _binomial_pmf(trials: int, log_q: float, log_1mq: float) -> npt.NDArray[np.float64]:
    """P[Binomial(trials, q) = k] for k = 0..trials, computed in log space."""
    k = np.arange(trials + 1, dtype=np.float64)
    log_factorial = np.array([math.lgamma(i + 1.0) for i in range(trials + 1)])
    log_choose = log_factorial[-1] - log_factorial - log_factorial[::-1]
    pmf: npt.NDArray[np.float64] = np.exp(log_choose + k * log_q + (trials - k) * log_1mq)
    return pmf


def one_run_p_value(*, m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Return the p-value of ``correct`` right guesses out of ``guesses`` under (ε, δ)-DP.

    With q = e^ε / (1 + e^ε) and f(v) = P[Binomial(r, q) >= v] for r = ``guesses``, this is

        p = min(1, f(v) + 2·m·δ · max_{1 <= i <= v} (f(v - i) - f(v)) / i)

    for v = ``correct``. The first term is Theorem 3.1 of arXiv:2305.08846 (under ε-DP the
    number W of right guesses satisfies P[W >= v] <= f(v)); the second is the approximate-DP
    correction of its Section 5 (Theorem 5.2 and the corollary after it, numbered as in arXiv
    v1), in the closed form that the paper's Appendix D code (``p_value_DP_audit``) evaluates.
    With δ = 0 it is the pure-ε bound f(v).

    Args:
        m: Number of canaries (each included independently with probability 1/2).
        guesses: r = k+ + k-, the canaries guessed (the others are abstentions).
        correct: v, the guesses that were right.
        epsilon: ε >= 0 of the null hypothesis.
        delta: δ of the null hypothesis, 0 <= δ < 1.

    Returns:
        A bound on the probability of at least ``correct`` right guesses under (ε, δ)-DP.

    Raises:
        AccountingError: A count or parameter is out of range.
    """
    m = _count("m", m, minimum=1)
    guesses = _count("guesses", guesses, minimum=0)
    correct = _count("correct", correct, minimum=0)
    _check_counts(m, guesses, correct)
    delta = _audit_delta(delta)
    if isinstance(epsilon, bool) or not (
        isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon >= 0
    ):
        raise AccountingError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if correct == 0:
        return 1.0
    log_q = -math.log1p(math.exp(-epsilon))  # log of e^ε / (1 + e^ε), stable for large ε
    pmf = _binomial_pmf(guesses, log_q, log_q - epsilon)
    tail = float(np.sum(pmf[correct:]))  # f(v)
    if delta == 0.0:
        return min(1.0, tail)
    # (f(v - i) - f(v)) = P[v - i <= Binomial < v], for i = 1..v (larger i only lowers the ratio).
    window = np.cumsum(pmf[correct - 1 :: -1])
    alpha = float(np.max(window / np.arange(1, correct + 1)))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def one_run_epsilon_bound(
    *, m: int, guesses: int, correct: int, delta: float, confidence: float = 0.95
) -> float:
    """Return the largest ε at which ``correct`` right guesses has p-value <= 1 - confidence.

    The search of the paper's Appendix D (``get_eps_audit``): bracket, then bisect, keeping as
    the answer only an ε whose p-value (:func:`one_run_p_value`) was computed to be <= β =
    1 - confidence, so the answer errs low. Any such ε is a valid lower bound: a mechanism that
    is (ε*, δ)-DP is also (ε, δ)-DP for every ε >= ε*; the smallest count v0 rejected at some
    such ε has P[W >= v0] <= β there, and every count rejected at any ε >= ε* is >= v0, so the
    audit wrongly exceeds ε* with probability at most β.

    Args:
        m: Number of canaries.
        guesses: k+ + k-.
        correct: Right guesses.
        delta: δ of the null hypothesis, 0 <= δ < 1.
        confidence: 1 - β, e.g. 0.95.

    Returns:
        The lower bound on ε (0.0 when even ε = 0 is not rejected).

    Raises:
        AccountingError: A count or parameter is out of range.
    """
    beta = 1.0 - _confidence(confidence)

    def rejected(epsilon: float) -> bool:
        p = one_run_p_value(m=m, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta)
        return p <= beta

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # p -> 1 as ε grows (q -> 1), so this stops
        low, high = high, 2.0 * high
        if high > _MAX_EPSILON:  # pragma: no cover - unreachable for correct <= guesses
            raise AccountingError(f"no epsilon up to {_MAX_EPSILON:g} is accepted")
    while high - low > _BISECTION_TOLERANCE * max(1.0, low):
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True, slots=True, kw_only=True)
class EmpiricalAudit:
    """The outcome of a one-run audit (arXiv:2305.08846).

    Attributes:
        m: Canaries, each included independently with probability 1/2.
        k_plus: Canaries guessed "included" (the highest scores).
        k_minus: Canaries guessed "excluded" (the lowest scores).
        correct: Guesses that were right.
        epsilon_lower_bound: ε that (ε, ``delta``)-DP is rejected up to, at ``confidence``.
        confidence: 1 - β of the test (e.g. 0.95).
        delta: δ of the null hypothesis (normally the claim's δ).

    Raises:
        AccountingError: The figures are inconsistent.
    """

    m: int
    k_plus: int
    k_minus: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    delta: float

    def __post_init__(self) -> None:
        m = _count("m", self.m, minimum=1)
        _count("k_plus", self.k_plus, minimum=0)
        _count("k_minus", self.k_minus, minimum=0)
        _check_counts(m, self.guesses, _count("correct", self.correct, minimum=0))
        bound = self.epsilon_lower_bound
        if isinstance(bound, bool) or not (
            isinstance(bound, int | float) and math.isfinite(bound) and bound >= 0
        ):
            raise AccountingError(f"epsilon_lower_bound must be finite and >= 0, got {bound!r}")
        _confidence(self.confidence)
        _audit_delta(self.delta)

    @property
    def guesses(self) -> int:
        """The number of canaries guessed, r = k+ + k- (the rest are abstentions)."""
        return self.k_plus + self.k_minus

    def p_value(self, epsilon: float) -> float:
        """The p-value of the observed guesses under (``epsilon``, ``delta``)-DP."""
        return one_run_p_value(
            m=self.m,
            guesses=self.guesses,
            correct=self.correct,
            epsilon=epsilon,
            delta=self.delta,
        )


def _vector(name: str, values: Sequence[float] | npt.ArrayLike) -> npt.NDArray[np.generic]:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise AccountingError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    return array


def one_run_audit(
    scores: Sequence[float] | npt.ArrayLike,
    included: Sequence[bool] | npt.ArrayLike,
    *,
    k_plus: int,
    k_minus: int,
    delta: float,
    confidence: float = 0.95,
    seed: int = 0,
) -> EmpiricalAudit:
    """Guess each canary's membership from its score and bound ε from the correct guesses.

    Canaries are ranked by score (higher: more likely included); the top ``k_plus`` are guessed
    included, the bottom ``k_minus`` excluded, the rest abstained on. The number v of right
    guesses among r = k+ + k- gives the bound of :func:`one_run_epsilon_bound`: Theorem 3.1
    of arXiv:2305.08846 with its Section 5 / Appendix D correction for δ > 0.

    Args:
        scores: One finite score per canary, computed from the released output only (e.g.
            minus the canary's loss under the trained model).
        included: Whether each canary was in the training data; each must have been an
            independent fair coin, drawn before training.
        k_plus: Positive guesses, >= 0.
        k_minus: Negative guesses, >= 0; ``k_plus + k_minus`` must be in 1..m.
        delta: δ of the null hypothesis, 0 <= δ < 1: the claim's δ, to test the claim.
        confidence: 1 - β, e.g. 0.95.
        seed: Seed of the random order that breaks ties between equal scores.

    Returns:
        The counts and the lower bound.

    Raises:
        AccountingError: Lengths differ, a score is not finite, ``included`` is not boolean,
            or a count or parameter is out of range.

    Notes:
        The bound is valid only if the inclusions are fair coins independent of everything
        else, the scores depend on the output alone and k+ and k- were fixed before looking at
        the inclusions. Trying several (k+, k-) and keeping the best needs a union bound (run
        each at confidence 1 - β / tries). Ties are broken by a seeded random permutation, not
        by position, since canaries listed in an order that depends on inclusion would otherwise
        make equal scores look like perfect guesses.
    """
    raw_score = _vector("scores", scores)
    raw_member = _vector("included", included)
    if raw_score.shape != raw_member.shape:
        raise AccountingError(
            "scores and included must have the same length, "
            f"got {raw_score.size} and {raw_member.size}"
        )
    kind = raw_score.dtype
    if not np.issubdtype(kind, np.number) or np.issubdtype(kind, np.complexfloating):
        raise AccountingError(f"scores must be real numbers, got dtype {kind}")
    score: npt.NDArray[np.float64] = raw_score.astype(np.float64)
    if not np.all(np.isfinite(score)):
        bad = int(np.count_nonzero(~np.isfinite(score)))
        raise AccountingError(f"scores must be finite; {bad} of {score.size} are NaN or infinite")
    if raw_member.dtype != np.bool_ and not (
        np.issubdtype(raw_member.dtype, np.integer) and np.isin(raw_member, (0, 1)).all()
    ):
        raise AccountingError(f"included must be booleans (or 0/1), got dtype {raw_member.dtype}")
    member: npt.NDArray[np.bool_] = raw_member.astype(np.bool_)
    m = int(score.size)
    k_plus = _count("k_plus", k_plus, minimum=0)
    k_minus = _count("k_minus", k_minus, minimum=0)
    if not 1 <= k_plus + k_minus <= m:
        raise AccountingError(
            f"k_plus + k_minus must be in 1..m = 1..{m}, got {k_plus} + {k_minus}"
        )
    delta = _audit_delta(delta)
    confidence = _confidence(confidence)
    shuffle = np.random.default_rng(seed).permutation(m)
    order = shuffle[np.argsort(-score[shuffle], kind="stable")]  # highest score first
    correct = int(np.count_nonzero(member[order[:k_plus]])) + int(
        np.count_nonzero(~member[order[m - k_minus :]])
    )
    bound = one_run_epsilon_bound(
        m=m, guesses=k_plus + k_minus, correct=correct, delta=delta, confidence=confidence
    )
    return EmpiricalAudit(
        m=m,
        k_plus=k_plus,
        k_minus=k_minus,
        correct=correct,
        epsilon_lower_bound=bound,
        confidence=confidence,
        delta=delta,
    )


def check_release(
    claimed_epsilon: float, audit: EmpiricalAudit, *, claimed_delta: float | None = None
) -> None:
    """Block a release whose audited lower bound on ε exceeds the claimed ε.

    A lower bound above the claim means the claim is false (with the audit's confidence): a
    bug in the implementation, the accounting or the privacy unit. A bound below the claim
    proves nothing: one-run, black-box audits are usually far from tight.

    Args:
        claimed_epsilon: The ε the release states (``inf`` for a non-private model).
        audit: The audit of the trained model.
        claimed_delta: The δ the release states; when given, an audit run at a smaller δ
            is refused (its null hypothesis is not implied by the claim).

    Raises:
        EmpiricalPrivacyViolation: ``audit.epsilon_lower_bound > claimed_epsilon``.
        AccountingError: ``claimed_epsilon`` is not a number >= 0, or the audit's δ is below
            ``claimed_delta``.
    """
    if isinstance(claimed_epsilon, bool) or not (
        isinstance(claimed_epsilon, int | float) and claimed_epsilon >= 0
    ):
        raise AccountingError(f"claimed_epsilon must be a number >= 0, got {claimed_epsilon!r}")
    if claimed_delta is not None and audit.delta < claimed_delta:
        raise AccountingError(
            f"the audit tested delta {audit.delta:g}, below the claimed delta {claimed_delta:g}: "
            "rerun it at the claim's delta"
        )
    if audit.epsilon_lower_bound > claimed_epsilon:
        raise EmpiricalPrivacyViolation(claimed_epsilon, audit)
