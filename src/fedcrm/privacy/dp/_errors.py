"""The exceptions and warnings of fedcrm.privacy.dp; every Opacus failure becomes one of them.

Hierarchy (all subclasses of :class:`fedcrm.exceptions.FedCrmError`)::

    AccountingError               an accounting input is invalid, or ε cannot be computed
    ├── NoiseCalibrationError     no noise multiplier reaches the target ε
    ├── EmpiricalPrivacyViolation an empirical audit's lower bound on ε exceeds the claim
    └── AccountantStateError      a stored accountant is corrupted, tampered with or foreign
        └── AccountantConflict    saving would replace a history that is not a prefix of ours
    DPTrainingError               DP-SGD cannot be set up or run as asked
    ├── UnsupportedModelError     layers the per-sample gradient mode cannot handle
    ├── SecureModeUnavailable     Opacus's secure_mode asked for (torchcsprng is missing)
    └── StepLimitReached          more steps than the budget check admitted
    InvalidDPConfig               DP-SGD settings out of range (+ ConfigError)

``PrivacyBudgetExceeded`` (a refused round, raised on request) sits beside the decision it
carries, in :mod:`fedcrm.privacy.dp._budget`. Warnings: :class:`InsecureRNGWarning`,
:class:`ApproximateAccountingWarning`.
"""

from typing import TYPE_CHECKING

from fedcrm.exceptions import ConfigError, FedCrmError

if TYPE_CHECKING:
    from fedcrm.privacy.dp._audit import EmpiricalAudit


class AccountingError(FedCrmError):
    """An accounting input is invalid or ε cannot be computed for it."""


class NoiseCalibrationError(AccountingError):
    """No noise multiplier reaches the target ε for the planned rounds."""


class EmpiricalPrivacyViolation(AccountingError):
    """A one-run audit's lower bound on ε exceeds the claimed ε: the release must be blocked.

    Args:
        claimed_epsilon: The ε the release states.
        audit: The :class:`~fedcrm.privacy.dp.EmpiricalAudit` that refutes it.
    """

    def __init__(self, claimed_epsilon: float, audit: "EmpiricalAudit") -> None:
        self.claimed_epsilon = claimed_epsilon
        self.audit = audit
        super().__init__(
            f"the one-run audit rejects ({claimed_epsilon:g}, {audit.delta:g})-DP: "
            f"epsilon >= {audit.epsilon_lower_bound:.3f} at {audit.confidence:.0%} confidence "
            f"({audit.correct} of {audit.guesses} guesses right, {audit.m} canaries); "
            "block the release and look for a bug in training or accounting"
        )


class AccountantStateError(AccountingError):
    """A stored accountant state is corrupted, tampered with, or does not fit this branch.

    Loading and saving never overwrite a file that raised this error.
    """


class AccountantConflict(AccountantStateError):
    """Saving would replace a stored history that is not a prefix of this one.

    That would lower, or rewrite, the branch's cumulative ε.
    """


class DPTrainingError(FedCrmError):
    """DP-SGD cannot be set up or run as asked."""


class UnsupportedModelError(DPTrainingError):
    """The model contains layers the chosen per-sample gradient mode cannot handle."""


class SecureModeUnavailable(DPTrainingError):
    """Opacus's ``secure_mode`` was requested, but torchcsprng is not installable here."""


class StepLimitReached(DPTrainingError):
    """Training tried to take more steps than the budget check admitted."""


class InvalidDPConfig(ConfigError):
    """A DP configuration value is out of range or of the wrong type.

    Args:
        problems: Every problem found, each naming the field and the constraint it breaks.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid DP configuration ({len(self.problems)} problem(s)):\n{lines}")


class InsecureRNGWarning(UserWarning):
    """DP noise comes from a CSPRNG-seeded PRNG, not a CSPRNG (``secure_mode`` unavailable)."""


class ApproximateAccountingWarning(UserWarning):
    """Batches are not Poisson-sampled, so the accountant's ε is an approximation."""
