"""The branch-side HE mod: decrypt in, encrypt out, error replies instead of exceptions."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedcrm import wire as k
from fedcrm.client.he_mod import HEMod
from fedcrm.privacy import he, keys

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("k") / "he"
    keys.init_keys(folder)
    return folder


@pytest.fixture(scope="module")
def key_id(key_dir: Path) -> str:
    return keys.current_generation(key_dir).key_id


def _model(value: float = 0.0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 3), value, dtype=np.float32))})


def _request(kind: str, fields: dict[str, object], arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord({"lr": 0.1}), k.HE_RECORD: ConfigRecord(fields)})  # type: ignore[arg-type]
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, dst_node_id=7, message_type=kind)


def _train_handler(value: float, count: float = 10.0):  # type: ignore[no-untyped-def]
    def handler(msg: Message, _ctxt: Context) -> Message:
        base = msg.content.array_records["arrays"]["w"].numpy()
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array((base + value).astype(np.float32))}),
                "metrics": MetricRecord({"num-examples": count}),
            }
        )
        return Message(content, reply_to=msg)

    return handler


def _ctx(node_config: dict[str, object] | None = None) -> Context:
    return Context(1, 7, dict(node_config or {}), RecordDict(), {})  # type: ignore[arg-type]


def test_round_zero_train_encrypts_the_weighted_delta(key_dir: Path, key_id: str) -> None:
    mod = HEMod(key_dir)
    msg = _request("train", {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}, _model(1.0))
    reply = mod(msg, _ctx(), _train_handler(0.25, count=4.0))
    assert not reply.has_error()
    assert not reply.content.array_records
    wire = reply.content.config_records[k.HE_RECORD][k.HE_UPDATE]
    assert isinstance(wire, bytes)
    secret = keys.load_secret_context(keys.current_generation(key_dir).secret_path)
    values = he.decrypt(secret, he.EncryptedUpdate.from_bytes(wire))
    np.testing.assert_allclose(values, np.full(6, 4.0 * 0.25 / k.WEIGHT_UNIT), atol=1e-6)


def test_message_without_he_record_passes_unchanged(key_dir: Path) -> None:
    mod = HEMod(key_dir)
    msg = Message(content=RecordDict({"arrays": _model()}), dst_node_id=7, message_type="train")
    reply = mod(msg, _ctx(), _train_handler(1.0))
    assert "arrays" in reply.content.array_records


def test_key_dir_from_node_config(key_dir: Path, key_id: str) -> None:
    mod = HEMod()
    msg = _request("train", {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}, _model())
    reply = mod(msg, _ctx({k.NODE_HE_KEY_DIR: str(key_dir)}), _train_handler(0.1))
    assert not reply.has_error()


def _assert_refused(reply: Message, match: str) -> None:
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert match in (reply.error.reason or ""), reply.error.reason


def test_no_key_directory_is_an_error_reply(key_id: str) -> None:
    msg = _request("train", {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}, _model())
    _assert_refused(HEMod()(msg, _ctx(), _train_handler(0.1)), "no HE key directory")


def test_unknown_key_id_is_an_error_reply(key_dir: Path) -> None:
    msg = _request("train", {k.HE_KEY_ID: "ab" * 32, k.HE_ROUND: 0}, _model())
    _assert_refused(HEMod(key_dir)(msg, _ctx(), _train_handler(0.1)), "current key")


def test_missed_round_is_an_error_reply(key_dir: Path, key_id: str) -> None:
    fields = {k.HE_KEY_ID: key_id, k.HE_ROUND: 3, k.HE_AGGREGATE: b"x", k.HE_COUNT: 5}
    _assert_refused(
        HEMod(key_dir)(_request("evaluate", fields), _ctx(), _train_handler(0.1)),
        "missed a round",
    )


def test_out_of_range_update_is_an_error_reply(key_dir: Path, key_id: str) -> None:
    msg = _request("train", {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}, _model())
    reply = HEMod(key_dir)(msg, _ctx(), _train_handler(5.0, count=100_000.0))
    _assert_refused(reply, "beyond the declared range")


def test_corrupted_aggregate_is_an_error_reply(key_dir: Path, key_id: str) -> None:
    mod, ctx = HEMod(key_dir), _ctx()
    mod(_request("train", {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}, _model()), ctx, _train_handler(0))
    fields = {
        k.HE_KEY_ID: key_id,
        k.HE_ROUND: 1,
        k.HE_AGGREGATE: b"FCHE\x01junk",
        k.HE_COUNT: 5,
    }
    _assert_refused(mod(_request("evaluate", fields), ctx, _train_handler(0)), "truncated")


def test_mod_pickles_without_its_key(key_dir: Path, key_id: str) -> None:
    mod = HEMod(key_dir)
    mod(
        _request("train", {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}, _model()),
        _ctx(),
        _train_handler(0),
    )
    assert mod._context is not None
    copy = pickle.loads(pickle.dumps(mod))
    assert copy._context is None and copy.key_dir == key_dir


def test_missing_key_directory_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        HEMod(tmp_path / "nope")


def test_other_reply_records_pass_and_a_reply_without_model_is_untouched(
    key_dir: Path, key_id: str
) -> None:
    def with_report(msg: Message, _ctxt: Context) -> Message:
        base = msg.content.array_records["arrays"]["w"].numpy()
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(base + 0.1)}),
                "metrics": MetricRecord({"num-examples": 3}),
                "privacy": ConfigRecord({"admitted": True}),
            }
        )
        return Message(content, reply_to=msg)

    def refused(msg: Message, _ctxt: Context) -> Message:
        content = RecordDict({"privacy": ConfigRecord({"admitted": False})})
        return Message(content, reply_to=msg)

    fields = {k.HE_KEY_ID: key_id, k.HE_ROUND: 0}
    reply = HEMod(key_dir)(_request("train", fields, _model()), _ctx(), with_report)
    assert set(reply.content.config_records) == {"privacy", k.HE_RECORD}
    assert not reply.content.array_records
    reply = HEMod(key_dir)(_request("train", fields, _model()), _ctx(), refused)
    assert not reply.has_error() and set(reply.content.config_records) == {"privacy"}
