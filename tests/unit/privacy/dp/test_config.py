"""DPSGDConfig: the run's DP-SGD settings, validated at the boundary, and their run-config keys."""

import dataclasses
from typing import Any

import pytest

from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy.dp import DPSGD_RUN_CONFIG_KEYS, DPSGDConfig, InvalidDPConfig

VALID: dict[str, Any] = {"target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0}


def test_valid_config_is_frozen_with_defaults() -> None:
    config = DPSGDConfig(**VALID)
    assert (config.accountant, config.grad_sample_mode) == ("rdp", "fast-linear")
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
        ("delta", True, "0 < delta < 1"),
        ("max_grad_norm", 0.0, "max_grad_norm must be a finite number > 0"),
        ("max_grad_norm", -0.5, "max_grad_norm must be a finite number > 0"),
        ("accountant", "gdp", "accountant must be one of"),
        ("grad_sample_mode", "magic", "grad_sample_mode must be one of"),
        ("noise_multiplier", 0.0, "noise_multiplier must be a finite number > 0"),
        ("max_epsilon", 1.0, "must be >= target_epsilon"),
        ("model", "", "model must be a non-empty string"),
        ("purpose", "x" * 65, "purpose must be a non-empty string of at most 64"),
        ("ledger_url", " ", "ledger_url must be a non-empty SQLAlchemy URL"),
    ],
    ids=lambda v: str(v),
)
def test_out_of_range_values_are_rejected_with_the_constraint(
    field: str, value: object, fragment: str
) -> None:
    with pytest.raises(InvalidDPConfig, match=fragment) as info:
        DPSGDConfig(**{**VALID, field: value})
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, FedCrmError)


def test_every_bad_value_is_listed_at_once() -> None:
    with pytest.raises(InvalidDPConfig) as info:
        DPSGDConfig(target_epsilon=0.0, delta=1.0, max_grad_norm=-1.0, model="")
    assert len(info.value.problems) == 4
    text = str(info.value)
    assert "target_epsilon must be a finite number > 0" in text
    assert "0 < delta < 1" in text
    assert "max_grad_norm must be a finite number > 0" in text
    assert "model must be a non-empty string" in text


def test_defaults_and_round_trip_through_run_config() -> None:
    dp = DPSGDConfig(target_epsilon=3.0, max_grad_norm=0.5, accountant="prv")
    assert dp.delta is None and dp.budget == 3.0
    assert set(dp.to_run_config()) <= set(DPSGD_RUN_CONFIG_KEYS)
    assert DPSGDConfig.from_run_config(dp.to_run_config()) == dp
    assert "ledger-url" not in DPSGDConfig(
        target_epsilon=1.0, ledger_url="sqlite:///x.db"
    ).to_run_config(include_ledger=False)


def test_from_run_config_reads_kebab_case_keys() -> None:
    config = DPSGDConfig.from_run_config(
        {
            "dp-target-epsilon": 8,
            "dp-delta": 1e-5,
            "dp-max-grad-norm": 1.5,
            "dp-accountant": "prv",
            "dp-grad-sample-mode": "hooks",
            "dp-noise-multiplier": 0,
            "privacy-model": "",
            "num-rounds": 20,
        },
        model="recommender",
        purpose="recommendation-training",
    )
    assert config == DPSGDConfig(
        target_epsilon=8,
        delta=1e-5,
        max_grad_norm=1.5,
        accountant="prv",
        grad_sample_mode="hooks",
        model="recommender",
        purpose="recommendation-training",
    )


def test_no_target_means_no_dp_and_zero_means_unset() -> None:
    assert DPSGDConfig.from_run_config({"num-rounds": 3}) is None
    assert DPSGDConfig.from_run_config({"dp-target-epsilon": 0.0}) is None
    dp = DPSGDConfig.from_run_config(
        {"dp-target-epsilon": 2.0, "dp-delta": 0, "dp-max-epsilon": 0.0}
    )
    assert dp is not None and dp.delta is None and dp.max_epsilon is None


def test_unknown_dp_key_is_rejected() -> None:
    with pytest.raises(InvalidDPConfig, match="unknown key 'dp-epsilon'"):
        DPSGDConfig.from_run_config({"dp-target-epsilon": 1.0, "dp-epsilon": 2.0})
    with pytest.raises(InvalidDPConfig, match="0 < delta < 1"):
        DPSGDConfig.from_run_config({"dp-target-epsilon": 3.0, "dp-delta": 1.5})


def test_delta_is_one_over_ten_n_per_branch_unless_set() -> None:
    assert DPSGDConfig(target_epsilon=1.0).delta_for(400) == pytest.approx(1 / 4000)
    assert DPSGDConfig(target_epsilon=1.0, delta=1e-6).delta_for(400) == 1e-6
    with pytest.raises(ConfigError, match="at least 1 training row"):
        DPSGDConfig(target_epsilon=1.0).delta_for(0)


@pytest.mark.parametrize("delta", [1 / 400, 0.01])
def test_a_delta_not_below_one_over_n_is_refused_with_the_reason(delta: float) -> None:
    with pytest.raises(ConfigError, match=r"not below 1/n = 0.0025 .* 400 DP-SGD rows"):
        DPSGDConfig(target_epsilon=1.0, delta=delta).delta_for(400)
