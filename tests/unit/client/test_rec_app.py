"""The recommendation ClientApp: user factors stay on the branch, only item arrays leave."""

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedcrm import constants as k
from fedcrm.client.rec_app import (
    RecRoundSettings,
    load_user_factors,
    make_rec_client_app,
    user_factors_path,
)
from fedcrm.data.interactions import latest_items
from fedcrm.data.movielens import BranchView, branch_view, leave_one_out, sample_negatives
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.federated import PrivacyReport
from fedcrm.server.rec_federation import RecDPConfig, RecFederationConfig, initial_items
from fedcrm.simulation.rec_config import SyntheticRecConfig
from fedcrm.simulation.rec_runner import synthetic_rec_data

CFG = RecFederationConfig(num_rounds=1, local_epochs=1, factors=8, batch_size=256, seed=3)


@pytest.fixture(autouse=True, scope="module")
def _identity() -> Iterator[None]:
    torch.set_num_threads(1)
    saved = {n: getattr(TaskIdentity, n) for n in ("_run_id", "_task_id", "_node_id")}
    for name in saved:
        setattr(TaskIdentity, name, 1)
    yield
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def view() -> BranchView:
    data = synthetic_rec_data(SyntheticRecConfig(users=40, items=130, branches=2), seed=1)
    split = leave_one_out(data.interactions)
    return branch_view(data, split, sample_negatives(split, seed=1), 1)


def _context() -> Context:
    return Context(1, 5, {k.NODE_PARTITION_ID: 1}, RecordDict(), {})


def _request(kind: str, n_items: int) -> Message:
    content = RecordDict(
        {
            k.ARRAYS: initial_items(n_items, CFG.factors, seed=CFG.seed),
            k.CONFIG: CFG.to_config_record(),
        }
    )
    return Message(content=content, dst_node_id=5, message_type=kind)


def test_train_reply_holds_only_the_item_arrays(view: BranchView, tmp_path: Path) -> None:
    app = make_rec_client_app(lambda _ctx: view, tmp_path)
    context = _context()
    request = _request("train", view.split.n_items)
    reply = app(request, context)

    assert not reply.has_error()
    arrays = reply.content.array_records
    assert list(arrays) == [k.ARRAYS]
    assert set(arrays[k.ARRAYS].keys()) == {"items.embedding.weight", "items.bias.weight"}
    sent = request.content.array_records[k.ARRAYS]
    assert arrays[k.ARRAYS].count_bytes() == sent.count_bytes()
    payload = sum(a.numpy().nbytes for a in arrays[k.ARRAYS].values())
    assert payload == view.split.n_items * (CFG.factors + 1) * 4
    assert not reply.content.config_records

    # The user factors exist (node state and the branch folder) but are not in the wire bytes.
    state = context.state.array_records[k.STATE_REC_USER_FACTORS]
    users = state["users.embedding.weight"].numpy()
    assert users.shape == (len(view.global_users), CFG.factors)
    wire = message_to_proto(reply).SerializeToString()
    for row in users:
        assert row.tobytes() not in wire
    saved = load_user_factors(user_factors_path(tmp_path, view.branch.name))
    np.testing.assert_array_equal(saved["users.embedding.weight"], users)


def test_history_model_sends_its_shared_history_parameters_but_no_history(
    view: BranchView,
) -> None:
    cfg = replace(CFG, history_length=3)
    app = make_rec_client_app(lambda _ctx: view)
    context = _context()
    content = RecordDict(
        {
            k.ARRAYS: initial_items(view.split.n_items, cfg.factors, seed=cfg.seed, history=3),
            k.CONFIG: cfg.to_config_record(),
        }
    )
    reply = app(Message(content=content, dst_node_id=5, message_type="train"), context)

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
    recent = latest_items(view.split.train, 3)
    for row in recent[(recent >= 0).all(axis=1)]:
        assert row.tobytes() not in wire


def test_user_factors_persist_across_rounds(view: BranchView) -> None:
    app = make_rec_client_app(lambda _ctx: view)
    context = _context()
    app(_request("train", view.split.n_items), context)
    first = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"].numpy()
    app(_request("train", view.split.n_items), context)
    second = context.state.array_records[k.STATE_REC_USER_FACTORS]["users.embedding.weight"].numpy()
    assert not np.allclose(first, second)  # round 2 continued from round 1's factors


def test_evaluate_reply_has_metric_sums_only(view: BranchView) -> None:
    app = make_rec_client_app(lambda _ctx: view)
    context = _context()
    app(_request("train", view.split.n_items), context)
    reply = app(_request("evaluate", view.split.n_items), context)
    assert not reply.content.array_records
    metrics = reply.content.metric_records[k.METRICS]
    assert metrics["num-eval-users"] == len(view.split.eval_users)
    assert metrics[k.REC_VAL_PREFIX + "num-eval-users"] == len(view.split.eval_users)
    assert 0.0 <= float(metrics["hr10-sampled-sum"]) <= len(view.split.eval_users)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (k.KEY_REC_LOSS, "mse"),
        (k.KEY_LR, "fast"),
        (k.KEY_REC_FACTORS, None),
        (k.KEY_REC_HISTORY, "three"),
        (k.KEY_REC_HISTORY, -1),
    ],
    ids=["bad-loss", "string-lr", "missing-factors", "string-history", "negative-history"],
)
def test_round_settings_reject_bad_config(key: str, value: object) -> None:
    config = CFG.to_config_record()
    if value is None:
        del config[key]
    else:
        config[key] = value  # type: ignore[assignment]
    with pytest.raises(ConfigError):
        RecRoundSettings.from_config(config)


@pytest.mark.filterwarnings("ignore::fedcrm.privacy.dp_sgd.InsecureRNGWarning")
def test_dp_train_reply_has_the_privacy_report_and_no_user_factors(
    view: BranchView, tmp_path: Path
) -> None:
    dp = RecDPConfig(
        target_epsilon=8.0, delta=1e-5, users_per_step=100, max_interactions_per_user=8
    )
    app = make_rec_client_app(lambda _ctx: view, tmp_path)
    context = _context()
    request = _request("train", view.split.n_items)
    request.content.config_records[k.CONFIG].update(dp.config_values(num_rounds=2))
    reply = app(request, context)

    assert not reply.has_error()
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
    # The branch's accountant persists in its own folder.
    assert list((tmp_path / view.branch.name / "privacy").glob("*.accountant.json"))
