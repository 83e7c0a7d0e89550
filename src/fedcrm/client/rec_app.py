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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from numpy.typing import NDArray

from fedcrm import constants as k
from fedcrm.client.rec_dp_round import RecDPRound, private_rec_round
from fedcrm.data.movielens import BranchView, LeaveOneOutSplit
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.models.rec_training import Loss, evaluate_branch, train_branch
from fedcrm.models.recommender import (
    MatrixFactorisation,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.simulation.rec_metrics import to_record

logger = logging.getLogger(__name__)

BranchLoader = Callable[[Context], BranchView]
"""Returns the view of the branch a node serves (from its node config or partition id)."""

T = TypeVar("T", int, float, str)

DP_ERROR_CODE: Final = 7101
"""Error code of a train reply whose DP round could not run (no parameters leave)."""


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
    recency_halflife: float = 0.0
    train_on_validation: bool = False
    history_length: int = 0

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

        train_on_validation = config.get(k.KEY_REC_TRAIN_ON_VALIDATION, False)
        if not isinstance(train_on_validation, bool):
            raise ConfigError(f"config key {k.KEY_REC_TRAIN_ON_VALIDATION!r} must be a bool")
        halflife = config.get(k.KEY_REC_RECENCY_HALFLIFE, 0.0)
        if isinstance(halflife, bool) or not isinstance(halflife, int | float):
            raise ConfigError(f"config key {k.KEY_REC_RECENCY_HALFLIFE!r} must be a number")
        history = config.get(k.KEY_REC_HISTORY, 0)
        if isinstance(history, bool) or not isinstance(history, int) or history < 0:
            raise ConfigError(f"config key {k.KEY_REC_HISTORY!r} must be an integer >= 0")
        loss = get(k.KEY_REC_LOSS, str)
        if loss not in ("bce", "bpr"):
            raise ConfigError(f"config key {k.KEY_REC_LOSS!r} must be 'bce' or 'bpr', got {loss!r}")
        return cls(
            seed=get(k.KEY_SEED, int),
            server_round=int(config.get(k.KEY_SERVER_ROUND, 0)),  # type: ignore[arg-type]
            epochs=get(k.KEY_LOCAL_EPOCHS, int),
            lr=get(k.KEY_LR, float),
            batch_size=get(k.KEY_BATCH_SIZE, int),
            weight_decay=get(k.KEY_WEIGHT_DECAY, float),
            factors=get(k.KEY_REC_FACTORS, int),
            negatives_per_positive=get(k.KEY_REC_NEGATIVES, int),
            loss="bce" if loss == "bce" else "bpr",
            top_k=get(k.KEY_REC_TOP_K, int),
            recency_halflife=float(halflife),
            train_on_validation=train_on_validation,
            history_length=history,
        )


def array_record(arrays: dict[str, NDArray[np.float32]]) -> ArrayRecord:
    """Wrap named NumPy arrays as an ArrayRecord, keeping the names and their order."""
    return ArrayRecord({key: Array(np.ascontiguousarray(a)) for key, a in arrays.items()})


def user_factors_path(branches_root: Path, branch_name: str) -> Path:
    """Where a simulated branch keeps its user factors: ``branches/<name>/user_factors.npz``."""
    return branches_root / branch_name / k.REC_USER_FACTORS_FILE


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


def training_split(view: BranchView, settings: RecRoundSettings) -> LeaveOneOutSplit:
    """The branch's split as this run trains on it (with validation items in a final fit)."""
    return view.split.with_validation_in_train() if settings.train_on_validation else view.split


def _model(
    view: BranchView, settings: RecRoundSettings, msg: Message, context: Context
) -> MatrixFactorisation:
    model = MatrixFactorisation(
        len(view.global_users),
        view.split.n_items,
        settings.factors,
        context=settings.history_length,
        seed=settings.seed,
    )
    saved = context.state.array_records.get(k.STATE_REC_USER_FACTORS)
    if saved is not None:
        load_local_state(model, {key: a.numpy() for key, a in saved.items()})
    load_shared_state(
        model, {key: a.numpy() for key, a in msg.content.array_records[k.ARRAYS].items()}
    )
    return model


def make_rec_client_app(
    branches: BranchLoader, branches_root: Path | None = None, *, mods: Sequence[Mod] = ()
) -> ClientApp:
    """Build the recommendation ClientApp.

    Args:
        branches: Gives the node's branch view.
        branches_root: The simulation's ``branches/`` folder: each branch writes its user
            factors to ``branches/<name>/user_factors.npz`` after training (``None``: only
            ``Context.state``).
        mods: Flower mods around the handlers, outermost first: under HE
            ``[fedcrm.client.he_mod.HEMod(key_dir)]``, which hands ``train`` the decrypted item
            arrays and replaces the reply's arrays by the encrypted update.
    """
    app = ClientApp(mods=list(mods))

    def prepare(
        msg: Message, context: Context
    ) -> tuple[RecRoundSettings, BranchView, MatrixFactorisation]:
        torch.set_num_threads(1)  # simulated branches share the machine's cores
        settings = RecRoundSettings.from_config(msg.content.config_records[k.CONFIG])
        view = branches(context)
        return settings, view, _model(view, settings, msg, context)

    def keep_user_factors(view: BranchView, model: MatrixFactorisation, context: Context) -> None:
        users = local_state(model)
        context.state.array_records[k.STATE_REC_USER_FACTORS] = array_record(users)
        if branches_root is not None:
            save_user_factors(user_factors_path(branches_root, view.branch.name), users)

    def train_private(
        msg: Message,
        context: Context,
        settings: RecRoundSettings,
        view: BranchView,
        model: MatrixFactorisation,
        dp: FederatedDPConfig,
    ) -> Message:
        config = msg.content.config_records[k.CONFIG]
        try:
            local = RecDPRound(
                epochs=settings.epochs,
                lr=settings.lr,
                negatives_per_positive=settings.negatives_per_positive,
                weight_decay=settings.weight_decay,
                batch_size=settings.batch_size,
                loss=settings.loss,
                recency_halflife=settings.recency_halflife,
                users_per_step=int(config[k.KEY_REC_DP_USERS_PER_STEP]),  # type: ignore[arg-type]
                cap=int(config[k.KEY_REC_DP_CAP]),  # type: ignore[arg-type]
                rounds=int(config[k.KEY_NUM_ROUNDS]),  # type: ignore[arg-type]
                seed=settings.seed + 1000 * settings.server_round + view.branch.branch_id,
            )
            privacy_dir = Path(
                str(
                    context.node_config.get(
                        k.NODE_PRIVACY_DIR,
                        (branches_root or Path(".")) / view.branch.name / "privacy",
                    )
                )
            )
            out = private_rec_round(
                model,
                training_split(view, settings).train,
                local,
                dp=dp,
                privacy_dir=privacy_dir,
                branch_name=view.branch.name,
            )
        except (FedCrmError, KeyError, ValueError) as exc:
            logger.error("recommender DP round could not run: %s", exc)
            error = Error(code=DP_ERROR_CODE, reason=f"DP round not run: {exc}")
            return Message(error, reply_to=msg)
        privacy = ConfigRecord(out.report.to_record())  # type: ignore[arg-type]
        if not out.trained:  # refused: nothing trained, nothing but the report leaves
            return Message(RecordDict({k.PRIVACY: privacy}), reply_to=msg)
        keep_user_factors(view, model, context)
        metrics = MetricRecord({k.KEY_NUM_EXAMPLES: out.num_examples, k.KEY_TRAIN_LOSS: 0.0})
        items = array_record(shared_state(model))
        content = RecordDict({k.ARRAYS: items, k.METRICS: metrics, k.PRIVACY: privacy})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, view, model = prepare(msg, context)
        dp = FederatedDPConfig.from_run_config(dict(msg.content.config_records[k.CONFIG]))
        if dp is not None:
            return train_private(msg, context, settings, view, model, dp)
        seed = settings.seed + 1000 * settings.server_round + view.branch.branch_id
        out = train_branch(
            model,
            training_split(view, settings).train,
            epochs=settings.epochs,
            lr=settings.lr,
            negatives_per_positive=settings.negatives_per_positive,
            seed=seed,
            weight_decay=settings.weight_decay,
            batch_size=settings.batch_size,
            loss=settings.loss,
            recency_halflife=settings.recency_halflife,
        )
        keep_user_factors(view, model, context)
        loss = out.final_loss if out.epoch_losses else 0.0
        metrics = MetricRecord({k.KEY_NUM_EXAMPLES: out.num_examples, k.KEY_TRAIN_LOSS: loss})
        items = array_record(shared_state(model))
        return Message(RecordDict({k.ARRAYS: items, k.METRICS: metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings, view, model = prepare(msg, context)
        if k.STATE_REC_USER_FACTORS not in context.state.array_records:
            logger.warning("evaluating before any training: user factors are untrained")
        split = training_split(view, settings)
        test = evaluate_branch(model, split, view.negatives, target="test", k=settings.top_k)
        val = evaluate_branch(model, split, view.negatives, target="val", k=settings.top_k)
        values: dict[str, int | float | list[int] | list[float]] = dict(to_record(test))
        values.update({k.REC_VAL_PREFIX + key: v for key, v in to_record(val).items()})
        return Message(RecordDict({k.METRICS: MetricRecord(values)}), reply_to=msg)

    return app
