"""The branch's Flower ClientApp: federated statistics, local training and local evaluation.

Settings come from the server's message (schema, seed, optimiser, shared scaler); where the
branch's data lives comes from its own node config (``data-path``, ``key-path``), or, in a
simulation, from the branch directory for its ``partition-id``.

In a DP run (the train message carries ``dp-target-epsilon``) the branch trains with
record-level DP-SGD under its own enforced budget (`fedcrm.client.dp_round`); its accountants
live in ``privacy-dir`` (node config; default ``privacy/`` beside the data, or in the simulated
branch's folder). A round over budget is answered with a refusal report and no parameters.

In a run that declares a purpose (``consent-purpose``) every message first goes through the
branch's consent gate (`fedcrm.client.consent_gate`): only rows with valid consent for the
purpose are used, a training reply carries the round manifest's root, and a branch whose data or
consent does not cover the purpose refuses the run (a structured refusal, no parameters).
The registry is the node's ``consent-db`` (in a simulation, the run's compliance store).
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedcrm import constants as k
from fedcrm.client import branch, dp_round
from fedcrm.client.central_dp_mod import central_clipping_mod
from fedcrm.client.consent_gate import (
    CONSENT_ERROR_CODE,
    CONSENT_REFUSED_CODE,
    BranchConsent,
    apply_gate,
    commit_round,
    consent_url,
    parse_purposes,
)
from fedcrm.client.he_mod import HEMod
from fedcrm.client.secagg_client import secagg_mod
from fedcrm.compliance import Purpose
from fedcrm.compliance.manifest import ConsentRefusal, RoundManifest
from fedcrm.data.preprocess import Scaler
from fedcrm.data.schema import ChurnSchema, get_schema
from fedcrm.data.split import Split
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.models.churn import TrainSettings
from fedcrm.privacy.accounting import NoisePlan
from fedcrm.privacy.config import DPConfig
from fedcrm.privacy.federated import FederatedDPConfig

logger = logging.getLogger(__name__)

T = TypeVar("T", int, float, str)


def branch_dir(root: Path, partition_id: int) -> Path:
    """Folder of simulated branch number ``partition_id`` under a run's ``branches/``."""
    return root / f"{partition_id:03d}"


def _branch_number(context: Context) -> int:
    """The simulated branch's partition id (stable across runs), else the SuperNode's id."""
    partition = context.node_config.get(k.NODE_PARTITION_ID)
    return int(partition) if isinstance(partition, int) else context.node_id


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


DP_ERROR_CODE = 4301
"""Error code of a DP round that could not be set up (bad settings, corrupted accountant)."""
_PLAN_STATE = "dp-plan"


def _branch_info(context: Context, branches_root: Path | None, folder: Path) -> dict[str, object]:
    """A simulated branch's ``branch.json`` (empty in a deployment)."""
    info = folder / "branch.json"
    if k.NODE_DATA_PATH in context.node_config or branches_root is None or not info.is_file():
        return {}
    data = json.loads(info.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def branch_name(context: Context, branches_root: Path | None, folder: Path) -> str:
    """The branch's name in the ledger, the consent registry and its manifests.

    Node config ``branch-name``; else, simulated, the name in ``branch.json``; else
    ``node-<id>``.
    """
    node = context.node_config
    if k.NODE_BRANCH_NAME in node:
        return str(node[k.NODE_BRANCH_NAME])
    if k.NODE_DATA_PATH not in node and branches_root is not None:
        return str(_branch_info(context, branches_root, folder).get("name", folder.name))
    return f"node-{context.node_id}"


def resolve_consent(
    context: Context, branches_root: Path | None, data: branch.BranchData, url: str | None
) -> BranchConsent:
    """Where this branch's consent registry, salts and manifests are, and what it collects for.

    Deployment: node config ``consent-db``, ``consent-dir`` (default ``consent/`` beside the
    export), ``purposes`` and ``retention-days``. Simulation: the run's compliance store
    (``url``), the branch's folder and the purposes in its ``branch.json``.

    Raises:
        ConfigError: The node has no consent registry, or a setting is invalid.
    """
    node = context.node_config
    folder = data.export.parent
    if k.NODE_CONSENT_DB in node:
        url = consent_url(str(node[k.NODE_CONSENT_DB]))
    if url is None:
        raise ConfigError(
            "this run declares a purpose but the branch has no consent registry: start the "
            "SuperNode with --node-config 'consent-db=\"/srv/crm/consent.db\"'"
        )
    declared = _branch_info(context, branches_root, folder).get("purposes")
    purposes = node.get(k.NODE_PURPOSES, declared)
    if isinstance(purposes, list):
        purposes = ",".join(str(p) for p in purposes)
    retention = node.get(k.NODE_RETENTION_DAYS)
    if retention is not None and (not isinstance(retention, int | float) or retention <= 0):
        raise ConfigError(f"retention-days must be a positive number, got {retention!r}")
    return BranchConsent(
        url=url,
        branch=branch_name(context, branches_root, folder),
        folder=Path(str(node.get(k.NODE_CONSENT_DIR, folder / "consent"))),
        collected=None if purposes is None else parse_purposes(str(purposes)),
        retention=None if retention is None else timedelta(days=float(retention)),
    )


def resolve_privacy(
    context: Context, branches_root: Path | None, data: branch.BranchData
) -> dp_round.BranchDPContext:
    """Where this branch keeps its accountants, and its name in the privacy ledger.

    Deployment: ``privacy-dir`` and ``branch-name`` from the node config (defaults:
    ``privacy/`` beside the export, ``node-<id>``). Simulation: the branch's folder and the
    name in its ``branch.json``.
    """
    node = context.node_config
    folder = data.export.parent
    name = branch_name(context, branches_root, folder)
    privacy_dir = Path(str(node.get(k.NODE_PRIVACY_DIR, folder / "privacy")))
    key = data.key_path.read_bytes() if data.key_path is not None else None
    return dp_round.BranchDPContext(privacy_dir, name, dp_round.accountant_key(key))


@dataclass(frozen=True)
class RoundSettings:
    """The server's instructions for this round, read once from the message's ConfigRecord."""

    schema: ChurnSchema
    seed: int
    server_round: int
    scaler: Scaler | None
    train: TrainSettings
    num_rounds: int = 1
    dp: FederatedDPConfig | None = None
    """Record-level DP settings of the run; ``None`` in a run without DP."""
    purpose: Purpose | None = None
    """The run's declared purpose; ``None``: the run is not consent-gated."""
    run_id: str = "run"

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
        purpose = config.get(k.KEY_CONSENT_PURPOSE)
        if purpose is not None:
            try:
                purpose = Purpose(str(purpose))
            except ValueError as exc:
                raise ConfigError(f"unknown run purpose {purpose!r}") from exc
        return cls(
            purpose=purpose,
            run_id=get(k.KEY_RUN_ID, str, "run"),
            num_rounds=get(k.KEY_NUM_ROUNDS, int, 1),
            dp=FederatedDPConfig.from_run_config(config),
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


def _refusal_reply(msg: Message, refusal: ConsentRefusal, *, train: bool) -> Message:
    """Refuse the run: a structured refusal for training and statistics, else an Error.

    The coordinator records and audits the structured refusal of a training round or of the
    statistics query; an evaluation reply carries an Error.
    """
    logger.warning("consent gate: the branch refuses the run: %s", refusal.reason)
    if train or msg.metadata.message_type.startswith(MessageType.QUERY):
        record = ConfigRecord(refusal.to_record())  # type: ignore[arg-type]
        return Message(RecordDict({k.CONSENT: record}), reply_to=msg)
    error = Error(code=CONSENT_REFUSED_CODE, reason=f"consent: {refusal.code}: {refusal.reason}")
    return Message(error, reply_to=msg)


def make_client_app(
    branches_root: Path | None = None,
    *,
    mods: Sequence[Mod] = (),
    consent_db: str | None = None,
) -> ClientApp:
    """Build the ClientApp.

    Args:
        branches_root: The simulation's ``branches/`` folder (``None`` in a deployment).
        mods: Flower mods wrapped around every handler (e.g. encrypt-before-send).
        consent_db: The simulated branches' consent registry (the run's compliance store);
            a deployed branch names its own with node config ``consent-db``.
    """
    app = ClientApp(mods=list(mods))

    def prepare(
        msg: Message, context: Context, *, train: bool = False
    ) -> tuple[RoundSettings, Split, RoundManifest | None] | Message:
        """Settings and rows of a message, consent-gated when the run declares a purpose.

        Returns the round manifest for training, or instead the reply of a branch that
        refuses the run (or cannot read its consent).
        """
        torch.set_num_threads(1)  # simulated branches share the machine's cores
        settings = RoundSettings.from_config(msg.content.config_records[k.CONFIG])
        data = resolve_data(context, branches_root)
        split = data.load(settings.schema, seed=settings.seed)
        if settings.purpose is None:
            return settings, split, None
        try:
            consent = resolve_consent(context, branches_root, data, consent_db)
            gate = apply_gate(
                split,
                id_column=settings.schema.id_column,
                purpose=settings.purpose,
                consent=consent,
                at=datetime.now(UTC),
            )
        except FedCrmError as exc:
            logger.error("consent gate could not run: %s", exc)
            error = Error(code=CONSENT_ERROR_CODE, reason=f"consent gate not run: {exc}")
            return Message(error, reply_to=msg)
        if isinstance(gate, ConsentRefusal):
            return _refusal_reply(msg, gate, train=train)
        manifest = None
        if train:
            manifest = commit_round(
                gate,
                id_column=settings.schema.id_column,
                consent=consent,
                run_id=settings.run_id,
                server_round=settings.server_round,
            )
        return settings, gate.split, manifest

    def with_manifest(reply: Message, manifest: RoundManifest | None) -> Message:
        """Attach the round manifest (root and counts, never ids) to a training reply."""
        if manifest is not None and not reply.has_error():
            record = ConfigRecord(manifest.to_record())  # type: ignore[arg-type]
            reply.content.config_records[k.CONSENT] = record
        return reply

    @app.query(k.ACTION_MOMENTS)
    def query_moments(msg: Message, context: Context) -> Message:
        prepared = prepare(msg, context)
        if isinstance(prepared, Message):
            return prepared
        settings, split, _ = prepared
        values = branch.moments(split, settings.schema).to_list()
        record = MetricRecord({k.KEY_MOMENTS: values, k.KEY_NUM_EXAMPLES: len(split.train)})
        return Message(RecordDict({k.METRICS: record}), reply_to=msg)

    def plan(
        context: Context, dp: FederatedDPConfig, settings: RoundSettings, num_rows: int
    ) -> tuple[DPConfig, NoisePlan]:
        """Plan the noise once per federation; cached in the node's context state."""
        fingerprint = json.dumps(
            [
                dp.to_run_config(include_ledger=False),
                num_rows,
                settings.train.batch_size,
                settings.train.epochs,
                settings.num_rounds,
            ],
            sort_keys=True,
        )
        cached = context.state.config_records.get(_PLAN_STATE)
        if cached is not None and cached.get("fingerprint") == fingerprint:
            config = dp.for_branch(
                num_rows=num_rows,
                batch_size=settings.train.batch_size,
                local_epochs=settings.train.epochs,
                rounds=settings.num_rounds,
            )
            return config, NoisePlan(**json.loads(str(cached["plan"])))
        config, noise = dp_round.plan_branch(
            dp, num_rows=num_rows, settings=settings.train, rounds=settings.num_rounds
        )
        context.state.config_records[_PLAN_STATE] = ConfigRecord(
            {"fingerprint": fingerprint, "plan": json.dumps(asdict(noise))}
        )
        logger.info(
            "DP noise planned for %d rounds: sigma %.4f, q %.5f, %d steps/round, epsilon %.4f",
            settings.num_rounds,
            noise.noise_multiplier,
            noise.sample_rate,
            noise.steps_per_round,
            noise.planned_epsilon,
        )
        return config, noise

    def train_private(
        msg: Message, context: Context, settings: RoundSettings, split: Split
    ) -> Message:
        dp = settings.dp
        if dp is None:  # pragma: no cover - guarded by the caller
            raise ConfigError("not a DP run")
        data = resolve_data(context, branches_root)
        try:
            config, noise = plan(context, dp, settings, len(split.train))
            out = dp_round.private_round(
                split,
                settings.schema,
                settings.require_scaler(),
                msg.content.array_records[k.ARRAYS].to_torch_state_dict(),
                settings.train,
                dp=dp,
                config=config,
                plan=noise,
                where=resolve_privacy(context, branches_root, data),
            )
        except FedCrmError as exc:
            logger.error("DP round could not run: %s", exc)
            error = Error(code=DP_ERROR_CODE, reason=f"DP round not run: {exc}")
            return Message(error, reply_to=msg)
        report = out.report
        privacy = ConfigRecord(report.to_record())  # type: ignore[arg-type]
        if out.state_dict is None:  # refused: no training happened, no parameters leave
            return Message(RecordDict({k.PRIVACY: privacy}), reply_to=msg)
        metrics = MetricRecord(
            {
                k.KEY_NUM_EXAMPLES: out.num_examples,
                k.KEY_DP_EPSILON_ROUND: report.epsilon_round,
                k.KEY_DP_EPSILON: report.epsilon,
                k.KEY_DP_SIGMA: report.noise_multiplier,
                k.KEY_DP_SAMPLE_RATE: report.sample_rate,
                k.KEY_DP_STEPS: report.steps,
                k.KEY_DP_DELTA_USED: report.delta,
            }
        )
        content = RecordDict(
            {k.ARRAYS: ArrayRecord(out.state_dict), k.METRICS: metrics, k.PRIVACY: privacy}
        )
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        prepared = prepare(msg, context, train=True)
        if isinstance(prepared, Message):
            return prepared
        settings, split, manifest = prepared
        # A different shuffling seed per round and branch, reproducible from the run seed.
        seed = settings.seed + 1000 * settings.server_round + _branch_number(context) % 1000
        if settings.dp is not None:
            return with_manifest(train_private(msg, context, settings, split), manifest)
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
        return with_manifest(Message(content, reply_to=msg), manifest)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        prepared = prepare(msg, context)
        if isinstance(prepared, Message):
            return prepared
        settings, split, _ = prepared
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


app = make_client_app(mods=[central_clipping_mod, secagg_mod, HEMod()])
"""The ClientApp for Flower's deployment engine (``fedcrm.client.app:app``).

Every mod passes through messages of other modes: SecAgg+ rounds need nothing on the branch, HE
rounds need the branch's key directory in node config ``he-key-dir``, and client-side central DP
clips (as the run config's ``central-dp-mode`` says) only train messages that carry a clipping
norm. The clipping mod comes first, so it is the last to touch the parameters."""
