"""fedcrm.privacy: the public API of the subpackage.

DP-SGD (the Opacus adapter), accountants and budgets, CKKS encryption (the TenSEAL adapter) and
keys.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "accounting": (
        "AccountingEvent",
        "BranchAccountant",
        "NoisePlan",
        "plan_for_config",
        "plan_noise_multiplier",
        "poisson_sample_rate",
        "steps_per_epoch",
    ),
    "branch_accounting": (
        "BranchLevelAccountant",
        "BranchNoisePlan",
        "CENTRAL_SAMPLE_RATE",
        "CentralDPConfig",
        "CentralDPMode",
        "LEDGER_SCOPE",
        "central_dp_toml",
        "flower_noise_multiplier",
        "parse_central_dp",
        "reseed_global_numpy",
    ),
    "budget": ("BudgetDecision",),
    "config": ("DPConfig",),
    "distributed_dp": (
        "DistributedNoise",
        "secure_generator",
    ),
    "dp_sgd": (
        "InsecureRNGWarning",
        "OPACUS_VERSION",
        "make_private",
    ),
    "federated": (
        "FederatedDPConfig",
        "PrivacyReport",
        "PrivacyUnitName",
        "RUN_CONFIG_KEYS",
    ),
    "he": (
        "ContextKindError",
        "EncryptedUpdate",
        "HEContext",
        "HEError",
        "SumEngine",
        "check_update",
        "decrypt",
        "encrypt_update",
        "sum_encrypted",
    ),
    "keys": (
        "KeyGeneration",
        "app",
        "current_generation",
        "init_keys",
        "load_public_context",
        "load_secret_context",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
