"""The branch's Flower ClientApp: federated statistics, local training and local evaluation.

Settings come from the server's message (schema, seed, optimiser, shared scaler); where the
branch's data lives comes from its own node config (``data-path``, ``key-path``), or, in a
simulation, from the branch directory for its ``partition-id``.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedcrm import constants as k
from fedcrm.client import branch
from fedcrm.data.preprocess import Scaler
from fedcrm.data.schema import ChurnSchema, get_schema
from fedcrm.data.split import Split
from fedcrm.exceptions import ConfigError
from fedcrm.models.churn import TrainSettings

logger = logging.getLogger(__name__)

T = TypeVar("T", int, float, str)


def branch_dir(root: Path, partition_id: int) -> Path:
    """Folder of simulated branch number ``partition_id`` under a run's ``branches/``."""
    return root / f"{partition_id:03d}"


def resolve_data(context: Context, branches_root: Path | None) -> branch.BranchData:
    """Find this branch's export from its node config (deployment) or partition id (simulation).

    Raises:
        ConfigError: The node has neither a ``data-path`` nor a simulated partition.
    """
    node = context.node_config
    if k.NODE_DATA_PATH in node:
        key = node.get(k.NODE_KEY_PATH)
        return branch.BranchData(Path(str(node[k.NODE_DATA_PATH])), Path(str(key)) if key else None)
    if branches_root is not None and k.NODE_PARTITION_ID in node:
        folder = branch_dir(branches_root, int(node[k.NODE_PARTITION_ID]))
        return branch.BranchData(folder / "export.parquet")
    raise ConfigError(
        "this SuperNode has no data: start it with --node-config 'data-path=\"/path/export.csv\"'"
    )


@dataclass(frozen=True)
class RoundSettings:
    """The server's instructions for this round, read once from the message's ConfigRecord."""

    schema: ChurnSchema
    seed: int
    server_round: int
    scaler: Scaler | None
    train: TrainSettings

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "RoundSettings":
        """Parse and type-check the ConfigRecord.

        Raises:
            ConfigError: A key is missing or has the wrong type.
        """

        def get(key: str, kind: type[T], default: T | None = None) -> T:
            value = config.get(key, default)
            if value is None:
                raise ConfigError(f"server message lacks config key {key!r}")
            if isinstance(value, list | bytes) or (kind is not str and isinstance(value, str)):
                raise ConfigError(f"config key {key!r}: expected {kind.__name__}, got {value!r}")
            return kind(value)

        scaler = None
        if k.KEY_SCALER_MEAN in config:
            scaler = Scaler(
                np.asarray(config[k.KEY_SCALER_MEAN], dtype=np.float64),
                np.asarray(config[k.KEY_SCALER_STD], dtype=np.float64),
            )
        return cls(
            schema=get_schema(get(k.KEY_SCHEMA, str)),
            seed=get(k.KEY_SEED, int, 42),
            server_round=get(k.KEY_SERVER_ROUND, int, 0),
            scaler=scaler,
            train=TrainSettings(
                epochs=get(k.KEY_LOCAL_EPOCHS, int, 1),
                batch_size=get(k.KEY_BATCH_SIZE, int, 32),
                lr=get(k.KEY_LR, float, 1e-3),
                weight_decay=get(k.KEY_WEIGHT_DECAY, float, 0.0),
                proximal_mu=get(k.KEY_PROXIMAL_MU, float, 0.0),
                optimizer="adam" if get(k.KEY_OPTIMIZER, str, "sgd") == "adam" else "sgd",
                momentum=get(k.KEY_MOMENTUM, float, 0.9),
            ),
        )

    def require_scaler(self) -> Scaler:
        """The shared scaler (train and evaluate messages always carry it).

        Raises:
            ConfigError: The message carried no scaler.
        """
        if self.scaler is None:
            raise ConfigError("server message lacks the federated scaler")
        return self.scaler


def make_client_app(branches_root: Path | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """Build the ClientApp.

    Args:
        branches_root: The simulation's ``branches/`` folder (``None`` in a deployment).
        mods: Flower mods wrapped around every handler (e.g. encrypt-before-send).
    """
    app = ClientApp(mods=list(mods))

    def prepare(msg: Message, context: Context) -> tuple[RoundSettings, Split]:
        torch.set_num_threads(1)  # simulated branches share the machine's cores
        settings = RoundSettings.from_config(msg.content.config_records[k.CONFIG])
        split = resolve_data(context, branches_root).load(settings.schema, seed=settings.seed)
        return settings, split

    @app.query(k.ACTION_MOMENTS)
    def query_moments(msg: Message, context: Context) -> Message:
        settings, split = prepare(msg, context)
        values = branch.moments(split, settings.schema).to_list()
        record = MetricRecord({k.KEY_MOMENTS: values, k.KEY_NUM_EXAMPLES: len(split.train)})
        return Message(RecordDict({k.METRICS: record}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        settings, split = prepare(msg, context)
        # A different shuffling seed per round and branch, reproducible from the run seed.
        seed = settings.seed + 1000 * settings.server_round + context.node_id % 1000
        global_state = msg.content.array_records[k.ARRAYS].to_torch_state_dict()
        out = branch.train(
            split,
            settings.schema,
            settings.require_scaler(),
            global_state,
            settings.train,
            seed=seed,
        )
        metrics = MetricRecord(
            {k.KEY_NUM_EXAMPLES: out.num_examples, k.KEY_TRAIN_LOSS: out.train_loss}
        )
        content = RecordDict({k.ARRAYS: ArrayRecord(out.state_dict), k.METRICS: metrics})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        settings, split = prepare(msg, context)
        global_state = msg.content.array_records[k.ARRAYS].to_torch_state_dict()
        out = branch.evaluate(split, settings.schema, settings.require_scaler(), global_state)
        metrics = MetricRecord(
            {
                k.KEY_NUM_EXAMPLES: out.num_examples,
                k.KEY_LOSS_SUM: out.loss_sum,
                k.KEY_BRANCH_AUC: out.branch_auc,
                k.KEY_HIST_VAL_POS: out.val.pos.tolist(),
                k.KEY_HIST_VAL_NEG: out.val.neg.tolist(),
                k.KEY_HIST_TEST_POS: out.test.pos.tolist(),
                k.KEY_HIST_TEST_NEG: out.test.neg.tolist(),
            }
        )
        return Message(RecordDict({k.METRICS: metrics}), reply_to=msg)

    return app


app = make_client_app()
"""The ClientApp for Flower's deployment engine (``fedcrm.client.app:app``)."""
