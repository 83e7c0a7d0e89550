"""The one round loop, for every task: statistics, rounds, reply checks, model selection.

An in-process federation (the real ServerApp loop and ClientApp, no Ray) over three small
simulated branches of either task.
"""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from conftest import TASK_IDS, Federation, build_federation, small_experiment
from fedcrm import wire as k
from fedcrm.client import make_client_app
from fedcrm.compliance import sqlite_url
from fedcrm.exceptions import ErrorCode
from fedcrm.server import AggregationConfig, Wiring, run_federation
from fedcrm.simulation import InProcessGrid, parse_experiment, partition_nodes
from fedcrm.strategies import RobustAggregator, RobustConfig
from fedcrm.tasks import FinishedRun, get_task

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


def _mischief(node: int, change: str) -> object:
    """A mod that spoils node ``node``'s train replies: NaN values or an extra array."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if context.node_id != node or msg.metadata.message_type != MessageType.TRAIN:
            return reply
        arrays = reply.content.array_records[k.ARRAYS]
        if change == "nan":
            name = next(iter(arrays))
            spoilt = arrays[name].numpy().copy()
            spoilt.flat[0] = np.nan
            arrays[name] = Array(spoilt)
        elif change == "scaled":  # finite, well-formed, and a thousand times too large
            for name in list(arrays):
                arrays[name] = Array(arrays[name].numpy() * 1000)
        else:  # what a branch must never send: its customers' user factors, or anything else
            arrays["users.embedding.weight"] = Array(np.zeros((5, 4), dtype=np.float32))
        return reply

    return mod


@parametrize_tasks
def test_a_federation_of_either_task_runs_through_the_one_loop(federation: Federation) -> None:
    task = get_task(federation.federation.task)
    result = run_federation(
        federation.grid, federation.federation, federation.settings, min_nodes=3
    )
    assert [r.round for r in result.rounds] == [1, 2]
    assert all(r.train_replies == 3 and not r.rejected for r in result.rounds)
    _, headline = task.headline(federation.settings)
    assert all(0 <= r.evaluate[headline] <= 1 for r in result.rounds)
    assert 1 <= result.best_round <= 2
    assert set(result.arrays) == set(task.initial_arrays(federation.settings, seed=1))
    # The statistics query comes first; every message names the task.
    first = federation.grid.sent[0]
    assert first.metadata.message_type == f"{MessageType.QUERY}.{k.ACTION_STATISTICS}"
    assert {m.content.config_records[k.CONFIG][k.KEY_TASK] for m in federation.grid.sent} == {
        task.name
    }


@parametrize_tasks
@pytest.mark.parametrize("change", ["nan", "extra-array"])
def test_spoilt_replies_are_left_out_before_aggregation(
    task_name: str, change: str, tmp_path: Path, task_identity: None, one_thread: None
) -> None:
    """The drift fix: recommendation replies go through the same validation as churn's."""
    fed = build_federation(tmp_path, small_experiment(task_name))
    app = make_client_app(
        fed.branches, simulation=fed.simulated.handle, mods=[_mischief(3, change)]
    )
    grid = InProcessGrid(app, partition_nodes(3))
    result = run_federation(grid, fed.federation, fed.settings, min_nodes=3)
    assert [len(r.rejected) for r in result.rounds] == [1, 1]
    reason = result.rounds[0].rejected[0]
    assert ("NaN" in reason) if change == "nan" else ("users.embedding.weight" in reason)
    assert {r.node_id for r in result.rejections} == {3}
    assert all(np.isfinite(a).all() for a in result.arrays.values())
    assert "users.embedding.weight" not in result.arrays


@parametrize_tasks
def test_the_median_keeps_a_scaled_update_from_taking_over_the_model(
    task_name: str, tmp_path: Path, task_identity: None, one_thread: None
) -> None:
    """A well-formed but absurd update passes validation; the coordinate median outvotes it."""
    fed = build_federation(tmp_path, small_experiment(task_name))

    def largest(robust: RobustAggregator, *, hostile: bool) -> float:
        mods = [_mischief(3, "scaled")] if hostile else []
        app = make_client_app(fed.branches, simulation=fed.simulated.handle, mods=mods)
        wiring = Wiring(
            AggregationConfig(robust=RobustConfig(aggregator=robust)),
            None,
            rounds=fed.federation.num_rounds,
            run_id=f"{robust}-{hostile}",
            ledger_url=sqlite_url(tmp_path / "ledger.db"),
            round_timeout=60.0,
        )
        grid = InProcessGrid(app, partition_nodes(3))
        result = run_federation(
            grid, fed.federation, fed.settings, min_nodes=3, wrap_strategy=wiring.wrap
        )
        assert all(r.train_replies == 3 and not r.rejected for r in result.rounds)
        return max(float(np.abs(a).max()) for a in result.arrays.values())

    honest = largest(RobustAggregator.NONE, hostile=False)
    assert largest(RobustAggregator.NONE, hostile=True) > 100 * honest  # FedAvg follows it
    assert largest(RobustAggregator.MEDIAN, hostile=True) < 2 * honest


@parametrize_tasks
def test_a_branch_without_usable_data_answers_with_an_error(federation: Federation) -> None:
    """A branch whose data cannot be loaded says why; the others go on."""
    federation.grid.contexts[2].node_config["partition-id"] = 99  # no such branch folder
    result = run_federation(
        federation.grid, federation.federation, federation.settings, min_nodes=3
    )
    errors = [r for r in federation.grid.replies if r.has_error()]
    assert errors and {e.error.code for e in errors} == {ErrorCode.BRANCH_DATA_FAILED}
    assert all("branch data not usable" in e.error.reason for e in errors)
    assert all(r.train_replies == 3 and len(r.rejected) == 1 for r in result.rounds)


@pytest.mark.parametrize("task_name", ["recommendation"])
@pytest.mark.parametrize("train_on_validation", [False, True])
def test_recommendations_at_top_k_5_and_their_released_round(
    task_name: str, train_on_validation: bool, tmp_path: Path, task_identity: None, one_thread: None
) -> None:
    """The drift fix: ``top-k = 5`` is honoured through the report (it raised KeyError)."""
    raw = small_experiment(
        task_name,
        federation={"num-rounds": 3, "top-k": 5, "train-on-validation": train_on_validation},
    )
    fed = build_federation(tmp_path, raw)
    result = run_federation(fed.grid, fed.federation, fed.settings, min_nodes=3)
    assert all(
        "hr5-sampled" in r.evaluate and "hr10-sampled" not in r.evaluate for r in result.rounds
    )
    val = [r.evaluate["val-hr5-sampled"] for r in result.rounds]
    expected = 3 if train_on_validation else 1 + int(np.argmax(val))
    assert result.best_round == expected
    task = get_task(task_name)
    outcome = task.experiment.finish(
        FinishedRun(
            spec=parse_experiment(raw).spec,
            settings=fed.settings,
            seed=fed.federation.seed,
            run_dir=tmp_path,
            federation=fed.simulated,
            arrays=result.arrays,
            rounds=[r.evaluate for r in result.rounds],
            best_round=result.best_round,
            statistics=result.statistics,
            kept=None,
        )
    )
    released = result.rounds[result.best_round - 1].evaluate
    assert outcome.summary["federated"]["k"] == 5
    assert outcome.summary["federated"]["hr_sampled"] == pytest.approx(released["hr5-sampled"])
    assert set(outcome.summary["centralised"]) >= {"popularity", "item-knn", "mf"}
    assert any("HR@5" in line for line in outcome.report)
