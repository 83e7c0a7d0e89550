"""SecAgg+ in the round loop, for every task (in-process grid, Flower's own protocol).

Dropout test: five branches; one dies in the collect-masked-vectors stage (after it took part
in setup and key sharing, so its pairwise masks sit in the survivors' vectors). The round
must still complete, and the unmasked aggregate must equal the four survivors' weighted mean
within the quantization bound, not the five branches' mean.
"""

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from conftest import TASK_IDS, Federation, build_federation, small_experiment
from fedcrm import wire as k
from fedcrm.client import make_client_app, secagg_mod
from fedcrm.exceptions import FedCrmError
from fedcrm.server import FederationConfig, RoundRecord, run_federation
from fedcrm.simulation import InProcessGrid, partition_nodes
from fedcrm.strategies import StrategyName
from fedcrm.strategies.secagg import SecAggConfig, SecAggPlusAggregation, quantization_error_bound
from fedcrm.tasks import get_task

MAX_WEIGHT = {"churn": 500.0, "recommendation": 5000.0}
"""Above every branch's training count (rows, or interactions), so that none is refused."""
DEAD = 3  # node id of the branch that dies mid-round
parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


def _wire_copy(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class _Grid(InProcessGrid):
    """A ClientApp exception becomes an error reply, as on a SuperNode; wire copies per stage."""

    run = SimpleNamespace(run_id=1)  # type: ignore[assignment]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"msg-{next(self._ids)}"
            msg.content = _wire_copy(msg.content)  # the protocol shares one record per stage
            try:
                replies.append(self.client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:
                replies.append(Message(Error(code=1, reason=f"{exc}"), reply_to=msg))
        return replies


@pytest.fixture
def five(task_name: str, tmp_path: Path, task_identity: None, one_thread: None) -> Federation:
    """Five branches of ``task_name``, one round."""
    if task_name == "churn":
        partition = {"kind": "dirichlet", "num-branches": 5, "alpha": 1.0, "min-branch-size": 100}
        tables: dict[str, Any] = {"partition": partition, "rows": 1200}  # unequal sizes
    else:
        tables = {"synthetic": {"branches": 5, "users": 150, "items": 150}}
    raw = small_experiment(task_name, federation={"num-rounds": 1}, **tables)
    return build_federation(tmp_path, raw)


def _secagg(fed: Federation, **changes: float) -> SecAggConfig:
    values = {"max_weight": MAX_WEIGHT[fed.federation.task], **changes}
    return SecAggConfig(num_shares=5, reconstruction_threshold=3, **values)  # type: ignore[arg-type]


def _grid(fed: Federation, mods: list[Mod]) -> _Grid:
    app = make_client_app(fed.branches, simulation=fed.simulated.handle, mods=mods)
    return _Grid(app, partition_nodes(5))


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


def _mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(c for _, c in updates)
    names = updates[0][0]
    return {
        n: np.sum([u[n].astype(np.float64) * c for u, c in updates], axis=0) / total for n in names
    }


@parametrize_tasks
def test_round_completes_with_the_survivors_sum_when_a_branch_dies(five: Federation) -> None:
    recorder = _Recorder()
    grid = _grid(five, [secagg_mod, _DieInTraining(), recorder])
    wrappers: list[SecAggPlusAggregation] = []

    def wrap(inner: object) -> SecAggPlusAggregation:
        wrappers.append(SecAggPlusAggregation(inner, _secagg(five), timeout=5))  # type: ignore[arg-type]
        return wrappers[-1]

    rounds: list[RoundRecord] = []
    result = run_federation(
        grid,
        five.federation,
        five.settings,
        min_nodes=5,
        wrap_strategy=wrap,
        on_round=rounds.append,
    )

    record = wrappers[0].rounds[0]
    assert record.completed and record.sampled == [1, 2, 3, 4, 5]
    assert record.survivors == [1, 2, 4, 5]
    assert "collect_masked_vectors" in record.failures[DEAD]
    assert "branch process killed" in record.failures[DEAD]
    assert [r.node_id for r in result.rejections] == [DEAD]
    assert rounds[0].rejected and "SecAgg+" in rounds[0].rejected[0]
    assert np.isfinite(rounds[0].train[k.KEY_TRAIN_LOSS])

    assert sorted(recorder.updates) == [1, 2, 4, 5]
    survivors = _mean(list(recorder.updates.values()))
    bound = quantization_error_bound(_secagg(five), [c for _, c in recorder.updates.values()])
    assert bound < 1e-4
    got = {n: a.astype(np.float64) for n, a in result.arrays.items()}
    assert result.best_round == 1
    worst = max(float(np.max(np.abs(got[n] - survivors[n]))) for n in survivors)
    assert worst <= bound + 1e-6  # + float32 rounding of the unmasked mean (measured: 7.7e-6)
    # The check can tell weightings apart: the unweighted mean is far outside the bound.
    unweighted = _mean([(u, 1) for u, _ in recorder.updates.values()])
    assert max(float(np.max(np.abs(unweighted[n] - survivors[n]))) for n in survivors) > 10 * bound


@parametrize_tasks
def test_a_branch_whose_update_would_be_clipped_drops_out(five: Federation) -> None:
    tight = _secagg(five, clipping_range=1e-3)
    grid = _grid(five, [secagg_mod])
    wrapper: list[SecAggPlusAggregation] = []

    def wrap(inner: object) -> SecAggPlusAggregation:
        wrapper.append(SecAggPlusAggregation(inner, tight, timeout=5))  # type: ignore[arg-type]
        return wrapper[-1]

    with pytest.raises(FedCrmError, match="no usable branch update"):
        run_federation(grid, five.federation, five.settings, min_nodes=5, wrap_strategy=wrap)
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


@parametrize_tasks
@pytest.mark.parametrize("strategy", [StrategyName.FEDPROX, StrategyName.FEDADAM])
def test_server_strategies_run_on_the_unmasked_mean(
    five: Federation, task_name: str, strategy: StrategyName
) -> None:
    task = get_task(task_name)
    if str(strategy) not in task.strategies:
        pytest.skip(f"the {task_name} task has no branch side for {strategy}")
    grid = _grid(five, [secagg_mod])
    cfg = FederationConfig(**{**five.federation.__dict__, "strategy": strategy})
    rounds: list[RoundRecord] = []
    result = run_federation(
        grid,
        cfg,
        five.settings,
        min_nodes=5,
        wrap_strategy=lambda inner: SecAggPlusAggregation(inner, _secagg(five), timeout=5),
        on_round=rounds.append,
    )
    assert rounds[0].train["secagg-summed"] == 5 and result.rejections == []
    _, headline = task.headline(five.settings)
    assert np.isfinite(rounds[0].evaluate[headline])


@parametrize_tasks
def test_too_heavy_a_branch_stops_the_run_before_round_1(five: Federation) -> None:
    from fedcrm.exceptions import ConfigError
    from fedcrm.server import AggregationConfig, Wiring
    from fedcrm.strategies import AggregationMode

    light = _secagg(five, max_weight=10.0)
    wiring = Wiring(
        AggregationConfig(mode=AggregationMode.SECAGG, secagg=light),
        None,
        rounds=1,
        run_id="r",
        ledger_url="sqlite://",
        round_timeout=5,
    )
    grid = _grid(five, [secagg_mod])
    with pytest.raises(ConfigError, match="more than secagg-max-weight"):
        run_federation(
            grid,
            five.federation,
            five.settings,
            min_nodes=5,
            wrap_strategy=wiring.wrap,
            check_statistics=wiring.check_statistics,
        )
    assert all(m.metadata.message_type.startswith("query") for m in grid.sent)
