"""The run's audit trail: configuration changes, ledger entries, refusals, keys, releases."""

from pathlib import Path

import pytest

from fedcrm.compliance import Decision, EventType, Purpose, open_store, sqlite_url
from fedcrm.compliance.audit import AuditLog
from fedcrm.exceptions import ConfigError
from fedcrm.server.run_audit import ComplianceConfig, RunAudit, config_sha256
from support import ledger_entry


def test_events_of_a_run(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "compliance.db")
    audit = RunAudit(url, "run-7")
    audit.configuration({"num-rounds": 3, "lr": 0.1})
    audit.configuration({"lr": 0.1, "num-rounds": 3})  # same settings: nothing new
    audit.configuration({"num-rounds": 4, "lr": 0.1})  # a change: logged with the previous hash
    audit.ledger_entry(ledger_entry(run_id="run-7"))
    audit.ledger_entry(
        ledger_entry(run_id="run-7", decision=Decision.REFUSED, reason="budget", epsilon=0.0)
    )
    audit.key_generation(key_id="ab" * 32, generation=1, params={"poly_modulus_degree": 8192})
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    release = audit.model_release(model, model="churn", last_round=2)
    report = audit.seal(tmp_path / "audit-key.pem", tmp_path / "audit-log.jsonl")
    assert report.ok and report.keys_trusted and report.tree_size == 6

    log = AuditLog(open_store(url, migrate=False))
    entries = log.entries()
    assert [e.event_type for e in entries] == [
        EventType.CONFIGURATION_CHANGE,
        EventType.CONFIGURATION_CHANGE,
        EventType.LEDGER_ENTRY,
        EventType.REFUSAL,
        EventType.KEY_GENERATION,
        EventType.MODEL_RELEASE,
    ]
    first, second = log.read_body(0), log.read_body(1)
    assert first["sha256"] == config_sha256({"lr": 0.1, "num-rounds": 3})
    assert second["previous_sha256"] == first["sha256"] != second["sha256"]
    assert log.read_body(3)["kind"] == "privacy-budget" and log.read_body(3)["reason"] == "budget"
    assert log.read_body(5)["sha256"] == release.sha256 and release.last_round == 2
    assert all(log.read_body(e.index)["run_id"] == "run-7" for e in entries)
    assert (tmp_path / "audit-key.pem").stat().st_mode & 0o777 == 0o600


def test_compliance_config_from_run_config() -> None:
    assert ComplianceConfig.from_run_config({}) == ComplianceConfig()
    declared = ComplianceConfig.from_run_config(
        {"consent-purpose": "churn-model-training", "audit-url": "sqlite:///x.db"}
    )
    assert declared == ComplianceConfig(Purpose.CHURN_MODEL_TRAINING, "sqlite:///x.db")
    with pytest.raises(ConfigError, match="consent-purpose must be one of"):
        ComplianceConfig.from_run_config({"consent-purpose": "selling"})
