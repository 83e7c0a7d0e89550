"""Version pin of the raw SEAL engine (fedcrm.privacy.he._engine).

The engine writes SEAL's ciphertext layout and TenSEAL's CKKSVectorProto by hand and reads
coefficients in SEAL's order, so it is correct for one TenSEAL release only. These tests make a
TenSEAL upgrade fail here, loudly, instead of silently corrupting encrypted sums.
"""

import importlib.metadata
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedcrm.privacy import he
from fedcrm.privacy.he import _engine

ROOT = Path(__file__).resolve().parents[3]

UPGRADE = (
    "the raw SEAL engine (fedcrm/privacy/he/_engine.py) was written against tenseal "
    f"{_engine.SEAL_FORMAT_TENSEAL}: re-check its ciphertext, protobuf and coefficient formats "
    "against the new release (this file's sum tests), then bump SEAL_FORMAT_TENSEAL"
)

# magic, header size, SEAL major and minor version, compression (none), reserved, size: the
# SEAL 4.3 header that tenseal 0.3.18 links and the engine writes in front of a ciphertext.
SEAL_HEADER = (0xA15E, 16, 4, 3, 0, 0, 0)

SEVERAL_PRIMES = he.CKKSParameters(
    poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40
)


def test_installed_tenseal_is_the_release_the_engine_was_written_for() -> None:
    assert importlib.metadata.version("tenseal") == _engine.SEAL_FORMAT_TENSEAL, UPGRADE
    assert _engine.tenseal_version() == _engine.SEAL_FORMAT_TENSEAL, UPGRADE


def test_pyproject_pins_that_release() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    tenseal = [d for d in project["dependencies"] if d.startswith("tenseal")]
    assert tenseal == [f"tenseal=={_engine.SEAL_FORMAT_TENSEAL}"], UPGRADE


def test_linked_seal_writes_the_header_the_engine_expects() -> None:
    assert struct.unpack("<HBBBBHQ", _engine.seal_header(0)) == SEAL_HEADER, UPGRADE


@pytest.fixture(scope="module")
def pairs() -> dict[str, he.ContextPair]:
    return {
        "default": he.create_contexts(),
        "three-data-primes": he.create_contexts(params=SEVERAL_PRIMES),
    }


@pytest.mark.parametrize(
    ("key", "length", "branches"),
    [
        ("default", 1, 1),
        ("default", 4097, 1),
        ("default", 5, 3),
        ("default", 9_000, 4),
        ("three-data-primes", 9_000, 3),
    ],
    ids=["one-value", "one-update-two-chunks", "short", "three-chunks", "three-data-primes"],
)
def test_fast_sum_is_byte_identical_to_tenseal_addition(
    pairs: dict[str, he.ContextPair], key: str, length: int, branches: int
) -> None:
    pair = pairs[key]
    x = np.random.default_rng(length + branches).uniform(-100.0, 100.0, size=(branches, length))
    updates = [
        he.EncryptedUpdate.from_bytes(
            he.encrypt_update(pair.secret, row, key_id=pair.key_id).to_bytes()
        )
        for row in x
    ]
    fast = he.sum_encrypted(pair.public, updates, engine="numpy")
    by_tenseal = he.sum_encrypted(pair.public, updates, engine="tenseal")
    assert fast.to_bytes() == by_tenseal.to_bytes(), UPGRADE
    if branches == 1:  # through TenSEAL's loader and SEAL's save/load and back, unchanged
        assert [bytes(c) for c in by_tenseal.chunks] == [bytes(c) for c in updates[0].chunks]
    error = np.abs(he.decrypt(pair.secret, fast) - x.sum(axis=0)).max()
    assert error <= pair.secret.params.error_bound(branches), UPGRADE
