"""``[tool.flwr.app.config]`` declares every key the deployed apps read, with "off" defaults."""

import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedcrm.privacy import DPSGD_RUN_CONFIG_KEYS as DP_KEYS
from fedcrm.privacy import CentralDPConfig, CentralDPMode, DPSGDConfig
from fedcrm.privacy.dp._central_config import RUN_KEYS as CENTRAL_DP_KEYS
from fedcrm.server import AggregationConfig, ComplianceConfig, FederationConfig
from fedcrm.server.app import CHECKPOINT_DIR_KEY, RUN_NAME_KEY
from fedcrm.server.run_audit import RUN_CONFIG_AUDIT_URL, RUN_CONFIG_PURPOSE
from fedcrm.server.wiring import KEY_HE_CHECKPOINT_DIR, KEY_HE_PUBLIC_CONTEXT
from fedcrm.settings import keys
from fedcrm.strategies import AggregationMode
from fedcrm.strategies.secagg import RUN_CONFIG_KEYS as SECAGG_KEYS
from fedcrm.strategies.secagg import SecAggConfig
from fedcrm.tasks import TASKS
from fedcrm.wire import KEY_AGGREGATION_MODE

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


@pytest.fixture
def declared() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    return config


def test_every_declared_key_is_read_by_someone(declared: dict[str, Any]) -> None:
    readers = keys(FederationConfig) | set(DP_KEYS) | set(CENTRAL_DP_KEYS) | set(SECAGG_KEYS)
    readers |= {RUN_CONFIG_PURPOSE, RUN_CONFIG_AUDIT_URL, "out-dir", KEY_AGGREGATION_MODE}
    readers |= {CHECKPOINT_DIR_KEY, RUN_NAME_KEY}
    readers |= {KEY_HE_PUBLIC_CONTEXT, KEY_HE_CHECKPOINT_DIR}
    for task in TASKS.values():
        readers |= keys(task.settings_type)
    assert set(declared) == readers, set(declared) ^ readers


def test_the_federation_and_every_task_read_their_defaults(declared: dict[str, Any]) -> None:
    assert FederationConfig.from_run_config(declared) == FederationConfig()
    for task in TASKS.values():
        missing = keys(task.settings_type) - set(declared)
        assert not missing, (task.name, missing)
        task.settings(declared, where="run config", strict=False)  # valid for every task
    churn = TASKS["churn"]
    assert churn.settings(declared, where="run config", strict=False) == churn.settings_type()


def test_dp_and_compliance_keys_are_off_by_default(declared: dict[str, Any]) -> None:
    """Every key the ServerApp reads is declared, so ``flwr run --run-config`` may set it."""
    assert DPSGDConfig.from_run_config(declared) is None  # no DP unless asked for
    # The declared values are the DP defaults: asking for a target changes only the target,
    # and the budget's model and purpose are the run's task's.
    chosen = DPSGDConfig.from_run_config(
        {**declared, "dp-target-epsilon": 3.0}, model="recommender", purpose="p"
    )
    assert chosen == DPSGDConfig(target_epsilon=3.0, model="recommender", purpose="p")
    assert ComplianceConfig.from_run_config(declared) == ComplianceConfig()  # no gate, no trail
    gated = {**declared, RUN_CONFIG_PURPOSE: "churn-model-training", RUN_CONFIG_AUDIT_URL: "x"}
    assert ComplianceConfig.from_run_config(gated).audit_url == "x"


def test_secure_aggregation_is_plain_by_default(declared: dict[str, Any]) -> None:
    assert SecAggConfig.from_run_config(declared) == SecAggConfig()
    assert AggregationConfig.from_run_config(declared).mode is AggregationMode.PLAIN


def test_central_dp_keys_are_off_by_default(declared: dict[str, Any]) -> None:
    assert CentralDPConfig.from_run_config(declared) is None  # no central DP unless asked for
    chosen = {**declared, "central-dp-mode": "client-fixed", "central-dp-target-epsilon": 4.0}
    assert CentralDPConfig.from_run_config(chosen) == CentralDPConfig(
        mode=CentralDPMode.CLIENT_FIXED, target_epsilon=4.0
    )
