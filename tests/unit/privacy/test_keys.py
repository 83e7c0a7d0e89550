"""Tests of CKKS key custody (fedcrm.privacy.keys)."""

import hashlib
import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from fedcrm.privacy import he

with warnings.catch_warnings():
    # typer 0.20 reads click.utils.get_binary_stream, which click 8.3 deprecates with a
    # DeprecationWarning at import time; pytest's "error" filter would turn it into a failure.
    warnings.simplefilter("ignore", DeprecationWarning)
    from typer.testing import CliRunner

    from fedcrm.privacy import keys


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_secret_0600_public_and_sidecars(keydir: Path) -> None:
    gen = keys.init_keys(keydir)
    assert gen.generation == 1
    assert _mode(keydir) == 0o700
    assert _mode(gen.secret_path) == 0o600
    assert _mode(gen.secret_path.with_suffix(".json")) == 0o600
    assert _mode(gen.public_path) == 0o644
    # The key id is the SHA-256 of the public context file, recorded in both sidecars.
    assert gen.key_id == hashlib.sha256(gen.public_path.read_bytes()).hexdigest()
    for path, kind in [(gen.secret_path, "secret"), (gen.public_path, "public")]:
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["kind"] == kind
        assert meta["key_id"] == gen.key_id
        assert meta["generation"] == 1
        assert meta["params"] == he.DEFAULT_PARAMETERS.to_dict()


def test_init_twice_is_refused(keydir: Path) -> None:
    keys.init_keys(keydir)
    with pytest.raises(keys.KeyFileError, match="rotate"):
        keys.init_keys(keydir)


def test_branch_encrypts_server_sums_branch_decrypts(keydir: Path) -> None:
    gen = keys.init_keys(keydir)
    branch = keys.load_secret_context(gen.secret_path)
    server = keys.load_public_context(gen.public_path)
    assert server.is_public()
    assert branch.is_private()
    assert branch.key_id == server.key_id == gen.key_id
    x = np.linspace(-5, 5, 7)
    total = he.sum_encrypted(
        server, [he.encrypt_update(branch, x, key_id=server.key_id) for _ in range(3)]
    )
    np.testing.assert_allclose(he.decrypt(branch, total), 3 * x, atol=1e-6)
    with pytest.raises(he.ContextKindError):
        he.decrypt(server, total)


def test_server_refuses_the_secret_context(keydir: Path) -> None:
    gen = keys.init_keys(keydir)
    with pytest.raises(he.ContextKindError, match="public"):
        keys.load_public_context(gen.secret_path)


def test_server_refuses_a_secret_context_disguised_as_public(keydir: Path, tmp_path: Path) -> None:
    gen = keys.init_keys(keydir)
    fake = tmp_path / "fake" / "public.tenseal"
    fake.parent.mkdir()
    shutil.copy(gen.secret_path, fake)
    shutil.copy(gen.public_path.with_suffix(".json"), fake.with_suffix(".json"))
    with pytest.raises(he.ContextKindError, match="secret key"):
        keys.load_public_context(fake)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660], ids=oct)
def test_secret_file_readable_by_others_is_refused(keydir: Path, mode: int) -> None:
    gen = keys.init_keys(keydir)
    os.chmod(gen.secret_path, mode)
    with pytest.raises(keys.InsecureKeyFileError, match="chmod 600"):
        keys.load_secret_context(gen.secret_path)


def test_branch_refuses_the_public_context(keydir: Path) -> None:
    gen = keys.init_keys(keydir)
    os.chmod(gen.public_path, 0o600)
    with pytest.raises(he.ContextKindError, match="secret"):
        keys.load_secret_context(gen.public_path)


def test_sidecar_with_another_key_id_is_refused(keydir: Path) -> None:
    gen = keys.init_keys(keydir)
    sidecar = gen.public_path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    meta["key_id"] = "f" * 64
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(he.UnknownKeyError, match="do not belong together"):
        keys.load_public_context(gen.public_path)


@pytest.mark.parametrize("victim", ["context", "sidecar"])
def test_missing_or_truncated_files_are_refused(keydir: Path, victim: str) -> None:
    gen = keys.init_keys(keydir)
    path = gen.public_path if victim == "context" else gen.public_path.with_suffix(".json")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(he.HEError):
        keys.load_public_context(gen.public_path)
    path.unlink()
    with pytest.raises(keys.KeyFileError, match="no such"):
        keys.load_public_context(gen.public_path)


def test_rotation_rejects_old_key_ids_as_old_generation(keydir: Path) -> None:
    g1 = keys.init_keys(keydir)
    old_branch = keys.load_secret_context(g1.secret_path)
    old_update = he.encrypt_update(old_branch, np.ones(5), key_id=g1.key_id)

    g2 = keys.rotate_keys(keydir)
    assert g2.generation == 2
    assert g2.key_id != g1.key_id
    assert _mode(g2.secret_path) == 0o600
    server = keys.load_public_context(g2.public_path)
    branch = keys.load_secret_context(g2.secret_path)

    with pytest.raises(he.StaleKeyError, match="generation 1"):
        he.sum_encrypted(server, [old_update])
    with pytest.raises(he.StaleKeyError, match="generation 1"):
        he.decrypt(branch, old_update)
    with pytest.raises(he.KeyMismatchError):
        he.encrypt_update(branch, np.ones(5), key_id=g1.key_id)
    # Files of the retired generation are refused while the keyring is beside them.
    with pytest.raises(he.StaleKeyError, match="rotated out"):
        keys.load_public_context(g1.public_path)

    gens = keys.list_generations(keydir)
    assert [(g.generation, g.retired) for g in gens] == [(1, True), (2, False)]
    assert keys.current_generation(keydir).key_id == g2.key_id


def test_foreign_key_id_is_unknown_not_stale(keydir: Path, tmp_path: Path) -> None:
    keys.init_keys(keydir)
    g2 = keys.rotate_keys(keydir)
    foreign = keys.init_keys(tmp_path / "other-federation")
    update = he.encrypt_update(
        keys.load_secret_context(foreign.secret_path), np.ones(2), key_id=foreign.key_id
    )
    with pytest.raises(he.UnknownKeyError):
        he.sum_encrypted(keys.load_public_context(g2.public_path), [update])


def test_rotate_without_init_is_refused(keydir: Path) -> None:
    with pytest.raises(keys.KeyFileError, match="keys init"):
        keys.rotate_keys(keydir)


def test_cli_init_rotate_show(keydir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(keys.app, ["init", str(keydir)])
    assert result.exit_code == 0, result.output
    assert "generation 1 (current)" in result.output
    result = runner.invoke(keys.app, ["rotate", str(keydir)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(keys.app, ["show", str(keydir)])
    assert result.exit_code == 0, result.output
    assert "generation 1 (retired)" in result.output
    assert "generation 2 (current)" in result.output
    again = runner.invoke(keys.app, ["init", str(keydir)])
    assert again.exit_code == 1
    assert "rotate" in again.output


@pytest.mark.parametrize("command", ["init", "rotate", "show"])
def test_cli_help(command: str) -> None:
    result = CliRunner().invoke(keys.app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
