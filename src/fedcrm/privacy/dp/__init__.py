"""Differential privacy: DP-SGD on the branches and branch-level (central) DP for the federation.

A branch's DP-SGD round (:mod:`fedcrm.client.dp_round` does this)::

    plan = plan_for_config(config, num_rows=n, batch_size=b, local_epochs=e, rounds=r)  # once
    accountant = BranchAccountant.open(path, accountant=config.accountant, key=branch_key)
    decision = accountant.would_exceed(noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate, steps=plan.steps_per_round, delta=plan.delta,
        budget=config.budget)
    if decision.admitted:                                       # else: a structured refusal
        with make_private(model, optimizer, loader, criterion=nn.BCEWithLogitsLoss(),
                          noise_multiplier=plan.noise_multiplier,
                          max_grad_norm=config.max_grad_norm,
                          grad_sample_mode=config.grad_sample_mode,
                          max_steps=plan.steps_per_round) as private:
            for _ in range(plan.local_epochs):
                private.train_epoch()
            event = private.event()
        if event is not None:
            accountant.record(event)
            accountant.save(path, key=branch_key)               # atomic, JSON + HMAC

Pure analysis (ε, planning) is kept apart from the stateful accountants, as in Opacus's
``accountants/analysis/`` and ``accountants/``; Opacus is imported by one adapter module only.
See docs/privacy-analysis.md for the mechanisms, the accounting and the module layout.
"""

from fedcrm.privacy.dp._accountant import BranchAccountant, Spend, SpendStatus, parse_spends
from fedcrm.privacy.dp._analysis import (
    MECHANISM,
    AccountingEvent,
    NoisePlan,
    RecomputeReport,
    compute_epsilon,
    plan_for_config,
    plan_noise_multiplier,
    poisson_sample_rate,
    recompute_check,
    steps_per_epoch,
)
from fedcrm.privacy.dp._audit import (
    EmpiricalAudit,
    check_release,
    one_run_audit,
    one_run_epsilon_bound,
    one_run_p_value,
)
from fedcrm.privacy.dp._budget import BudgetDecision, BudgetPolicy, PrivacyBudgetExceeded, decide
from fedcrm.privacy.dp._central import (
    CENTRAL_SAMPLE_RATE,
    LEDGER_SCOPE,
    CentralAccountant,
    CentralNoisePlan,
    effective_noise_multiplier,
    flower_noise_multiplier,
    reseed_global_numpy,
    update_noise_for,
)
from fedcrm.privacy.dp._central_config import (
    CentralDPConfig,
    CentralDPMode,
    central_dp_toml,
    parse_central_dp,
)
from fedcrm.privacy.dp._config import (
    DPSGD_RUN_CONFIG_KEYS,
    AccountantName,
    DPSGDConfig,
    GradSampleMode,
)
from fedcrm.privacy.dp._contribution import CapReport, cap_rows_per_customer
from fedcrm.privacy.dp._distributed import DistributedNoise, clip_to_norm, secure_generator
from fedcrm.privacy.dp._errors import (
    AccountantConflict,
    AccountantStateError,
    AccountingError,
    ApproximateAccountingWarning,
    DPTrainingError,
    EmpiricalPrivacyViolation,
    InsecureRNGWarning,
    InvalidDPConfig,
    NoiseCalibrationError,
    SecureModeUnavailable,
    StepLimitReached,
    UnsupportedModelError,
)
from fedcrm.privacy.dp._events import (
    DISAGREEMENT,
    PLD_SLACK,
    IncrementalRdp,
    Recomputed,
    disagrees,
    event_json,
    parse_event,
    recompute_history,
)
from fedcrm.privacy.dp._fast_linear import clip_per_sample
from fedcrm.privacy.dp._opacus import OPACUS_VERSION
from fedcrm.privacy.dp._report import PrivacyReport, PrivacyUnitName
from fedcrm.privacy.dp._training import PrivateTraining, make_private

__all__ = [
    "CENTRAL_SAMPLE_RATE",
    "DISAGREEMENT",
    "DPSGD_RUN_CONFIG_KEYS",
    "LEDGER_SCOPE",
    "MECHANISM",
    "OPACUS_VERSION",
    "PLD_SLACK",
    "AccountantConflict",
    "AccountantName",
    "AccountantStateError",
    "AccountingError",
    "AccountingEvent",
    "ApproximateAccountingWarning",
    "BranchAccountant",
    "BudgetDecision",
    "BudgetPolicy",
    "CapReport",
    "CentralAccountant",
    "CentralDPConfig",
    "CentralDPMode",
    "CentralNoisePlan",
    "DPSGDConfig",
    "DPTrainingError",
    "DistributedNoise",
    "EmpiricalAudit",
    "EmpiricalPrivacyViolation",
    "GradSampleMode",
    "IncrementalRdp",
    "InsecureRNGWarning",
    "InvalidDPConfig",
    "NoiseCalibrationError",
    "NoisePlan",
    "PrivacyBudgetExceeded",
    "PrivacyReport",
    "PrivacyUnitName",
    "PrivateTraining",
    "RecomputeReport",
    "Recomputed",
    "SecureModeUnavailable",
    "Spend",
    "SpendStatus",
    "StepLimitReached",
    "UnsupportedModelError",
    "cap_rows_per_customer",
    "central_dp_toml",
    "check_release",
    "clip_per_sample",
    "clip_to_norm",
    "compute_epsilon",
    "decide",
    "disagrees",
    "effective_noise_multiplier",
    "event_json",
    "flower_noise_multiplier",
    "make_private",
    "one_run_audit",
    "one_run_epsilon_bound",
    "one_run_p_value",
    "parse_central_dp",
    "parse_event",
    "parse_spends",
    "plan_for_config",
    "plan_noise_multiplier",
    "poisson_sample_rate",
    "recompute_check",
    "recompute_history",
    "reseed_global_numpy",
    "secure_generator",
    "steps_per_epoch",
    "update_noise_for",
]
