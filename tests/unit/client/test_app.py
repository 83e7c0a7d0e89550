"""The one ClientApp: any task's messages; user factors never leave a recommendation branch."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto

from conftest import TASK_IDS, Federation, build_federation, small_experiment
from fedcrm import wire as k
from fedcrm.client.source import resolve_source
from fedcrm.data.interactions import latest_items
from fedcrm.data.schema import get_schema
from fedcrm.exceptions import ErrorCode
from fedcrm.privacy import DPSGDConfig, PrivacyReport
from fedcrm.settings import to_mapping
from fedcrm.tasks import get_task
from fedcrm.tasks.recommendation.task import load_arrays

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


def _request(fed: Federation, kind: str, settings: Any = None, **config: Any) -> Message:
    task = get_task(fed.federation.task)
    settings = settings or fed.settings
    arrays = task.initial_arrays(settings, seed=fed.federation.seed)
    values = {
        k.KEY_TASK: task.name,
        k.KEY_SEED: fed.federation.seed,
        **to_mapping(settings),
        **config,
    }
    if task.name == "churn":  # every train and evaluate message carries the shared scaler
        width = len(get_schema(settings.schema).numeric)
        values |= {k.KEY_SCALER_MEAN: [0.0] * width, k.KEY_SCALER_STD: [1.0] * width}
    content = RecordDict(
        {
            k.ARRAYS: ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()}),
            k.CONFIG: ConfigRecord(values),
        }
    )
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(fed: Federation) -> Context:
    return fed.grid.contexts[1]


@pytest.fixture
def rec(tmp_path: Path, task_identity: None, one_thread: None) -> Federation:
    return build_federation(tmp_path, small_experiment("recommendation"))


def test_train_reply_holds_only_the_item_arrays(rec: Federation) -> None:
    context = _context(rec)
    request = _request(rec, "train")
    reply = rec.app(request, context)

    assert not reply.has_error(), reply.error
    arrays = reply.content.array_records
    assert list(arrays) == [k.ARRAYS]
    assert set(arrays[k.ARRAYS].keys()) == {"items.embedding.weight", "items.bias.weight"}
    sent = request.content.array_records[k.ARRAYS]
    assert arrays[k.ARRAYS].count_bytes() == sent.count_bytes()
    n_items = rec.settings.num_items
    assert sum(a.numpy().nbytes for a in arrays[k.ARRAYS].values()) == n_items * 9 * 4
    assert not reply.content.config_records

    # The user factors exist (node state and the branch folder) but are not in the wire bytes.
    users = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"]
    wire = message_to_proto(reply).SerializeToString()
    for row in users.numpy():
        assert row.tobytes() not in wire
    saved = load_arrays(rec.branches / "000" / k.REC_USER_FACTORS_FILE)
    np.testing.assert_array_equal(saved["users.embedding.weight"], users.numpy())


def test_history_model_sends_its_shared_history_parameters_but_no_history(
    rec: Federation,
) -> None:
    settings = replace(rec.settings, history_length=3)
    context = _context(rec)
    reply = rec.app(_request(rec, "train", settings), context)

    assert not reply.has_error(), reply.error
    sent = reply.content.array_records[k.ARRAYS]
    assert set(sent.keys()) == {
        "items.embedding.weight",
        "items.bias.weight",
        "items.context.weight",
        "items.position.weight",
    }
    assert sent["items.position.weight"].numpy().shape == (3, 1)
    wire = message_to_proto(reply).SerializeToString()
    users = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"]
    for row in users.numpy():
        assert row.tobytes() not in wire
    # Each customer's latest items (their history vector's input) are not sent either.
    task = get_task("recommendation")
    source = resolve_source(context, rec.branches, rec.simulated.handle)
    data = task.load(source, settings, seed=rec.federation.seed)
    recent = latest_items(data.split.train, 3)
    for row in recent[(recent >= 0).all(axis=1)]:
        assert row.tobytes() not in wire


def test_user_factors_persist_across_rounds(rec: Federation) -> None:
    context = _context(rec)
    rec.app(_request(rec, "train"), context)
    first = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"].numpy()
    rec.app(_request(rec, "train", **{k.KEY_SERVER_ROUND: 2}), context)
    second = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"].numpy()
    assert not np.allclose(first, second)  # round 2 continued from round 1's factors


def test_evaluate_reply_has_metric_sums_only(rec: Federation) -> None:
    context = _context(rec)
    rec.app(_request(rec, "train"), context)
    reply = rec.app(_request(rec, "evaluate"), context)
    assert not reply.content.array_records
    metrics = reply.content.metric_records[k.METRICS]
    users = metrics["num-eval-users"]
    assert users == metrics[k.REC_VAL_PREFIX + "num-eval-users"] == metrics[k.KEY_NUM_EXAMPLES]
    assert 0.0 <= float(metrics["hr10-sampled-sum"]) <= float(users)  # type: ignore[arg-type]


@parametrize_tasks
@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("lr", "fast", "lr must be a number"),
        ("local-epochs", 1.5, "local-epochs must be a whole number"),
        (k.KEY_TASK, "scoring", "unknown task 'scoring'"),
        (k.KEY_SEED, "forty-two", "expected an integer"),
    ],
    ids=["string-lr", "fractional-epochs", "unknown-task", "string-seed"],
)
def test_bad_settings_are_an_error_reply_naming_the_key(
    federation: Federation, key: str, value: object, reason: str
) -> None:
    request = _request(federation, "train")
    request.content.config_records[k.CONFIG][key] = value  # type: ignore[assignment]
    reply = federation.app(request, _context(federation))
    assert reply.has_error()
    assert reply.error.code == ErrorCode.BRANCH_DATA_FAILED
    assert reason in reply.error.reason


@pytest.mark.filterwarnings("ignore::fedcrm.privacy.InsecureRNGWarning")
def test_dp_train_reply_has_the_privacy_report_and_no_user_factors(rec: Federation) -> None:
    settings = replace(rec.settings, users_per_step=100, max_interactions_per_user=8)
    dp = DPSGDConfig(
        target_epsilon=8.0, delta=1e-5, model="recommender", purpose="recommendation-training"
    )
    context = _context(rec)
    request = _request(
        rec, "train", settings, **dp.to_run_config(include_ledger=False), **{k.KEY_NUM_ROUNDS: 2}
    )
    reply = rec.app(request, context)

    assert not reply.has_error(), reply.error
    report = PrivacyReport.from_record(dict(reply.content.config_records[k.PRIVACY]))
    assert report.admitted
    assert report.privacy_unit == "customer"
    assert (report.model, report.purpose) == ("recommender", "recommendation-training")
    assert 0.0 < report.epsilon <= 8.0
    assert report.delta == 1e-5
    assert report.steps == report.planned_steps > 0
    assert set(reply.content.array_records[k.ARRAYS].keys()) == {
        "items.embedding.weight",
        "items.bias.weight",
    }
    users = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"]
    wire = message_to_proto(reply).SerializeToString()
    for row in users.numpy():
        assert row.tobytes() not in wire
    # The branch's accountant persists in its own folder, under its key.
    assert list((rec.branches / "000" / "privacy").glob("*.accountant.json"))
