"""Branch-level (central) DP: the Gaussian mechanism's arithmetic and the federation's accountant.

Each released round is one Gaussian event ``(z_eff, q = 1, steps = 1)``; the accountant composes
them with :func:`fedcrm.privacy.dp.compute_epsilon`. The noise itself is added by Flower's
wrappers (:mod:`fedcrm.strategies.central_dp`) or, under HE, by the branches
(:mod:`fedcrm.privacy.dp._distributed`). See docs/privacy-analysis.md#branch-level-central-dp.
"""

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp._analysis import (
    AccountingEvent,
    check_accountant,
    check_delta,
    compute_epsilon,
)
from fedcrm.privacy.dp._config import AccountantName

CENTRAL_SAMPLE_RATE: Final = 1.0
"""No amplification by sampling is claimed (Flower samples branches without Poisson sampling)."""
COUNT_SENSITIVITY: Final = 1.0
"""Sensitivity of Flower's clipped count (uncentred bits) under add/remove-one-branch."""
LEDGER_SCOPE: Final = "federation"
"""The ledger's ``branch`` value of branch-level entries: the bound holds for every branch."""
DEFAULT_COUNT_STDDEV_FACTOR: Final = 2.0
"""Default ``sigma_b = 2 * z_eff``: the update noise then grows by 15 % (Andrew et al.'s
``m / 20`` needs hundreds of branches per round to be usable)."""


def effective_noise_multiplier(update_noise: float, clipped_count_stddev: float | None) -> float:
    """The one Gaussian mechanism equal to a round's releases (``z_eff``).

    Args:
        update_noise: ``z_update``, noise standard deviation on the sum divided by ``C``.
        clipped_count_stddev: ``sigma_b`` of the noisy clipped count, ``None`` without adaptive
            clipping.

    Returns:
        ``z_update`` for fixed clipping, ``(z_update^-2 + (sigma_b / 1)^-2)^-1/2`` for adaptive
        clipping (the count has sensitivity :data:`COUNT_SENSITIVITY`).
    """
    if clipped_count_stddev is None:
        return update_noise
    count_multiplier = clipped_count_stddev / COUNT_SENSITIVITY
    return float((update_noise**-2 + count_multiplier**-2) ** -0.5)


def update_noise_for(effective: float, clipped_count_stddev: float) -> float:
    """``z_update`` such that :func:`effective_noise_multiplier` gives ``effective``.

    Raises:
        ConfigError: ``sigma_b <= z_eff`` (the count alone would already spend the budget).
    """
    count_multiplier = clipped_count_stddev / COUNT_SENSITIVITY
    if count_multiplier <= effective:
        raise ConfigError(
            f"clipped-count-stddev ({clipped_count_stddev:g}) must exceed the effective noise "
            f"multiplier ({effective:g}): the noisy clipped count alone would spend the round's "
            "budget; raise clipped-count-stddev (default 2 x the multiplier)"
        )
    return float((effective**-2 - count_multiplier**-2) ** -0.5)


def flower_noise_multiplier(update_noise: float, clipped_count_stddev: float) -> float:
    """The ``noise_multiplier`` to give Flower's adaptive wrappers so they add ``update_noise``.

    Flower turns its argument ``z`` into ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et
    al.'s centred-bit calibration); this inverts that.
    """
    return float((update_noise**-2 + (2.0 * clipped_count_stddev) ** -2) ** -0.5)


@dataclass(frozen=True, slots=True)
class CentralNoisePlan:
    """The noise of every round of one run, fixed before the first round.

    Attributes:
        effective_noise_multiplier: ``z_eff`` of one round (what the accountant composes).
        update_noise_multiplier: ``z_update``: noise on the sum of clipped updates over ``C``.
        clipped_count_stddev: ``sigma_b`` (adaptive clipping only).
        rounds: Planned rounds.
        planned_epsilon: ε of all planned rounds of this run alone.
        delta: δ of ``planned_epsilon``.
        accountant: The accountant that computed it.
    """

    effective_noise_multiplier: float
    update_noise_multiplier: float
    clipped_count_stddev: float | None
    rounds: int
    planned_epsilon: float
    delta: float
    accountant: AccountantName

    def describe(self) -> str:
        """One line for logs and reports."""
        count = (
            ""
            if self.clipped_count_stddev is None
            else f", clipped-count noise sigma_b {self.clipped_count_stddev:.4g}"
        )
        return (
            f"noise multiplier on the update sum {self.update_noise_multiplier:.4g}{count}, "
            f"effective {self.effective_noise_multiplier:.4g}; epsilon {self.planned_epsilon:.4g}"
            f" after {self.rounds} rounds at delta {self.delta:g} ({self.accountant.upper()})"
        )


class CentralAccountant:
    """The federation's branch-level accountant: one Gaussian event ``(z_eff, 1, 1)`` a round.

    Args:
        accountant: ``"rdp"`` or ``"prv"``.
        delta: δ of every ε it reports.
        history: Effective noise multipliers of rounds already released (e.g. from the
            ledger), oldest first.

    Raises:
        AccountingError: An argument is invalid.

    Notes:
        The history only grows, and every event has ``z_eff > 0``, so ε never decreases.
    """

    def __init__(
        self, *, accountant: AccountantName, delta: float, history: Iterable[float] = ()
    ) -> None:
        check_accountant(accountant)
        check_delta(delta)
        self.accountant: AccountantName = accountant
        self.delta = float(delta)
        self._events = [AccountingEvent(z, CENTRAL_SAMPLE_RATE, 1) for z in history]

    @property
    def events(self) -> tuple[AccountingEvent, ...]:
        """Every round's event, oldest first."""
        return tuple(self._events)

    def epsilon(self) -> float:
        """Cumulative ε over every recorded round."""
        return compute_epsilon(self._events, delta=self.delta, accountant=self.accountant)

    def projected_epsilon(self, effective_noise_multiplier: float) -> float:
        """Cumulative ε after one more round with ``z_eff``, without recording it."""
        event = AccountingEvent(effective_noise_multiplier, CENTRAL_SAMPLE_RATE, 1)
        return compute_epsilon([*self._events, event], delta=self.delta, accountant=self.accountant)

    def record(self, effective_noise_multiplier: float) -> tuple[float, float]:
        """Record one released round; return ``(ε of this round alone, cumulative ε)``."""
        event = AccountingEvent(effective_noise_multiplier, CENTRAL_SAMPLE_RATE, 1)
        before = self.epsilon()
        self._events.append(event)
        after = self.epsilon()
        alone = compute_epsilon([event], delta=self.delta, accountant=self.accountant)
        return alone, max(after, before)


def reseed_global_numpy() -> None:
    """Reseed NumPy's global generator with 256 bits from the OS CSPRNG.

    Flower's DP wrappers draw their Gaussian noise (and the adaptive clipped-count noise) from
    ``np.random``; calling this right before each aggregation makes that noise unpredictable.
    It does not give a cryptographic generator: see docs/privacy-analysis.md#randomness.
    """
    np.random.seed(np.frombuffer(secrets.token_bytes(32), dtype=np.uint32))
