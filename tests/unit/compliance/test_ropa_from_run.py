"""Art. 30 records and the DPIA skeleton generated from a run directory's real configuration.

Each run directory is written here: ``config.toml`` exactly as ``fedcrm simulate`` resolves it
(``to_toml_dict(parse_experiment(...))``) and a ``summary.json`` shaped like the runner's.
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import uvicorn
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from fedcrm.compliance import ApiKeyStore, sqlite_url
from fedcrm.compliance.api import create_app
from fedcrm.compliance.cli import app as cli
from fedcrm.compliance.core import (
    Controller,
    DataSchema,
    RunConfigurationError,
    Settings,
    default_ropa,
    dpia_markdown,
    get_settings,
    ropa_from_run,
    ropa_markdown,
)
from fedcrm.compliance.core.ropa_markdown import TO_COMPLETE
from fedcrm.data import get_schema
from fedcrm.simulation import parse_experiment
from fedcrm.simulation.config import to_toml_dict

PLAINTEXT = "none: model updates are sent in plaintext"
NO_DP = "no differential privacy"
BRANCHES = ("branch-00", "branch-01", "branch-02")


def _experiment(**tables: Any) -> dict[str, Any]:
    """A small churn experiment (as ``tests/conftest.py``'s), resolved as the runner writes it."""
    raw: dict[str, Any] = {
        "name": "small-churn",
        "dataset": "synthetic:mlc",
        "rows": 600,
        "partition": {"kind": "iid", "num-branches": 3},
        "federation": {"num-rounds": 2, "lr": 0.05},
        "baselines": {"torch-epochs": 2},
    }
    raw.update({name.replace("_", "-"): table for name, table in tables.items()})
    return to_toml_dict(parse_experiment(raw))


def _privacy(config: dict[str, Any], epsilons: tuple[float, ...] = (2.9, 2.95, 2.99)) -> Any:
    """A ``summary.json`` privacy section as the runner's ``privacy_summary`` writes it."""
    dp = config["dp"]
    rule = (
        "1/(10n) per branch (n = its DP-SGD rows; δ must stay below 1/n)"
        if "delta" not in dp
        else f"{dp['delta']:g}"
    )
    return {
        "mechanism": "DP-SGD (Abadi et al. 2016): Poisson-subsampled Gaussian, per-example "
        "clipping",
        "privacy_unit": "customer",
        "unit_note": "record-level DP on each branch's training rows; churn tables hold one row "
        "per customer, so the guarantee is customer-level",
        "neighbouring_relation": "add/remove one row",
        "epsilon_scope": f"per branch, cumulative for ({dp['model']}, {dp['purpose']})",
        "target_epsilon": dp["target-epsilon"],
        "budget": dp.get("max-epsilon", dp["target-epsilon"]),
        "delta_rule": rule,
        "accountant": dp["accountant"],
        "max_grad_norm": dp["max-grad-norm"],
        "epsilon_max": max(epsilons),
        "branches": [
            {
                "branch": name,
                "epsilon": eps,
                "delta": dp.get("delta", 1 / (10 * 180)),
                "noise_multiplier": 1.1,
                "sample_rate": 0.18,
                "admitted_rounds": 2,
                "refused_rounds": 0,
            }
            for name, eps in zip(BRANCHES, epsilons, strict=True)
        ],
        "ledger": "sqlite:///runs/x/ledger.db",
        "not_covered": "the evaluation aggregates are released without noise",
    }


def _summary(config: dict[str, Any], **sections: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "name": config["name"],
        "task": config["task"],
        "branches": [{"partition_id": i, "name": b, "rows": 200} for i, b in enumerate(BRANCHES)],
        "traffic": {"aggregation": config["aggregation"]["mode"]},
    }
    if "dp" in config:
        summary["privacy"] = _privacy(config)
    return {**summary, **sections}


def _write_run(
    root: Path,
    config: dict[str, Any],
    summary: dict[str, Any] | None = None,
    *,
    name: str = "20260101-000000-small-churn",
    files: dict[str, Any] | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    for path, content in (files or {}).items():
        (run / path).parent.mkdir(parents=True, exist_ok=True)
        (run / path).write_text(json.dumps(content), encoding="utf-8")
    return run


def _keyring(n: int = 4096, bits: tuple[int, ...] = (60, 49), scale: int = 38) -> Any:
    params = {
        "scheme": "ckks",
        "poly_modulus_degree": n,
        "coeff_mod_bit_sizes": list(bits),
        "scale_bits": scale,
        "max_abs_value": 1000.0,
        "max_summands": 1000,
    }
    entry = {"generation": 1, "key_id": "ab" * 32, "created_at": "2026-01-01", "params": params}
    return {"format": "fedcrm-he-keyring", "version": 1, "current": 1, "generations": [entry]}


def _text(*parts: tuple[str, ...]) -> str:
    return "\n".join(line for part in parts for line in part)


# -- what a run's records say ----------------------------------------------------------------


def test_a_plaintext_run_says_no_encryption_and_no_dp(tmp_path: Path) -> None:
    config = _experiment()
    ropa = ropa_from_run(_write_run(tmp_path, config, _summary(config)))
    security = ropa.security
    assert security.aggregation == "plaintext"
    assert security.ckks is None
    assert security.secagg is None
    assert security.dp_targets == ()
    assert security.consent_gate is None
    absent = _text(security.not_in_force)
    assert PLAINTEXT in absent
    assert NO_DP in absent
    assert "consent gate: none" in absent
    in_force = _text(security.measures).lower()
    for claim in ("encrypt", "ε", "dp-sgd", "differential privacy", "consent gate", "secagg"):
        assert claim not in in_force, claim
    (activity,) = ropa.activities
    assert activity.legal_basis is None
    assert any("in plaintext; without noise" in r for r in activity.recipients)
    assert ropa.branches == BRANCHES
    assert ropa.source.kind == "run"
    assert ropa.source.run_id == "20260101-000000-small-churn"


@pytest.mark.parametrize(
    "dp",
    [
        {"target-epsilon": 3.0, "max-grad-norm": 1.0},
        {"target-epsilon": 1.5, "max-grad-norm": 0.5, "accountant": "prv", "delta": 1e-5},
        {"target-epsilon": 4.0, "max-epsilon": 6.0, "noise-multiplier": 1.3},
    ],
    ids=["default-delta-rdp", "fixed-delta-prv", "budget-and-sigma"],
)
def test_a_dp_run_states_epsilon_delta_unit_accountant_as_configured(
    tmp_path: Path, dp: dict[str, Any]
) -> None:
    config = _experiment(dp=dp)
    ropa = ropa_from_run(_write_run(tmp_path, config, _summary(config)))
    (target,) = ropa.security.dp_targets
    live = config["dp"]  # the resolved [dp] table, as the run used it
    assert target.level == "dp-sgd"
    assert target.epsilon == live["target-epsilon"]
    assert target.budget == live.get("max-epsilon", live["target-epsilon"])
    assert target.accountant.value == live["accountant"]
    assert target.clipping_norm == live["max-grad-norm"]
    assert target.noise_multiplier == live.get("noise-multiplier")
    assert target.model == live["model"]
    assert target.purpose.value == live["purpose"]
    assert target.delta == live.get("delta")
    assert target.privacy_unit.value == "customer"
    assert target.mechanism.value == "subsampled-gaussian"
    assert target.epsilon_spent == 2.99
    assert set(target.delta_per_branch) == set(BRANCHES)
    statement = target.statement()
    assert f"target ε {live['target-epsilon']:g}" in statement
    assert f"{live['accountant'].upper()} accountant" in statement
    assert "privacy unit customer" in statement
    if "delta" in live:
        assert f"δ = {live['delta']:g} on every branch" in statement
    else:
        assert "δ = 1/(10n) per branch" in statement
    assert statement in ropa.security.measures
    assert NO_DP not in _text(ropa.security.not_in_force)
    assert PLAINTEXT in _text(ropa.security.not_in_force)  # DP does not encrypt anything


def test_changing_the_config_changes_the_export(tmp_path: Path) -> None:
    before_config = _experiment(dp={"target-epsilon": 3.0})
    before = ropa_from_run(_write_run(tmp_path, before_config, _summary(before_config)))
    after_config = _experiment(dp={"target-epsilon": 1.0, "accountant": "prv", "delta": 1e-6})
    run = _write_run(tmp_path, after_config, _summary(after_config))  # the same directory
    after = ropa_from_run(run)
    assert after.source.config_sha256 != before.source.config_sha256
    (old,), (new,) = before.security.dp_targets, after.security.dp_targets
    assert (old.epsilon, old.accountant.value, old.delta) == (3.0, "rdp", None)
    assert (new.epsilon, new.accountant.value, new.delta) == (1.0, "prv", 1e-6)
    # Dropping [dp] drops the claim: the export says so instead.
    plain = _experiment()
    (run / "summary.json").unlink()
    (run / "config.toml").write_text(tomli_w.dumps(plain), encoding="utf-8")
    again = ropa_from_run(run)
    assert again.security.dp_targets == ()
    assert NO_DP in _text(again.security.not_in_force)
    assert any("no summary.json" in note for note in again.activities[0].notes)


def test_summary_contradicting_the_config_is_refused(tmp_path: Path) -> None:
    config = _experiment(dp={"target-epsilon": 3.0})
    summary = _summary(config)
    summary["privacy"]["accountant"] = "prv"
    summary["privacy"]["target_epsilon"] = 8.0
    with pytest.raises(RunConfigurationError, match="accountant") as caught:
        ropa_from_run(_write_run(tmp_path, config, summary))
    assert any("target_epsilon" in p for p in caught.value.problems)
    plain = _experiment()
    with pytest.raises(RunConfigurationError, match="no \\[dp\\]"):
        ropa_from_run(_write_run(tmp_path, plain, {**_summary(plain), "privacy": {}}, name="b"))


def test_an_he_run_states_the_ckks_parameters_of_its_key_ring(tmp_path: Path) -> None:
    config = _experiment(aggregation={"mode": "he"})
    run = _write_run(tmp_path, config, _summary(config), files={"keys/keyring.json": _keyring()})
    security = ropa_from_run(run).security
    assert security.aggregation == "ckks"
    assert security.ckks is not None
    assert security.ckks.poly_modulus_degree == 4096
    assert security.ckks.coeff_mod_bit_sizes == (60, 49)
    assert security.ckks.global_scale_bits == 38
    assert security.ckks.key_id == "ab" * 32
    assert any("N = 4096, coefficient primes [60, 49]" in m for m in security.measures)
    assert PLAINTEXT not in _text(security.not_in_force)
    assert NO_DP in _text(security.not_in_force)  # encrypted, but not noised
    (run / "keys" / "keyring.json").unlink()
    unrecorded = ropa_from_run(run).security
    assert unrecorded.ckks is None
    assert any("parameters not recorded" in m for m in unrecorded.measures)


def test_a_secagg_run_states_its_masking_parameters(tmp_path: Path) -> None:
    config = _experiment(aggregation={"mode": "secagg", "secagg-num-shares": 7})
    security = ropa_from_run(_write_run(tmp_path, config, _summary(config))).security
    assert security.aggregation == "secagg+"
    assert security.secagg is not None
    assert security.secagg.num_shares == config["aggregation"]["secagg-num-shares"] == 7
    assert PLAINTEXT not in _text(security.not_in_force)


def test_branch_level_central_dp_is_stated_with_its_own_unit(tmp_path: Path) -> None:
    central = {"mode": "server-fixed", "target-epsilon": 64.0, "clipping-norm": 0.5}
    config = _experiment(central_dp=central)
    spent = {"epsilon": 63.2, "delta": config["central-dp"]["delta"], "accountant": "rdp"}
    run = _write_run(tmp_path, config, _summary(config, central_dp=spent))
    (target,) = ropa_from_run(run).security.dp_targets
    assert target.level == "central"
    assert target.privacy_unit.value == "branch"
    assert target.mechanism.value == "gaussian"
    assert target.delta == config["central-dp"]["delta"]
    assert target.epsilon == 64.0
    assert target.epsilon_spent == 63.2
    security = ropa_from_run(run).security
    absent = _text(security.not_in_force)
    assert "DP-SGD on the branches: none" in absent
    assert NO_DP not in absent


def test_a_consent_gated_run_states_its_gate_and_audit_log(tmp_path: Path) -> None:
    config = _experiment(compliance={"purpose": "churn-model-training"})
    record = {"audit_entries": 626, "audit_verified": True, "manifests": 6, "rows_used": 650}
    run = _write_run(tmp_path, config, _summary(config, compliance=record))
    ropa = ropa_from_run(run)
    assert ropa.security.consent_gate is not None
    assert ropa.security.consent_gate.purpose.value == "churn-model-training"
    assert ropa.activities[0].legal_basis is not None
    assert any("626 entries, verified" in m for m in ropa.security.measures)
    assert "consent gate: none" not in _text(ropa.security.not_in_force)


def test_the_declared_schema_gives_the_data_categories(tmp_path: Path) -> None:
    config = _experiment()
    run = _write_run(tmp_path, config, _summary(config))
    assert "no schema.json" in ropa_from_run(run).activities[0].data_categories[0]
    schema = DataSchema.model_validate(get_schema("mlc"), from_attributes=True)
    categories = ropa_from_run(run, schema=schema).activities[0].data_categories
    assert categories[0].startswith(f"pseudonymous customer id ({schema.id_column}")
    names = {f.name for f in schema.features}
    assert names <= {n.strip() for c in categories[1:-1] for n in c.split(":")[1].split(",")}
    (run / "schema.json").write_text(schema.model_dump_json(), encoding="utf-8")
    assert ropa_from_run(run).activities[0].data_categories == categories


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (None, "cannot read the run's configuration"),
        ("not = [toml", "not valid TOML"),
        ({"name": "x", "federation": {}, "aggregation": {"mode": "rot13"}}, "mode must be"),
        (
            {"name": "x", "aggregation": {"mode": "plain"}, "dp": {"accountant": "rdp"}},
            "target-epsilon must be a finite number",
        ),
    ],
    ids=["missing", "not-toml", "bad-mode", "dp-without-epsilon"],
)
def test_a_missing_or_malformed_run_is_refused(
    tmp_path: Path, config: dict[str, Any] | str | None, message: str
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if isinstance(config, str):
        (run / "config.toml").write_text(config, encoding="utf-8")
    elif config is not None:
        (run / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")
    with pytest.raises(RunConfigurationError, match=message):
        ropa_from_run(run)


def test_the_default_records_claim_no_measure() -> None:
    ropa = default_ropa()
    assert ropa.source.kind == "none"
    assert ropa.security.measures == ()
    assert ropa.security.dp_targets == ()
    assert ropa.security.ckks is None
    assert ropa.security.aggregation is None
    assert "no run configuration loaded" in ropa.security.not_in_force[0]
    text = json.dumps(ropa.model_dump(mode="json")).lower()
    assert "encrypted" not in text
    assert "noised" not in text
    assert all(a.legal_basis is None for a in ropa.activities)


# -- Markdown, DPIA, settings, API and CLI -----------------------------------------------------


def test_markdown_and_dpia_come_from_the_same_configuration(tmp_path: Path) -> None:
    plain_config = _experiment()
    plain = ropa_from_run(_write_run(tmp_path, plain_config, _summary(plain_config), name="a"))
    dp_config = _experiment(dp={"target-epsilon": 3.0})
    dp = ropa_from_run(_write_run(tmp_path, dp_config, _summary(dp_config), name="b"))
    assert PLAINTEXT in ropa_markdown(plain)
    assert NO_DP in ropa_markdown(plain)
    assert dp.security.dp_targets[0].statement() in ropa_markdown(dp)
    dpia = dpia_markdown(plain)
    for heading in ("Art. 35(7)(a)", "Necessity and proportionality", "### R1.", "Conclusion"):
        assert heading in dpia
    assert dpia.count(TO_COMPLETE) >= 10
    risk = dpia.split("### R1.")[1].split("### R2.")[0]
    assert "none recorded" in risk
    assert PLAINTEXT in risk
    assert dp.security.dp_targets[0].statement() in dpia_markdown(dp).split("### R2.")[1]
    assert "churn schema 'mlc'" in dpia


def test_settings_build_the_records_and_store_from_a_run(tmp_path: Path) -> None:
    config = _experiment(dp={"target-epsilon": 3.0})
    run = _write_run(tmp_path, config, _summary(config))
    (run / "compliance.db").touch()
    settings = Settings(run_dir=run)
    assert settings.ropa == ropa_from_run(run)
    assert settings.database_url == sqlite_url(run / "compliance.db")
    assert Settings(run_dir=run, database_url="sqlite:///o.db").database_url == "sqlite:///o.db"
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(run_dir=run, environment="production")
    controller = Controller(name="Acme Telco", contact="privacy@acme.test", dpo_contact="d")
    path = tmp_path / "ropa.json"
    path.write_text(json.dumps({"controller": controller.model_dump()}), encoding="utf-8")
    chosen = Settings(run_dir=run, ropa_file=path, environment="production")
    assert chosen.ropa.controller == controller
    assert chosen.ropa.security == settings.ropa.security
    with pytest.raises(ValidationError, match="cannot build the RoPA"):
        Settings(run_dir=tmp_path / "nowhere")


def test_get_ropa_serves_the_run_records(
    tmp_path: Path, store: sessionmaker[Session], db_url: str
) -> None:
    config = _experiment(aggregation={"mode": "he"})
    run = _write_run(tmp_path, config, _summary(config), files={"keys/keyring.json": _keyring()})
    app = create_app(Settings(run_dir=run, database_url=db_url), store=store)
    officer = {"X-API-Key": ApiKeyStore(store).create("officer", label="dpo")[1]}
    body = TestClient(app).get("/ropa", headers=officer).json()
    assert body["source"]["config_sha256"] == ropa_from_run(run).source.config_sha256
    assert body["security"]["aggregation"] == "ckks"
    assert body["security"]["ckks"]["poly_modulus_degree"] == 4096
    assert body["branches"] == list(BRANCHES)
    (record,) = body["records"]
    assert record["dp_targets"] == []
    assert record["legal_basis"] is None
    default = create_app(Settings(database_url=db_url), store=store)
    body = TestClient(default).get("/ropa", headers=officer).json()
    assert body["source"]["kind"] == "none"
    assert body["security"]["measures"] == []


def test_cli_prints_the_records_and_the_dpia(tmp_path: Path) -> None:
    config = _experiment(dp={"target-epsilon": 3.0, "delta": 1e-5})
    run = _write_run(tmp_path, config, _summary(config))
    result = CliRunner().invoke(cli, ["ropa", "--run", str(run)])
    assert result.exit_code == 0, result.output
    (target,) = json.loads(result.stdout)["security"]["dp_targets"]
    live = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))["dp"]
    assert (target["epsilon"], target["delta"], target["accountant"]) == (
        live["target-epsilon"],
        live["delta"],
        live["accountant"],
    )
    assert target["privacy_unit"] == "customer"
    markdown = CliRunner().invoke(cli, ["ropa", "--run", str(run), "--format", "md"])
    assert markdown.exit_code == 0, markdown.output
    assert "target ε 3" in markdown.stdout
    out = tmp_path / "dpia.md"
    dpia = CliRunner().invoke(cli, ["ropa", "--run", str(run), "--dpia", "--out", str(out)])
    assert dpia.exit_code == 0, dpia.output
    assert TO_COMPLETE in out.read_text(encoding="utf-8")
    missing = CliRunner().invoke(cli, ["ropa", "--run", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "config.toml" in missing.stderr


def test_cli_serve_uses_the_run_records_and_its_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    config = _experiment()
    run = _write_run(tmp_path, config, _summary(config))
    Path(db_url.removeprefix("sqlite:///")).rename(run / "compliance.db")
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **_: served.append(application))
    monkeypatch.setattr(logging, "basicConfig", lambda **_: None)  # no handler on pytest's stderr
    result = CliRunner().invoke(cli, ["serve", "--run", str(run)])
    assert result.exit_code == 0, result.output
    settings = served[0].dependency_overrides[get_settings]()
    assert settings.ropa == ropa_from_run(run)
    assert settings.database_url == sqlite_url(run / "compliance.db")
