import tomllib
from pathlib import Path

from fedcrm.privacy.branch_accounting import RUN_KEYS as CENTRAL_DP_KEYS
from fedcrm.privacy.branch_accounting import CentralDPConfig, CentralDPMode
from fedcrm.privacy.federated import RUN_CONFIG_KEYS as DP_KEYS
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.server.aggregation import KEY_AGGREGATION_MODE, wrapper
from fedcrm.server.config import FederationConfig
from fedcrm.server.run_audit import RUN_CONFIG_AUDIT_URL, RUN_CONFIG_PURPOSE, ComplianceConfig
from fedcrm.strategies.secagg import RUN_CONFIG_KEYS as SECAGG_KEYS
from fedcrm.strategies.secagg import SecAggConfig

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_flower_app_config_matches_federation_defaults() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FederationConfig().to_run_config()
    others = {"out-dir", KEY_AGGREGATION_MODE, "he-public-context", "he-checkpoint-dir"}
    others |= {RUN_CONFIG_PURPOSE, RUN_CONFIG_AUDIT_URL}
    federation = set(declared) - others - set(SECAGG_KEYS) - set(DP_KEYS) - set(CENTRAL_DP_KEYS)
    assert federation == set(defaults), federation ^ set(defaults)
    assert FederationConfig.from_run_config(declared) == FederationConfig()


def test_flower_app_config_declares_dp_and_compliance_keys_off_by_default() -> None:
    """Every key the ServerApp reads is declared, so ``flwr run --run-config`` may set it."""
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(DP_KEYS) <= set(declared), set(DP_KEYS) - set(declared)
    assert FederatedDPConfig.from_run_config(declared) is None  # no DP unless asked for
    # The declared values are the DP defaults: asking for a target changes only the target.
    chosen = FederatedDPConfig.from_run_config({**declared, "dp-target-epsilon": 3.0})
    assert chosen == FederatedDPConfig(target_epsilon=3.0)
    assert {RUN_CONFIG_PURPOSE, RUN_CONFIG_AUDIT_URL} <= set(declared)
    assert ComplianceConfig.from_run_config(declared) == ComplianceConfig()  # no gate, no trail
    gated = {**declared, RUN_CONFIG_PURPOSE: "churn-model-training", RUN_CONFIG_AUDIT_URL: "x"}
    assert ComplianceConfig.from_run_config(gated).audit_url == "x"


def test_flower_app_config_declares_secure_aggregation_defaults() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert SecAggConfig.from_run_config(declared) == SecAggConfig()
    assert wrapper(declared, strategy="fedavg", round_timeout=5) is None  # plain by default


def test_flower_app_config_declares_central_dp_keys_off_by_default() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(CENTRAL_DP_KEYS) <= set(declared), set(CENTRAL_DP_KEYS) - set(declared)
    assert CentralDPConfig.from_run_config(declared) is None  # no central DP unless asked for
    # The declared values are the defaults: asking for a mode and a target changes only those.
    chosen = {**declared, "central-dp-mode": "client-fixed", "central-dp-target-epsilon": 4.0}
    assert CentralDPConfig.from_run_config(chosen) == CentralDPConfig(
        mode=CentralDPMode.CLIENT_FIXED, target_epsilon=4.0
    )
