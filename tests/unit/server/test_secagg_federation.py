"""SecAgg+ in the federated loop (in-process grid, the real ClientApp and Flower's protocol).

Dropout test: five branches; one dies in the collect-masked-vectors stage (after it took part
in setup and key sharing, so its pairwise masks sit in the survivors' vectors). The round
must still complete, and the unmasked aggregate must equal the four survivors' weighted mean
within the quantization bound, not the five branches' mean.
"""

import itertools
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedcrm import constants as k
from fedcrm.client.app import branch_dir, make_client_app
from fedcrm.client.branch import write_export
from fedcrm.client.secagg_client import secagg_mod
from fedcrm.data.check import coerce_frame
from fedcrm.data.schema import MLC
from fedcrm.data.synthetic import synthetic_export
from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import RoundRecord, run_federation
from fedcrm.strategies.factory import StrategyName
from fedcrm.strategies.secagg import SecAggConfig, SecAggPlusAggregation, quantization_error_bound

CFG = FederationConfig(
    schema="mlc", num_rounds=1, lr=0.1, batch_size=32, hidden_layers="8", round_timeout=5
)
SECAGG = SecAggConfig(num_shares=5, reconstruction_threshold=3, max_weight=500.0)
SIZES = [300, 240, 200, 260, 220]
DEAD = 103  # node id of the branch that dies mid-round


def _wire_copy(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class _Grid:
    """In-process grid: a ClientApp exception becomes an error reply, as on a SuperNode."""

    run = SimpleNamespace(run_id=1)

    def __init__(self, app: object, nodes: dict[int, int]) -> None:
        self.app = app
        self.contexts = {
            node: Context(1, node, {k.NODE_PARTITION_ID: pid}, RecordDict(), {})
            for node, pid in nodes.items()
        }
        self._ids = itertools.count(1)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{next(self._ids)}"
            msg.content = _wire_copy(msg.content)  # the protocol shares one record per stage
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))  # type: ignore[operator]
            except Exception as exc:
                replies.append(Message(Error(code=1, reason=f"{exc}"), reply_to=msg))
        return replies


class _DieInTraining:
    """Test-only mod: node ``DEAD`` raises when asked to train (collect-masked-vectors)."""

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == "train" and ctxt.node_id == DEAD:
            raise RuntimeError("branch process killed")
        return call_next(msg, ctxt)


class _Recorder:
    """Test-only mod: keep every branch's plaintext update (what SecAgg+ then masks)."""

    def __init__(self) -> None:
        self.updates: dict[int, tuple[dict[str, np.ndarray], int]] = {}

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, ctxt)
        if msg.metadata.message_type == "train" and reply.has_content():
            arrays = {n: a.numpy().copy() for n, a in reply.content.array_records[k.ARRAYS].items()}
            count = int(reply.content.metric_records[k.METRICS][k.KEY_NUM_EXAMPLES])  # type: ignore[arg-type]
            self.updates[ctxt.node_id] = (arrays, count)
        return reply


@pytest.fixture
def branches(tmp_path: Path) -> Path:
    root = tmp_path / "branches"
    for pid, rows in enumerate(SIZES):
        frame = coerce_frame(synthetic_export(MLC, rows, seed=pid), MLC)
        frame[MLC.id_column] = [f"p_{pid}_{i}" for i in range(len(frame))]
        write_export(frame, MLC, branch_dir(root, pid) / "export.parquet")
    return root


def _mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(c for _, c in updates)
    names = updates[0][0]
    return {
        n: np.sum([u[n].astype(np.float64) * c for u, c in updates], axis=0) / total for n in names
    }


def test_round_completes_with_the_survivors_sum_when_a_branch_dies(
    branches: Path, task_identity: None
) -> None:
    recorder = _Recorder()
    app = make_client_app(branches, mods=[secagg_mod, _DieInTraining(), recorder])
    grid = _Grid(app, {101 + pid: pid for pid in range(len(SIZES))})
    wrappers: list[SecAggPlusAggregation] = []

    def wrap(inner: object) -> SecAggPlusAggregation:
        wrappers.append(SecAggPlusAggregation(inner, SECAGG, timeout=5))  # type: ignore[arg-type]
        return wrappers[-1]

    rounds: list[RoundRecord] = []
    result = run_federation(grid, CFG, min_nodes=5, wrap_strategy=wrap, on_round=rounds.append)  # type: ignore[arg-type]

    record = wrappers[0].rounds[0]
    assert record.completed and record.sampled == [101, 102, 103, 104, 105]
    assert record.survivors == [101, 102, 104, 105]
    assert "collect_masked_vectors" in record.failures[DEAD]
    assert "branch process killed" in record.failures[DEAD]
    assert [r.node_id for r in result.rejections] == [DEAD]
    assert rounds[0].rejected and "SecAgg+" in rounds[0].rejected[0]
    assert np.isfinite(rounds[0].train[k.KEY_TRAIN_LOSS])

    assert sorted(recorder.updates) == [101, 102, 104, 105]
    survivors = _mean(list(recorder.updates.values()))
    bound = quantization_error_bound(SECAGG, [c for _, c in recorder.updates.values()])
    assert bound < 1e-4
    got = {n: t.numpy().astype(np.float64) for n, t in result.state_dict.items()}
    assert result.best_round == 1
    worst = max(float(np.max(np.abs(got[n] - survivors[n]))) for n in survivors)
    assert worst <= bound + 1e-6  # + float32 rounding of the unmasked mean (measured: 7.7e-6)
    # The check can tell weightings apart: the unweighted mean is far outside the bound.
    unweighted = _mean([(u, 1) for u, _ in recorder.updates.values()])
    assert max(float(np.max(np.abs(unweighted[n] - survivors[n]))) for n in survivors) > 10 * bound


def test_a_branch_whose_update_would_be_clipped_drops_out(
    branches: Path, task_identity: None
) -> None:
    tight = SecAggConfig(num_shares=5, reconstruction_threshold=3, clipping_range=1e-3)
    app = make_client_app(branches, mods=[secagg_mod])
    grid = _Grid(app, {101 + pid: pid for pid in range(len(SIZES))})
    wrapper: list[SecAggPlusAggregation] = []

    def wrap(inner: object) -> SecAggPlusAggregation:
        wrapper.append(SecAggPlusAggregation(inner, tight, timeout=5))  # type: ignore[arg-type]
        return wrapper[-1]

    from fedcrm.exceptions import FedCrmError

    with pytest.raises(FedCrmError, match="no usable branch update"):
        run_federation(grid, CFG, min_nodes=5, wrap_strategy=wrap)  # type: ignore[arg-type]
    record = wrapper[0].rounds[0]
    assert not record.completed
    assert all("exceeds secagg-clipping-range" in r for r in record.failures.values())
    assert len(record.failures) == 5


def test_plain_train_messages_pass_the_secagg_mod_untouched(task_identity: None) -> None:
    calls: list[str] = []

    def handler(msg: Message, ctxt: Context) -> Message:
        calls.append(msg.metadata.message_type)
        return msg

    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert RECORD_KEY_CONFIGS not in msg.content.config_records
    secagg_mod(msg, Context(1, 1, {}, RecordDict(), {}), handler)
    assert calls == ["train"]


@pytest.mark.parametrize("strategy", [StrategyName.FEDPROX, StrategyName.FEDADAM])
def test_server_strategies_run_on_the_unmasked_mean(
    branches: Path, task_identity: None, strategy: StrategyName
) -> None:
    app = make_client_app(branches, mods=[secagg_mod])
    grid = _Grid(app, {101 + pid: pid for pid in range(len(SIZES))})
    cfg = FederationConfig(
        schema="mlc", num_rounds=1, lr=0.1, hidden_layers="8", strategy=strategy, round_timeout=5
    )
    rounds: list[RoundRecord] = []
    result = run_federation(
        grid,  # type: ignore[arg-type]
        cfg,
        min_nodes=5,
        wrap_strategy=lambda inner: SecAggPlusAggregation(inner, SECAGG, timeout=5),
        on_round=rounds.append,
    )
    assert rounds[0].train["secagg-summed"] == 5 and result.rejections == []
    assert np.isfinite(rounds[0].evaluate["roc-auc"])
