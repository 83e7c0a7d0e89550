"""The branch's Flower ClientApp for federated recommendations (matrix factorisation).

Per round the branch builds its view (its own users, split and sampled negatives), restores its
user factors from ``Context.state``, loads the server's item arrays, trains locally, keeps the
new user factors in ``Context.state`` (and, in a simulation, in its own folder of the run
directory, for ``fedcrm recommend``) and replies with the item arrays only.

Notes:
    User factors describe a branch's customers (Ammad-ud-din et al. 2019, arXiv:1901.09888).
    They never enter a message: the reply is built from `shared_state`, which reads only the
    model's item tower, and the server drops any reply with other keys.
"""

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from numpy.typing import NDArray

from fedcrm import constants as k
from fedcrm import rec_constants as rk
from fedcrm.data.movielens import BranchView
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import Loss, evaluate_branch, train_branch
from fedcrm.models.recommender import (
    MatrixFactorisation,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)
from fedcrm.simulation.rec_metrics import to_record

logger = logging.getLogger(__name__)

BranchLoader = Callable[[Context], BranchView]
"""Returns the view of the branch a node serves (from its node config or partition id)."""

T = TypeVar("T", int, float, str)


@dataclass(frozen=True)
class RecRoundSettings:
    """The server's instructions for a round, read once from the message's ConfigRecord."""

    seed: int
    server_round: int
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    factors: int
    negatives_per_positive: int
    loss: Loss
    top_k: int

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "RecRoundSettings":
        """Parse and type-check the ConfigRecord.

        Raises:
            ConfigError: A key is missing or has the wrong type.
        """

        def get(key: str, kind: type[T]) -> T:
            value = config.get(key)
            if value is None:
                raise ConfigError(f"server message lacks config key {key!r}")
            if isinstance(value, list | bytes | bool) or (
                kind is not str and isinstance(value, str)
            ):
                raise ConfigError(f"config key {key!r}: expected {kind.__name__}, got {value!r}")
            return kind(value)

        loss = get(rk.KEY_LOSS, str)
        if loss not in ("bce", "bpr"):
            raise ConfigError(f"config key {rk.KEY_LOSS!r} must be 'bce' or 'bpr', got {loss!r}")
        return cls(
            seed=get(k.KEY_SEED, int),
            server_round=int(config.get(k.KEY_SERVER_ROUND, 0)),  # type: ignore[arg-type]
            epochs=get(k.KEY_LOCAL_EPOCHS, int),
            lr=get(k.KEY_LR, float),
            batch_size=get(k.KEY_BATCH_SIZE, int),
            weight_decay=get(k.KEY_WEIGHT_DECAY, float),
            factors=get(rk.KEY_FACTORS, int),
            negatives_per_positive=get(rk.KEY_NEGATIVES, int),
            loss="bce" if loss == "bce" else "bpr",
            top_k=get(rk.KEY_TOP_K, int),
        )


def array_record(arrays: dict[str, NDArray[np.float32]]) -> ArrayRecord:
    """Wrap named NumPy arrays as an ArrayRecord, keeping the names and their order."""
    return ArrayRecord({key: Array(np.ascontiguousarray(a)) for key, a in arrays.items()})


def user_factors_path(branches_root: Path, branch_name: str) -> Path:
    """Where a simulated branch keeps its user factors: ``branches/<name>/user_factors.npz``."""
    return branches_root / branch_name / rk.USER_FACTORS_FILE


def save_user_factors(path: Path, arrays: dict[str, NDArray[np.float32]]) -> None:
    """Write a branch's user factors atomically (``.npz``, loaded with ``allow_pickle=False``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_user_factors(path: Path) -> dict[str, NDArray[np.float32]]:
    """Read user factors written by `save_user_factors`."""
    with np.load(path, allow_pickle=False) as stored:
        return {key: stored[key].astype(np.float32) for key in stored.files}


def _model(
    view: BranchView, settings: RecRoundSettings, msg: Message, context: Context
) -> MatrixFactorisation:
    model = MatrixFactorisation(
        len(view.global_users), view.split.n_items, settings.factors, seed=settings.seed
    )
    saved = context.state.array_records.get(rk.STATE_USER_FACTORS)
    if saved is not None:
        load_local_state(model, {key: a.numpy() for key, a in saved.items()})
    load_shared_state(
        model, {key: a.numpy() for key, a in msg.content.array_records[k.ARRAYS].items()}
    )
    return model


def make_rec_client_app(branches: BranchLoader, branches_root: Path | None = None) -> ClientApp:
    """Build the recommendation ClientApp.

    Args:
        branches: Gives the node's branch view.
        branches_root: The simulation's ``branches/`` folder: each branch writes its user
            factors to ``branches/<name>/user_factors.npz`` after training (``None``: only
            ``Context.state``).
    """
    app = ClientApp()

    def prepare(
        msg: Message, context: Context
    ) -> tuple[RecRoundSettings, BranchView, MatrixFactorisation]:
        torch.set_num_threads(1)  # simulated branches share the machine's cores
        settings = RecRoundSettings.from_config(msg.content.config_records[k.CONFIG])
        view = branches(context)
        return settings, view, _model(view, settings, msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, view, model = prepare(msg, context)
        seed = settings.seed + 1000 * settings.server_round + view.branch.branch_id
        out = train_branch(
            model,
            view.split.train,
            epochs=settings.epochs,
            lr=settings.lr,
            negatives_per_positive=settings.negatives_per_positive,
            seed=seed,
            weight_decay=settings.weight_decay,
            batch_size=settings.batch_size,
            loss=settings.loss,
        )
        users = local_state(model)
        context.state.array_records[rk.STATE_USER_FACTORS] = array_record(users)
        if branches_root is not None:
            save_user_factors(user_factors_path(branches_root, view.branch.name), users)
        loss = out.final_loss if out.epoch_losses else 0.0
        metrics = MetricRecord({k.KEY_NUM_EXAMPLES: out.num_examples, k.KEY_TRAIN_LOSS: loss})
        items = array_record(shared_state(model))
        return Message(RecordDict({k.ARRAYS: items, k.METRICS: metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings, view, model = prepare(msg, context)
        if rk.STATE_USER_FACTORS not in context.state.array_records:
            logger.warning("evaluating before any training: user factors are untrained")
        test = evaluate_branch(model, view.split, view.negatives, target="test", k=settings.top_k)
        val = evaluate_branch(model, view.split, view.negatives, target="val", k=settings.top_k)
        values: dict[str, int | float | list[int] | list[float]] = dict(to_record(test))
        values.update({rk.VAL_PREFIX + key: v for key, v in to_record(val).items()})
        return Message(RecordDict({k.METRICS: MetricRecord(values)}), reply_to=msg)

    return app
