"""The branch's privacy report: validation and its ConfigRecord form (pure data, no torch)."""

import pytest

from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp import PrivacyReport


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
