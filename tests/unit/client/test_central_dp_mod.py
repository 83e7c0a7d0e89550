"""Client-side clipping mods: Flower's clipping where it applies, hand-through elsewhere."""

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.client.central_dp_mod import (
    adaptive_clipping_mod,
    central_clipping_mod,
    fixed_clipping_mod,
)

pytestmark = pytest.mark.usefixtures("task_identity")


GLOBAL = np.linspace(-1, 1, 12).astype(np.float32)


def _msg(kind: str = "train", clip: float | None = 1.0) -> Message:
    config = ConfigRecord({} if clip is None else {"clipping_norm": clip})
    content = RecordDict({"arrays": ArrayRecord({"w": Array(GLOBAL.copy())}), "config": config})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _app(delta: np.ndarray | None) -> Callable[[Message, Context], Message]:
    def app(msg: Message, _ctxt: Context) -> Message:
        if delta is None:  # a record-level refusal: metrics and no parameters
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
        arrays = ArrayRecord({"w": Array((GLOBAL + delta).astype(np.float32))})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})
        return Message(content, reply_to=msg)

    return app


def _ctx() -> Context:
    return Context(1, 7, {}, RecordDict(), {})


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=12, max_size=12),
    st.floats(0.01, 10),
)
def test_branch_clipped_update_norm_is_at_most_c(values: list[float], clip: float) -> None:
    delta = np.array(values, dtype=np.float32)
    out = adaptive_clipping_mod(_msg(clip=clip), _ctx(), _app(delta))
    assert not out.has_error()
    got = out.content.array_records["arrays"]["w"].numpy().astype(np.float64) - GLOBAL
    assert np.linalg.norm(got) <= clip * (1 + 1e-5) + 1e-5
    bit = out.content.metric_records["metrics"]["norm_bit"]
    norm = float(np.linalg.norm(delta.astype(np.float64)))
    if norm > clip * (1 + 1e-4):
        assert bit == 1
    elif norm < clip * (1 - 1e-4):
        assert bit == 0


def test_other_messages_and_refusals_pass_through() -> None:
    delta = np.full(12, 5.0, dtype=np.float32)
    for msg in (_msg(kind="evaluate"), _msg(clip=None), _msg(kind="query.moments")):
        out = fixed_clipping_mod(msg, _ctx(), _app(delta))
        assert not out.has_error()
        got = out.content.array_records["arrays"]["w"].numpy() - GLOBAL
        np.testing.assert_allclose(got, delta, rtol=1e-6)  # untouched
    refusal = fixed_clipping_mod(_msg(), _ctx(), _app(None))
    assert not refusal.has_error() and not refusal.content.array_records


@pytest.mark.parametrize("mod", [fixed_clipping_mod, adaptive_clipping_mod], ids=["fixed", "adapt"])
def test_zero_update_is_sent_unclipped(mod: Callable[..., Message]) -> None:
    out = mod(_msg(), _ctx(), _app(np.zeros(12, dtype=np.float32)))
    assert not out.has_error()
    np.testing.assert_array_equal(out.content.array_records["arrays"]["w"].numpy(), GLOBAL)
    if mod is adaptive_clipping_mod:
        assert out.content.metric_records["metrics"]["norm_bit"] == 0


@pytest.mark.parametrize(
    ("mode", "bit"),
    [("client-adaptive", True), ("client-fixed", False), ("", False)],
    ids=["adaptive", "fixed", "no-mode"],
)
def test_deployed_mod_clips_as_the_run_config_says(mode: str, bit: bool) -> None:
    delta = np.full(12, 5.0, dtype=np.float32)
    ctxt = Context(1, 7, {}, RecordDict(), {"central-dp-mode": mode})
    out = central_clipping_mod(_msg(clip=0.5), ctxt, _app(delta))
    assert not out.has_error()
    got = out.content.array_records["arrays"]["w"].numpy().astype(np.float64) - GLOBAL
    assert np.linalg.norm(got) == pytest.approx(0.5, rel=1e-5)
    assert ("norm_bit" in out.content.metric_records["metrics"]) is bit


@pytest.mark.parametrize("mode", ["", "server-fixed", "client-adaptive"])
def test_deployed_mod_passes_through_runs_without_client_side_clipping(mode: str) -> None:
    delta = np.full(12, 5.0, dtype=np.float32)
    ctxt = Context(1, 7, {}, RecordDict(), {"central-dp-mode": mode})
    for msg in (_msg(clip=None), _msg(kind="evaluate"), _msg(kind="query.moments")):
        out = central_clipping_mod(msg, ctxt, _app(delta))
        assert not out.has_error()
        got = out.content.array_records["arrays"]["w"].numpy() - GLOBAL
        np.testing.assert_allclose(got, delta, rtol=1e-6)  # untouched
        assert "norm_bit" not in out.content.metric_records["metrics"]
    refusal = central_clipping_mod(_msg(), ctxt, _app(None))
    assert not refusal.has_error() and not refusal.content.array_records
