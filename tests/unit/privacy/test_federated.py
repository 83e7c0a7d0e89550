"""The run's DP settings and the branch's privacy report (pure data, no torch)."""

import pytest

from fedcrm.exceptions import ConfigError
from fedcrm.privacy.config import InvalidDPConfig
from fedcrm.privacy.federated import FederatedDPConfig, PrivacyReport


def test_defaults_and_round_trip_through_run_config() -> None:
    dp = FederatedDPConfig(target_epsilon=3.0, max_grad_norm=0.5, accountant="prv")
    assert dp.delta is None and dp.budget == 3.0
    assert FederatedDPConfig.from_run_config(dp.to_run_config()) == dp
    assert "ledger-url" not in FederatedDPConfig(
        target_epsilon=1.0, ledger_url="sqlite:///x.db"
    ).to_run_config(include_ledger=False)


def test_no_target_means_no_dp_and_zero_means_unset() -> None:
    assert FederatedDPConfig.from_run_config({"num-rounds": 3}) is None
    assert FederatedDPConfig.from_run_config({"dp-target-epsilon": 0.0}) is None
    dp = FederatedDPConfig.from_run_config(
        {"dp-target-epsilon": 2.0, "dp-delta": 0, "dp-max-epsilon": 0.0}
    )
    assert dp is not None and dp.delta is None and dp.max_epsilon is None


def test_unknown_dp_key_is_rejected() -> None:
    with pytest.raises(InvalidDPConfig, match="unknown key 'dp-epsilon'"):
        FederatedDPConfig.from_run_config({"dp-target-epsilon": 1.0, "dp-epsilon": 2.0})


def test_every_bad_value_is_listed_at_once() -> None:
    with pytest.raises(InvalidDPConfig) as info:
        FederatedDPConfig(target_epsilon=0.0, delta=1.0, max_grad_norm=-1.0, model="")
    text = str(info.value)
    assert "target_epsilon must be a finite number > 0" in text
    assert "0 < delta < 1" in text
    assert "max_grad_norm must be a finite number > 0" in text
    assert "model must be a non-empty string" in text
    with pytest.raises(InvalidDPConfig, match="max_epsilon"):
        FederatedDPConfig(target_epsilon=3.0, max_epsilon=1.0)


def test_delta_is_one_over_n_per_branch_unless_set() -> None:
    dp = FederatedDPConfig(target_epsilon=1.0)
    branch = dp.for_branch(num_rows=400, batch_size=32, local_epochs=2, rounds=5)
    assert branch.delta == pytest.approx(1 / 400)
    assert (branch.batch_size, branch.local_epochs, branch.rounds) == (32, 2, 5)
    assert FederatedDPConfig(target_epsilon=1.0, delta=1e-6).delta_for(400) == 1e-6
    with pytest.raises(ConfigError, match="at least 2 training rows"):
        dp.delta_for(1)


def _report(**changes: object) -> PrivacyReport:
    values: dict[str, object] = {
        "decision": "admitted",
        "reason": "admitted: ok",
        "branch": "b1",
        "model": "churn",
        "purpose": "churn-model-training",
        "privacy_unit": "customer",
        "epsilon_round": 0.5,
        "epsilon_before": 1.0,
        "epsilon": 1.5,
        "budget": 3.0,
        "delta": 1e-3,
        "noise_multiplier": 1.1,
        "sample_rate": 0.1,
        "steps": 10,
        "planned_steps": 10,
        "max_grad_norm": 1.0,
        "accountant": "rdp",
        "library_version": "opacus 1.6.0",
    }
    values.update(changes)
    return PrivacyReport(**values)  # type: ignore[arg-type]


def test_report_round_trips_through_a_config_record() -> None:
    report = _report()
    assert PrivacyReport.from_record(report.to_record()) == report
    record = report.to_record()
    record["steps"] = 10.0  # Flower may hand integers back as floats
    assert PrivacyReport.from_record(record).steps == 10


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"decision": "refused", "steps": 3}, "a refused round takes no step"),
        ({"decision": "refused", "steps": 0, "epsilon": 1.2}, "a refused round"),
        ({"epsilon": 0.9}, "cumulative epsilon decreased"),
        ({"delta": 0.0}, "0 < delta < 1"),
        ({"epsilon_round": float("nan")}, "epsilon_round must be a finite number"),
        ({"privacy_unit": "branch"}, "privacy_unit must be record or customer"),
    ],
    ids=["refused-steps", "refused-spends", "decrease", "delta", "nan", "unit"],
)
def test_invalid_reports_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _report(**changes)


def test_missing_report_key() -> None:
    record = _report().to_record()
    del record["epsilon"]
    with pytest.raises(ConfigError, match="lacks 'epsilon'"):
        PrivacyReport.from_record(record)
