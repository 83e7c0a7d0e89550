"""API keys (hashed, constant-time checked, revocable) and the service settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance import ApiKeyError, ApiKeyStore, Role
from fedcrm.compliance.core.config import Settings, default_ropa, get_settings
from fedcrm.compliance.models import ApiKey


def test_only_the_token_hash_is_stored(store: sessionmaker[Session]) -> None:
    keys = ApiKeyStore(store)
    info, token = keys.create(Role.BRANCH, label="b1-frontdesk", branch="b1")
    assert token.startswith(f"fcrm_{info.key_id}_")
    with store() as session:
        row = session.execute(select(ApiKey)).scalar_one()
    assert row.token_hash == hashlib.sha256(token.encode()).digest()
    assert token.encode() not in row.token_hash
    principal = keys.authenticate(token)
    assert principal is not None
    assert (principal.role, principal.branch) == (Role.BRANCH, "b1")
    assert principal.can_access_branch("b1")
    assert not principal.can_access_branch("b2")


def test_wrong_tokens_and_revoked_keys_do_not_authenticate(store: sessionmaker[Session]) -> None:
    keys = ApiKeyStore(store)
    info, token = keys.create("officer", label="dpo")
    assert keys.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert keys.authenticate("fcrm_" + "0" * 16 + "_" + "a" * 43) is None
    assert keys.authenticate("") is None
    assert keys.revoke(info.key_id)
    assert not keys.revoke(info.key_id)
    assert keys.authenticate(token) is None
    assert [k.revoked_at is not None for k in keys.list()] == [True]


@pytest.mark.parametrize(
    ("role", "branch", "message"),
    [
        ("admin", None, "role must be one of"),
        ("branch", None, "needs its branch"),
        ("branch", "b 1", "needs its branch"),
        ("researcher", "b1", "not bound to a branch"),
    ],
    ids=["unknown-role", "branch-without-branch", "bad-branch", "researcher-with-branch"],
)
def test_invalid_keys_are_refused(
    store: sessionmaker[Session], role: str, branch: str | None, message: str
) -> None:
    with pytest.raises(ApiKeyError, match=message):
        ApiKeyStore(store).create(role, label="x", branch=branch)


def test_settings_validate_and_load_a_ropa_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="database_url"):
        Settings(database_url="mysql://localhost/db")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(database_url="sqlite:///x.db", environment="production")
    config = default_ropa().model_dump(mode="json")
    config["controller"]["contact"] = "privacy@acme.test"
    path = tmp_path / "ropa.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    settings = Settings(database_url="sqlite:///x.db", environment="production", ropa_file=path)
    assert settings.ropa.controller.contact == "privacy@acme.test"
    with pytest.raises(ValidationError, match="cannot read the RoPA file"):
        Settings(database_url="sqlite:///x.db", ropa_file=tmp_path / "missing.json")
    config["security"]["ckks"] = {
        "poly_modulus_degree": 1000,
        "coeff_mod_bit_sizes": [60, 49],
        "global_scale_bits": 38,
    }
    path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ValidationError, match="power of two"):
        Settings(database_url="sqlite:///x.db", ropa_file=path)


def test_settings_come_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("FEDCRM_COMPLIANCE_DATABASE_URL", "sqlite:///from-env.db")
    monkeypatch.setenv("FEDCRM_COMPLIANCE_DOCS", "false")
    try:
        first = get_settings()
        assert first.database_url == "sqlite:///from-env.db"
        assert first.docs is False
        assert get_settings() is first
    finally:
        get_settings.cache_clear()
