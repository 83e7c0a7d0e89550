"""Pure DP-SGD analysis: ε of a history of events, noise planning, recomputation.

Keyword-only functions over plain values (as Opacus's ``accountants/analysis``); the stateful,
persistent accountant is :class:`fedcrm.privacy.dp.BranchAccountant`. ε itself comes from
Opacus's RDP or PRV accountant through the adapter. See docs/privacy-analysis.md#accounting.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from fedcrm.privacy.dp._config import ACCOUNTANTS, AccountantName, DPSGDConfig
from fedcrm.privacy.dp._errors import AccountingError, NoiseCalibrationError
from fedcrm.privacy.dp._opacus import epsilon_of_history

MECHANISM: Final = "poisson-subsampled-gaussian"
"""The only mechanism DP-SGD uses, recorded with every history."""

MAX_NOISE_MULTIPLIER: Final = 1e4
MIN_NOISE_MULTIPLIER: Final = 1.0 / 64
RECOMPUTE_TOLERANCE: Final = 1e-6


def check_delta(delta: float) -> None:
    """Refuse a δ outside 0 < δ < 1.

    Raises:
        AccountingError: ``delta`` is out of range or not a number.
    """
    if isinstance(delta, bool) or not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise AccountingError(f"delta must satisfy 0 < delta < 1, got {delta!r}")


def check_accountant(accountant: str) -> None:
    """Refuse an unknown accountant name.

    Raises:
        AccountingError: ``accountant`` is not ``"rdp"`` or ``"prv"``.
    """
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


@dataclass(frozen=True, slots=True)
class AccountingEvent:
    """``steps`` DP-SGD steps with one noise multiplier and one Poisson sampling rate.

    Attributes:
        noise_multiplier: σ, the noise standard deviation divided by the clipping norm (> 0).
        sample_rate: q, the probability that a row is in a batch (0 < q <= 1).
        steps: Number of noisy steps taken (>= 1).

    Raises:
        AccountingError: A value is out of range.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if isinstance(sigma, bool) or not (
            isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0
        ):
            raise AccountingError(f"noise_multiplier must be a finite number > 0, got {sigma!r}")
        if isinstance(q, bool) or not (isinstance(q, int | float) and 0.0 < q <= 1.0):
            raise AccountingError(f"sample_rate must satisfy 0 < sample_rate <= 1, got {q!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise AccountingError(f"steps must be an integer >= 1, got {steps!r}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))

    def as_tuple(self) -> tuple[float, float, int]:
        """Return ``(noise_multiplier, sample_rate, steps)``, Opacus's history format."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def coalesce(events: Iterable[AccountingEvent]) -> list[AccountingEvent]:
    """Merge consecutive events with the same σ and q (composition only depends on the sum)."""
    merged: list[AccountingEvent] = []
    for event in events:
        if merged and merged[-1].as_tuple()[:2] == event.as_tuple()[:2]:
            last = merged.pop()
            event = AccountingEvent(
                last.noise_multiplier, last.sample_rate, last.steps + event.steps
            )
        merged.append(event)
    return merged


def compute_epsilon(
    events: Iterable[AccountingEvent], *, delta: float, accountant: AccountantName
) -> float:
    """Return ε of the composition of ``events`` at ``delta``.

    Consecutive events with the same σ and q are merged first, so a history kept round by round
    gives exactly the ε of the plan made for all rounds at once.

    Args:
        events: The history, oldest first.
        delta: δ, 0 < δ < 1.
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        ε (0.0 for an empty history; ``inf`` when the accountant gives no finite bound).

    Raises:
        AccountingError: ``delta`` or ``accountant`` is invalid, or the accountant failed.
    """
    check_delta(delta)
    check_accountant(accountant)
    return epsilon_of_history(
        [e.as_tuple() for e in coalesce(events)], delta=delta, accountant=accountant
    )


def poisson_sample_rate(*, batch_size: int, num_rows: int) -> float:
    """Return the Poisson sampling rate q = batch size / rows on the branch.

    Raises:
        AccountingError: ``batch_size`` or ``num_rows`` is not a positive integer, or the batch
            is larger than the data.
    """
    for name, value in (("batch_size", batch_size), ("num_rows", num_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AccountingError(f"{name} must be an integer >= 1, got {value!r}")
    if batch_size > num_rows:
        raise AccountingError(
            f"batch_size ({batch_size}) must not exceed the branch's rows ({num_rows})"
        )
    return batch_size / num_rows


def steps_per_epoch(sample_rate: float) -> int:
    """Return the number of Poisson-sampled batches in one epoch, ``int(1 / q)``.

    This is the number of batches Opacus's ``UniformWithReplacementSampler`` draws per epoch,
    and the number fedcrm's own Poisson loader draws.
    """
    AccountingEvent(1.0, sample_rate, 1)  # validates q
    return max(1, int(1.0 / sample_rate))


def plan_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: AccountantName = "rdp",
    rtol: float = 1e-3,
) -> float:
    """Plan σ once for the whole federation so that total ε after all rounds is <= the target.

    Bisection on σ, keeping as the answer only a σ whose ε was computed to be <= the target (so
    the plan never overshoots, whatever the tolerance). Follows Opacus's
    ``get_noise_multiplier``, but for ``rounds * steps_per_round`` steps and with the same ε
    function the branch accountant uses.

    Args:
        target_epsilon: ε after all planned rounds, > 0.
        delta: δ, 0 < δ < 1.
        sample_rate: Poisson sampling rate q, 0 < q <= 1.
        steps_per_round: DP-SGD steps per round (local epochs * :func:`steps_per_epoch`).
        rounds: Planned federated rounds.
        accountant: ``"rdp"`` (Mironov 2017) or ``"prv"`` (Gopi et al. 2021).
        rtol: Relative precision of σ.

    Returns:
        The smallest σ found (within ``rtol``) with ε <= ``target_epsilon``.

    Raises:
        AccountingError: An argument is out of range.
        NoiseCalibrationError: Even σ = 1e4 does not reach the target.

    Notes:
        σ is not searched below 1/64 (such a target ε gives essentially no protection); a
        target that large gets σ = 1/64, which still satisfies ε <= target.
    """
    if isinstance(target_epsilon, bool) or not (
        isinstance(target_epsilon, int | float)
        and math.isfinite(target_epsilon)
        and target_epsilon > 0
    ):
        raise AccountingError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    for name, value in (("steps_per_round", steps_per_round), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AccountingError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 < rtol < 1.0:
        raise AccountingError(f"rtol must satisfy 0 < rtol < 1, got {rtol!r}")
    total_steps = steps_per_round * rounds

    def epsilon(sigma: float) -> float:
        event = AccountingEvent(sigma, sample_rate, total_steps)
        return compute_epsilon([event], delta=delta, accountant=accountant)

    # Bracket: epsilon(low) > target >= epsilon(high); epsilon decreases as sigma grows.
    low, high = 0.0, 1.0
    if epsilon(high) > target_epsilon:
        while True:
            low, high = high, 2.0 * high
            if high > MAX_NOISE_MULTIPLIER:
                raise NoiseCalibrationError(
                    f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} reaches epsilon "
                    f"{target_epsilon} at delta {delta:g} for {rounds} rounds of "
                    f"{steps_per_round} steps at sample rate {sample_rate:g}; "
                    "raise the budget or train less"
                )
            if epsilon(high) <= target_epsilon:
                break
    else:
        while epsilon(high / 2.0) <= target_epsilon:
            high /= 2.0
            if high <= MIN_NOISE_MULTIPLIER:
                return high
        low = high / 2.0
    while high - low > rtol * high:
        mid = 0.5 * (low + high)
        if epsilon(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True, slots=True, kw_only=True)
class NoisePlan:
    """A branch's DP-SGD noise for the whole federation, fixed before the first round.

    With the run's :class:`DPSGDConfig` (clipping norm, budget, gradient mode), this is all a
    branch's DP round needs: :func:`plan_for_config` derives it from the branch's own rows.

    Attributes:
        noise_multiplier: σ for every round.
        sample_rate: Poisson rate q = batch size / branch rows.
        batch_size: Expected rows per step (the batch size of the branch's loader).
        local_epochs: Local epochs per round.
        steps_per_round: ``local_epochs * int(1/q)``; pass it as ``max_steps`` to
            ``make_private`` and as ``steps`` to ``would_exceed``.
        rounds: Planned rounds.
        planned_epsilon: ε after all planned rounds (<= the target when σ was planned).
        delta: δ of the branch's guarantee (1/(10n) unless the run sets it).
        accountant: Accountant that computed it.
    """

    noise_multiplier: float
    sample_rate: float
    batch_size: int
    local_epochs: int
    steps_per_round: int
    rounds: int
    planned_epsilon: float
    delta: float
    accountant: AccountantName


def plan_for_config(
    config: DPSGDConfig, *, num_rows: int, batch_size: int, local_epochs: int, rounds: int
) -> NoisePlan:
    """Plan σ once for a branch's whole federation from the run's :class:`DPSGDConfig`.

    The branch's own figures fix what the run config cannot: δ (1/(10n) unless configured), the
    Poisson rate q = batch size / rows and the steps per round. With ``config.noise_multiplier``
    set, that σ is kept and only its total ε is computed.

    Args:
        config: The run's DP-SGD settings.
        num_rows: The branch's DP-SGD rows (records, or customers).
        batch_size: Expected rows per step.
        local_epochs: Local epochs per round.
        rounds: Planned federated rounds.

    Raises:
        fedcrm.exceptions.ConfigError: The configured δ is not below the branch's 1/n.
        AccountingError: The batch is larger than the data, or a count is not >= 1.
        NoiseCalibrationError: The target ε cannot be reached.
    """
    delta = config.delta_for(num_rows)
    for name, value in (("local_epochs", local_epochs), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AccountingError(f"{name} must be an integer >= 1, got {value!r}")
    q = poisson_sample_rate(batch_size=batch_size, num_rows=num_rows)
    steps = local_epochs * steps_per_epoch(q)
    sigma = config.noise_multiplier
    if sigma is None:
        sigma = plan_noise_multiplier(
            target_epsilon=config.target_epsilon,
            delta=delta,
            sample_rate=q,
            steps_per_round=steps,
            rounds=rounds,
            accountant=config.accountant,
        )
    planned = compute_epsilon(
        [AccountingEvent(sigma, q, steps * rounds)], delta=delta, accountant=config.accountant
    )
    return NoisePlan(
        noise_multiplier=sigma,
        sample_rate=q,
        batch_size=batch_size,
        local_epochs=local_epochs,
        steps_per_round=steps,
        rounds=rounds,
        planned_epsilon=planned,
        delta=delta,
        accountant=config.accountant,
    )


@dataclass(frozen=True, slots=True)
class RecomputeReport:
    """ε of one history recomputed with both accountants, beside the recorded figure.

    Attributes:
        rdp_epsilon: ε by RDP.
        prv_epsilon: ε by PRV (normally the tighter of the two).
        recorded_epsilon: The figure that was stored (e.g. in the privacy ledger).
        recorded_accountant: The accountant that produced it.
        matches: Whether the recorded figure equals the recorded accountant's recomputation
            within :data:`RECOMPUTE_TOLERANCE`.
        prv_le_rdp: Whether PRV's ε <= RDP's ε.
    """

    rdp_epsilon: float
    prv_epsilon: float
    recorded_epsilon: float
    recorded_accountant: AccountantName
    matches: bool
    prv_le_rdp: bool


def recompute_check(
    events: Sequence[AccountingEvent],
    *,
    delta: float,
    recorded_epsilon: float,
    recorded_accountant: AccountantName,
    tolerance: float = RECOMPUTE_TOLERANCE,
) -> RecomputeReport:
    """Recompute ε of stored events with both accountants and compare with the stored figure.

    Raises:
        AccountingError: An argument is invalid.
    """
    check_accountant(recorded_accountant)
    rdp = compute_epsilon(events, delta=delta, accountant="rdp")
    prv = compute_epsilon(events, delta=delta, accountant="prv")
    recomputed = rdp if recorded_accountant == "rdp" else prv
    return RecomputeReport(
        rdp_epsilon=rdp,
        prv_epsilon=prv,
        recorded_epsilon=recorded_epsilon,
        recorded_accountant=recorded_accountant,
        matches=abs(recomputed - recorded_epsilon) <= tolerance,
        prv_le_rdp=prv <= rdp,
    )
