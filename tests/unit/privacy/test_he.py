"""Tests of the TenSEAL CKKS adapter (fedcrm.privacy.he)."""

import dataclasses
import pickle
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies
from fedcrm.privacy import he

# A small parameter set for the negative tests that need a second, different context: same
# ring, other scale (so the fingerprint differs) and room for only two summands.
OTHER_PARAMS = he.CKKSParameters(scale_bits=36)
TWO_SUMMANDS = he.CKKSParameters(max_summands=2)


_VALID_WIRE: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def pair() -> he.ContextPair:
    created = he.create_contexts()
    _VALID_WIRE[created.key_id] = he.encrypt_update(
        created.secret, np.linspace(-1.0, 1.0, 5), key_id=created.key_id
    ).to_bytes()
    return created


@pytest.fixture(scope="module")
def other_pair() -> he.ContextPair:
    return he.create_contexts()


def _enc(pair: he.ContextPair, values: np.ndarray) -> he.EncryptedUpdate:
    return he.encrypt_update(pair.secret, values, key_id=pair.key_id)


# ------------------------------------------------------------------------------ correctness


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shapes=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=3), min_size=1, max_size=3),
    branches=st.integers(1, 6),
)
def test_decrypted_weighted_sum_matches_plaintext_weighted_mean(
    pair: he.ContextPair, seed: int, shapes: list[list[int]], branches: int
) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 10_001, size=branches)
    # Model updates with several parameter arrays of random shapes, flattened (as a branch does).
    updates = [
        np.concatenate([rng.normal(0.0, 0.03, size=s).ravel() for s in shapes])
        for _ in range(branches)
    ]
    updates = [np.clip(u, -0.1, 0.1) for u in updates]  # |n_k * u_k| <= 1e4 * 0.1 = 1e3
    encrypted = [
        he.EncryptedUpdate.from_bytes(_enc(pair, n * u).to_bytes())
        for n, u in zip(counts, updates, strict=True)
    ]
    total = he.sum_encrypted(pair.public, encrypted)
    mean = he.decrypt(pair.secret, total) / counts.sum()

    expected = np.average(np.stack(updates), axis=0, weights=counts)
    tolerance = pair.secret.params.error_bound(branches) / counts.sum()
    assert total.summands == branches
    np.testing.assert_allclose(mean, expected, rtol=0, atol=tolerance)


def test_sum_of_sums_and_many_chunks(pair: he.ContextPair) -> None:
    rng = np.random.default_rng(7)
    per_ct = pair.secret.params.values_per_ciphertext
    x = rng.uniform(-1e3, 1e3, size=(4, 2 * per_ct + 5))
    a = he.sum_encrypted(pair.public, [_enc(pair, x[0]), _enc(pair, x[1])])
    b = he.sum_encrypted(pair.public, [_enc(pair, x[2]), _enc(pair, x[3])])
    total = he.sum_encrypted(pair.public, [a, b])
    assert len(total.chunks) == 3
    assert total.summands == 4
    err = np.abs(he.decrypt(pair.secret, total) - x.sum(axis=0)).max()
    assert err <= pair.secret.params.error_bound(4)


def test_other_parameters_with_several_data_primes_sum_correctly() -> None:
    # TenSEAL's usual N=8192 [60,40,40,60]: three data primes exercise the per-prime layout.
    params = he.CKKSParameters(
        poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40
    )
    other = he.create_contexts(params=params)
    x = np.random.default_rng(3).uniform(-1e3, 1e3, size=(3, 9_000))
    updates = [he.encrypt_update(other.secret, row, key_id=other.key_id) for row in x]
    total = he.decrypt(other.secret, he.sum_encrypted(other.public, updates))
    assert np.abs(total - x.sum(axis=0)).max() <= params.error_bound(3)


def test_encrypting_long_vectors_prints_no_tenseal_warning(
    pair: he.ContextPair, capfd: pytest.CaptureFixture[str]
) -> None:
    _enc(pair, np.ones(3 * pair.secret.params.values_per_ciphertext + 1))
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err


def test_every_slot_is_packed_with_two_values(pair: he.ContextPair) -> None:
    per_ct = pair.secret.params.values_per_ciphertext
    assert per_ct == pair.secret.params.poly_modulus_degree  # two reals per complex slot
    assert len(_enc(pair, np.ones(per_ct)).chunks) == 1
    assert len(_enc(pair, np.ones(per_ct + 1)).chunks) == 2


@pytest.mark.parametrize("length", [1, 2, 3, 4095, 4096, 4097], ids=str)
def test_odd_and_boundary_lengths_round_trip(pair: he.ContextPair, length: int) -> None:
    x = np.random.default_rng(length).uniform(-1e3, 1e3, length)
    np.testing.assert_allclose(he.decrypt(pair.secret, _enc(pair, x)), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("length", [3_000, 5_057, 20_000], ids=str)
def test_ciphertext_is_at_most_8x_float32(pair: he.ContextPair, length: int) -> None:
    enc = _enc(pair, np.random.default_rng(0).uniform(-1e3, 1e3, length))
    assert len(enc.to_bytes()) / (length * 4) <= 8.0


def test_round_trip_through_bytes(pair: he.ContextPair) -> None:
    enc = _enc(pair, np.arange(5.0))
    parsed = he.EncryptedUpdate.from_bytes(enc.to_bytes())
    assert parsed == enc
    assert he.EncryptedUpdate.from_bytes(bytearray(enc.to_bytes())) == enc
    # In-process transports (Ray in simulation) pickle objects; parsed updates hold views.
    copied = pickle.loads(pickle.dumps(parsed))
    assert copied == enc
    assert all(isinstance(c, bytes) for c in copied.chunks)


def test_default_parameters_are_within_128_bit_bound() -> None:
    p = he.DEFAULT_PARAMETERS
    assert sum(p.coeff_mod_bit_sizes) <= he.MAX_LOG_Q_128[p.poly_modulus_degree]
    assert p.max_abs_value * p.max_summands < p.capacity
    assert he.CKKSParameters.from_dict(p.to_dict()) == p


# ------------------------------------------------------------------------------ key custody


def test_server_context_is_public_and_cannot_decrypt(pair: he.ContextPair) -> None:
    assert pair.public.is_public()
    assert not pair.public.is_private()
    assert pair.secret.is_private()
    enc = _enc(pair, np.ones(3))
    with pytest.raises(he.ContextKindError, match="public-only"):
        he.decrypt(pair.public, enc)
    with pytest.raises(he.ContextKindError, match="no secret key"):
        pair.public.serialize_secret()


def test_public_context_bytes_hold_no_secret_key(pair: he.ContextPair) -> None:
    data = pair.public.serialize_public()
    loaded = he.load_context(data, params=pair.secret.params, require="public")
    assert loaded.is_public()
    assert loaded.key_id == pair.key_id
    with pytest.raises(he.ContextKindError, match="secret key"):
        he.load_context(
            pair.secret.serialize_secret(), params=he.DEFAULT_PARAMETERS, require="public"
        )


def test_loaded_secret_context_decrypts(pair: he.ContextPair) -> None:
    loaded = he.load_context(pair.secret.serialize_secret(), params=he.DEFAULT_PARAMETERS)
    assert loaded.key_id == pair.key_id
    out = he.decrypt(loaded, _enc(pair, np.array([1.5, -2.0])))
    np.testing.assert_allclose(out, [1.5, -2.0], atol=1e-6)


# ------------------------------------------------------------------------------ bad inputs


def test_unknown_key_id_is_rejected(pair: he.ContextPair, other_pair: he.ContextPair) -> None:
    foreign = he.encrypt_update(other_pair.secret, np.ones(4), key_id=other_pair.key_id)
    with pytest.raises(he.UnknownKeyError, match="unknown") as info:
        he.sum_encrypted(pair.public, [_enc(pair, np.ones(4)), foreign])
    assert info.value.index == 1
    with pytest.raises(he.UnknownKeyError):
        he.decrypt(pair.secret, foreign)


def test_old_generation_key_id_is_rejected_as_stale(
    pair: he.ContextPair, other_pair: he.ContextPair
) -> None:
    old = he.encrypt_update(other_pair.secret, np.ones(4), key_id=other_pair.key_id)
    server = pair.public.with_history(generation=2, retired_key_ids={other_pair.key_id: 1})
    with pytest.raises(he.StaleKeyError, match="generation 1") as info:
        he.sum_encrypted(server, [old])
    assert isinstance(info.value, he.KeyMismatchError)


def test_encrypting_under_another_key_id_is_refused(pair: he.ContextPair) -> None:
    with pytest.raises(he.KeyMismatchError, match="asked to encrypt"):
        he.encrypt_update(pair.secret, np.ones(2), key_id="0" * 64)


@pytest.mark.parametrize(
    "cut", [0, 5, 20, -1, -1000], ids=["empty", "prefix", "header", "1B", "1kB"]
)
def test_truncated_update_is_rejected(pair: he.ContextPair, cut: int) -> None:
    data = _enc(pair, np.ones(10)).to_bytes()
    with pytest.raises(he.CiphertextCorruptedError):
        he.EncryptedUpdate.from_bytes(data[:cut])


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_parse_or_crash(data: bytes) -> None:
    with pytest.raises(he.CiphertextCorruptedError):
        he.EncryptedUpdate.from_bytes(data)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000))
def test_any_truncation_or_bit_flip_of_a_valid_update_is_rejected(
    pair: he.ContextPair, cut: int, flip: int
) -> None:
    data = _VALID_WIRE[pair.key_id]
    with pytest.raises(he.CiphertextCorruptedError):
        he.EncryptedUpdate.from_bytes(data[: cut % len(data)])
    damaged = bytearray(data)
    damaged[flip % len(data)] ^= 1 << (flip % 8)
    with pytest.raises(he.CiphertextCorruptedError):
        he.EncryptedUpdate.from_bytes(bytes(damaged))


def test_trailing_bytes_are_rejected(pair: he.ContextPair) -> None:
    with pytest.raises(he.CiphertextCorruptedError, match="trailing"):
        he.EncryptedUpdate.from_bytes(_enc(pair, np.ones(10)).to_bytes() + b"\0")


def test_flipped_ciphertext_byte_is_rejected(pair: he.ContextPair) -> None:
    data = bytearray(_enc(pair, np.ones(10)).to_bytes())
    data[len(data) // 2] ^= 0x40
    with pytest.raises(he.CiphertextCorruptedError, match="CRC"):
        he.EncryptedUpdate.from_bytes(bytes(data))


@pytest.mark.parametrize(
    "data",
    [
        b"XXXX" + bytes(20),
        b"FCHE\x09" + bytes(20),
        b"FCHE\x01\x00\x00\x00\x02" + zlib.crc32(b"{}").to_bytes(4, "big") + b"{}",
    ],
    ids=["magic", "version", "header-fields"],
)
def test_malformed_envelope_is_rejected(data: bytes) -> None:
    with pytest.raises(he.CiphertextCorruptedError):
        he.EncryptedUpdate.from_bytes(data)


def test_chunk_of_wrong_size_is_rejected_with_its_index(pair: he.ContextPair) -> None:
    good = _enc(pair, np.ones(10))
    junk = b"not a ciphertext"
    bad = dataclasses.replace(good, chunks=(junk,), checksums=(zlib.crc32(junk),))
    with pytest.raises(he.CiphertextCorruptedError, match="expected") as info:
        he.sum_encrypted(pair.public, [good, good, bad])
    assert info.value.index == 2


def test_chunk_with_coefficients_beyond_the_modulus_is_rejected(pair: he.ContextPair) -> None:
    good = _enc(pair, np.ones(10))
    words = np.frombuffer(good.chunks[0], dtype="<u8").copy()
    words[123] = np.uint64(2**64 - 1)  # >= q: no ciphertext under these parameters has it
    chunk = words.tobytes()
    bad = dataclasses.replace(good, chunks=(chunk,), checksums=(zlib.crc32(chunk),))
    with pytest.raises(he.CiphertextCorruptedError, match="modulus") as info:
        he.sum_encrypted(pair.public, [good, bad])
    assert info.value.index == 1
    with pytest.raises(he.CiphertextCorruptedError, match="modulus"):
        he.decrypt(pair.secret, bad)


def test_wrong_chunk_count_is_rejected(pair: he.ContextPair) -> None:
    enc = _enc(pair, np.ones(10))
    doubled = dataclasses.replace(enc, chunks=enc.chunks * 2, checksums=enc.checksums * 2)
    with pytest.raises(he.UpdateShapeError, match="2 ciphertext chunks"):
        he.sum_encrypted(pair.public, [doubled])
    longer = dataclasses.replace(enc, length=pair.secret.params.values_per_ciphertext + 1)
    with pytest.raises(he.UpdateShapeError, match="chunks"):
        he.decrypt(pair.secret, longer)


def test_length_mismatch_between_updates_is_rejected(pair: he.ContextPair) -> None:
    with pytest.raises(he.UpdateShapeError, match="differs") as info:
        he.sum_encrypted(pair.public, [_enc(pair, np.ones(10)), _enc(pair, np.ones(11))])
    assert info.value.index == 1
    assert isinstance(info.value, InconsistentReplies)


def test_update_with_other_parameters_is_rejected(pair: he.ContextPair) -> None:
    other = he.create_contexts(params=OTHER_PARAMS)
    enc = he.encrypt_update(other.secret, np.ones(3), key_id=other.key_id)
    # Same key id claimed, other parameters: the fingerprint gives it away.
    forged = dataclasses.replace(enc, key_id=pair.key_id)
    with pytest.raises(he.ParameterMismatchError, match="parameters"):
        he.sum_encrypted(pair.public, [forged])


def test_context_with_other_parameters_is_rejected(pair: he.ContextPair) -> None:
    with pytest.raises(he.ParameterMismatchError, match="do not match"):
        he.load_context(pair.public.serialize_public(), params=OTHER_PARAMS)


def test_corrupted_context_bytes_are_rejected() -> None:
    with pytest.raises(he.CiphertextCorruptedError, match="context"):
        he.load_context(b"garbage", params=he.DEFAULT_PARAMETERS)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.array([1.0, np.nan]), "finite"),
        (np.array([0.0, np.inf]), "finite"),
        (np.array([1.0, -1000.5]), "declared range"),
    ],
    ids=["nan", "inf", "beyond-range"],
)
def test_out_of_range_values_are_refused(
    pair: he.ContextPair, values: np.ndarray, match: str
) -> None:
    with pytest.raises(he.ValueRangeError, match=match):
        _enc(pair, values)


@pytest.mark.parametrize(
    "values", [np.ones((2, 3)), np.array([]), np.array(["a"])], ids=["2d", "empty", "str"]
)
def test_bad_vectors_are_refused(pair: he.ContextPair, values: np.ndarray) -> None:
    with pytest.raises(he.UpdateShapeError):
        _enc(pair, values)


def test_too_many_summands_are_refused() -> None:
    small = he.create_contexts(params=TWO_SUMMANDS)
    enc = he.encrypt_update(small.secret, np.ones(3), key_id=small.key_id)
    with pytest.raises(he.ValueRangeError, match="max_summands"):
        he.sum_encrypted(small.public, [enc, enc, enc])


def test_empty_sum_is_refused(pair: he.ContextPair) -> None:
    with pytest.raises(ValueError, match="at least one"):
        he.sum_encrypted(pair.public, [])


def test_failed_sum_leaves_inputs_usable(pair: he.ContextPair, other_pair: he.ContextPair) -> None:
    x = np.array([1.0, 2.0, 3.0])
    good = [_enc(pair, x), _enc(pair, 2 * x)]
    bad = he.encrypt_update(other_pair.secret, x, key_id=other_pair.key_id)
    with pytest.raises(he.KeyMismatchError) as info:
        he.sum_encrypted(pair.public, [*good, bad])
    kept = [u for i, u in enumerate([*good, bad]) if i != info.value.index]
    np.testing.assert_allclose(
        he.decrypt(pair.secret, he.sum_encrypted(pair.public, kept)), 3 * x, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"coeff_mod_bit_sizes": (60, 60)}, "128-bit"),
        ({"poly_modulus_degree": 3000}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": (59,)}, "special prime"),
        ({"coeff_mod_bit_sizes": (61, 40)}, "bits"),
        ({"scale_bits": 40}, "wrap|needs"),
        ({"max_abs_value": 0.0}, "max_abs_value"),
        ({"max_summands": 0}, "max_summands"),
    ],
    ids=["insecure", "degree", "one-prime", "prime-size", "capacity", "range", "summands"],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(he.InvalidParametersError, match=match) as info:
        he.CKKSParameters(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    "data",
    [{}, {"scheme": "bfv"}, {**he.DEFAULT_PARAMETERS.to_dict(), "scale_bits": "37"}],
    ids=["empty", "scheme", "type"],
)
def test_malformed_parameter_dicts_are_refused(data: dict[str, object]) -> None:
    with pytest.raises(he.InvalidParametersError):
        he.CKKSParameters.from_dict(data)


def test_all_errors_are_fedcrm_errors() -> None:
    for name in he.__all__:
        obj = getattr(he, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, he.HEError) and issubclass(obj, FedCrmError)


# ------------------------------------------------------------------------ TenSEAL sum path


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(1, 9000), branches=st.integers(1, 5))
def test_tenseal_addition_gives_the_identical_aggregate(
    pair: he.ContextPair, seed: int, length: int, branches: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-100.0, 100.0, size=(branches, length))
    wires = [_enc(pair, row).to_bytes() for row in x]
    updates = [he.EncryptedUpdate.from_bytes(w) for w in wires]
    by_numpy = he.sum_encrypted(pair.public, updates, engine="numpy")
    by_tenseal = he.sum_encrypted(pair.public, updates, engine="tenseal")
    assert by_tenseal.to_bytes() == by_numpy.to_bytes()
    total = he.decrypt(pair.secret, by_tenseal)
    assert np.abs(total - x.sum(axis=0)).max() < pair.secret.params.error_bound(branches)


def test_tenseal_sum_rejects_bad_input_with_its_index(
    pair: he.ContextPair, other_pair: he.ContextPair
) -> None:
    good = _enc(pair, np.ones(10))
    foreign = he.encrypt_update(other_pair.secret, np.ones(10), key_id=other_pair.key_id)
    with pytest.raises(he.UnknownKeyError) as info:
        he.sum_encrypted(pair.public, [good, foreign], engine="tenseal")
    assert info.value.index == 1


def test_unknown_sum_engine_is_refused(pair: he.ContextPair) -> None:
    with pytest.raises(ValueError, match="engine"):
        he.sum_encrypted(pair.public, [_enc(pair, np.ones(3))], engine="gpu")  # type: ignore[arg-type]
