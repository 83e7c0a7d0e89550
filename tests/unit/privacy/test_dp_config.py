"""DPConfig: validation at the boundary and the kebab-case run-config mapping."""

import dataclasses
from typing import Any

import pytest

from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy.config import DPConfig, InvalidDPConfig

VALID: dict[str, Any] = {"target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}


def test_valid_config_is_frozen_with_defaults() -> None:
    config = DPConfig(**VALID)
    assert config.accountant == "rdp"
    assert config.poisson_sampling is True
    assert config.budget == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.delta = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("target_epsilon", 0.0, "target_epsilon must be a finite number > 0"),
        ("target_epsilon", -1.0, "target_epsilon must be a finite number > 0"),
        ("target_epsilon", float("inf"), "target_epsilon must be a finite number > 0"),
        ("delta", 0.0, "0 < delta < 1"),
        ("delta", 1.0, "0 < delta < 1"),
        ("delta", 1.5, "0 < delta < 1"),
        ("max_grad_norm", 0.0, "max_grad_norm must be a finite number > 0"),
        ("max_grad_norm", -0.5, "max_grad_norm must be a finite number > 0"),
        ("batch_size", 0, "batch_size must be an integer >= 1"),
        ("batch_size", True, "batch_size must be an integer >= 1"),
        ("rounds", 2.5, "rounds must be an integer >= 1"),
        ("accountant", "gdp", "accountant must be one of"),
        ("grad_sample_mode", "magic", "grad_sample_mode must be one of"),
        ("noise_multiplier", 0.0, "noise_multiplier must be a finite number > 0"),
        ("max_epsilon", 1.0, "must be >= target_epsilon"),
        ("max_rows_per_customer", 0, "max_rows_per_customer must be an integer >= 1"),
    ],
    ids=lambda v: str(v),
)
def test_out_of_range_values_are_rejected_with_the_constraint(
    field: str, value: object, fragment: str
) -> None:
    with pytest.raises(InvalidDPConfig, match=fragment) as info:
        DPConfig(**{**VALID, field: value})
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, FedCrmError)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidDPConfig) as info:
        DPConfig(target_epsilon=0.0, delta=2.0, max_grad_norm=-1.0)
    assert len(info.value.problems) == 3


def test_from_run_config_reads_kebab_case_keys() -> None:
    config = DPConfig.from_run_config(
        {
            "dp-target-epsilon": 8,
            "dp-delta": 1e-5,
            "dp-max-grad-norm": 1.5,
            "dp-accountant": "prv",
            "dp-grad-sample-mode": "hooks",
            "dp-noise-multiplier": 0,
            "batch-size": 256,
            "local-epochs": 2,
            "num-rounds": 20,
            "dataset": "mlc",
        }
    )
    assert config == DPConfig(
        target_epsilon=8,
        delta=1e-5,
        max_grad_norm=1.5,
        accountant="prv",
        grad_sample_mode="hooks",
        batch_size=256,
        local_epochs=2,
        rounds=20,
    )
    assert config.noise_multiplier is None


def test_from_run_config_rejects_unknown_dp_keys_and_missing_ones() -> None:
    with pytest.raises(InvalidDPConfig, match="unknown key 'dp-epsilon'"):
        DPConfig.from_run_config({"dp-epsilon": 3.0, "dp-delta": 1e-5, "dp-max-grad-norm": 1})
    with pytest.raises(InvalidDPConfig, match="missing required key 'dp-max-grad-norm'"):
        DPConfig.from_run_config({"dp-target-epsilon": 3.0, "dp-delta": 1e-5})
    with pytest.raises(InvalidDPConfig, match="0 < delta < 1"):
        DPConfig.from_run_config({"dp-target-epsilon": 3.0, "dp-delta": 0, "dp-max-grad-norm": 1.0})
