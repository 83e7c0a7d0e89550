"""The federated recommendation round loop the ServerApp runs on a Flower Grid.

Matrix factorisation as in Ammad-ud-din et al. 2019 ("Federated Collaborative Filtering",
arXiv:1901.09888): every branch keeps its customers' user factors; only the item factors and
item biases travel, and Flower's `FedAvg` (McMahan et al. 2017, arXiv:1602.05629) averages them,
weighted by each branch's number of training interactions. After each round every branch ranks
its users' validation and test items (99 sampled negatives and the full catalogue); the server
adds the branches' sums (`fedcrm.simulation.rec_metrics.pool`), which equals evaluating all
users at once.

Replies are checked before aggregation: a train reply whose ArrayRecord holds anything but the
item keys (for example user factors) is dropped and logged, never averaged.

Encrypted aggregation (``[aggregation] mode = "he"``, `RecHEConfig`): Flower's `FedAvg` is
wrapped in `fedcrm.strategies.he.HEAggregation`, the same wrapper the churn task uses, and every
branch runs `fedcrm.client.he_mod.HEMod`. A branch then sends
``enc(n_k / 100 * (items_k - items_{t-1}))`` under CKKS and no ArrayRecord at all; the server
checks each reply's ciphertext envelope, adds the ciphertexts with the public context and keeps
the sum as a ciphertext checkpoint. It never holds a branch's plaintext item update, nor after
round 0 the plaintext item tower: `RecFederationResult.items` is then empty, and whoever holds
the secret key replays `RecFederationResult.checkpoints` from `RecFederationResult.initial`
(`fedcrm.strategies.he.replay_global_model`). The item tower is handled as a generic mapping
of named arrays (whatever `shared_state` returns), flattened in its order.
"""

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from numpy.typing import NDArray

from fedcrm import constants as k
from fedcrm.compliance import PrivacyLedger
from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies
from fedcrm.models.rec_training import DEFAULT_K, RankingMetrics
from fedcrm.models.recommender import MatrixFactorisation, shared_state
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.privacy.he import HEContext
from fedcrm.server.federation import screen_private_replies
from fedcrm.simulation.rec_metrics import from_record, pool
from fedcrm.strategies.he import HE_RECORD, Checkpoint, HEAggregation

logger = logging.getLogger(__name__)

Loss = Literal["bce", "bpr"]
MAX_HISTORY: Final = 50
"""Longest history context a recommendation run accepts (items per user vector)."""


@dataclass(frozen=True)
class RecFederationConfig:
    """Settings of a federated recommendation run (sent to branches in each round's config).

    Attributes:
        num_rounds: Federated rounds.
        local_epochs: Local epochs per branch and round.
        lr: Adam learning rate of the local training.
        factors: Latent dimension of user and item factors.
        negatives_per_positive: Sampled training negatives per positive.
        weight_decay: Per-batch L2 penalty (see `fedcrm.models.rec_training.train_branch`).
        batch_size: Examples per local step.
        loss: ``"bce"`` or ``"bpr"``.
        seed: Seed of the item initialisation and of local sampling.
        top_k: Cut-off of HR@k and NDCG@k.
        round_timeout: Seconds to wait for the branches in each round.
        recency_halflife: Time weighting of each user's training events, in events (see
            `fedcrm.models.rec_training.recency_weights`; 0: off).
        train_on_validation: The final fit: branches also train on their users' validation
            items (`fedcrm.data.movielens.LeaveOneOutSplit.with_validation_in_train`). Choose
            the settings and ``num_rounds`` on a run without it first: validation metrics are
            no longer held out, and the model is the last round's.
        history_length: Items of each user's latest earlier events in their user vector
            (`fedcrm.models.recommender.MatrixFactorisation` ``context``; 0: plain MF).
    """

    num_rounds: int = 20
    local_epochs: int = 2
    lr: float = 0.01
    factors: int = 64
    negatives_per_positive: int = 4
    weight_decay: float = 0.001
    batch_size: int = 4096
    loss: Loss = "bce"
    seed: int = 0
    top_k: int = DEFAULT_K
    round_timeout: float = 600.0
    recency_halflife: float = 0.0
    train_on_validation: bool = False
    history_length: int = 0

    def __post_init__(self) -> None:
        ints = {
            "num_rounds": self.num_rounds,
            "local_epochs": self.local_epochs,
            "factors": self.factors,
            "negatives_per_positive": self.negatives_per_positive,
            "batch_size": self.batch_size,
            "top_k": self.top_k,
        }
        bad = sorted(name for name, value in ints.items() if value < 1)
        if bad:
            raise ConfigError(f"{', '.join(bad)} must be >= 1")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.loss not in ("bce", "bpr"):
            raise ConfigError(f"loss must be 'bce' or 'bpr', got {self.loss!r}")
        if not (math.isfinite(self.recency_halflife) and self.recency_halflife >= 0):
            raise ConfigError(
                f"recency_halflife must be a finite number >= 0, got {self.recency_halflife}"
            )
        if isinstance(self.history_length, bool) or not (
            isinstance(self.history_length, int) and 0 <= self.history_length <= MAX_HISTORY
        ):
            raise ConfigError(
                f"history_length must be an integer in [0, {MAX_HISTORY}], "
                f"got {self.history_length!r}"
            )
        if not isinstance(self.train_on_validation, bool):
            raise ConfigError("train_on_validation must be true or false")
        if not self.round_timeout > 0:
            raise ConfigError(f"round_timeout must be > 0, got {self.round_timeout}")

    def to_config_record(self) -> ConfigRecord:
        """Return what a branch needs to train and evaluate (read by the ClientApp)."""
        return ConfigRecord(
            {
                k.KEY_SEED: self.seed,
                k.KEY_LR: self.lr,
                k.KEY_LOCAL_EPOCHS: self.local_epochs,
                k.KEY_BATCH_SIZE: self.batch_size,
                k.KEY_WEIGHT_DECAY: self.weight_decay,
                k.KEY_REC_FACTORS: self.factors,
                k.KEY_REC_NEGATIVES: self.negatives_per_positive,
                k.KEY_REC_LOSS: self.loss,
                k.KEY_REC_TOP_K: self.top_k,
                k.KEY_REC_RECENCY_HALFLIFE: float(self.recency_halflife),
                k.KEY_REC_TRAIN_ON_VALIDATION: self.train_on_validation,
                k.KEY_REC_HISTORY: self.history_length,
            }
        )


REC_DP_MODEL: Final = "recommender"
"""Model name of the recommender's privacy budget in the ledger."""
REC_DP_PURPOSE: Final = "recommendation-training"
"""Purpose of the recommender's privacy budget in the ledger."""


@dataclass(frozen=True)
class RecDPConfig:
    """Customer-level DP-SGD on the item tower (`fedcrm.models.rec_private`), per branch.

    Attributes:
        target_epsilon: ε each branch may reach after all planned rounds (σ planned from it).
        delta: δ; ``None``: 1/n per branch, n = its customers with training interactions.
        max_grad_norm: C, the clipping norm of one customer's gradient.
        users_per_step: Expected customers per DP-SGD step (Poisson rate = this / customers;
            capped at a branch's customers: a full batch, no subsampling).
        max_interactions_per_user: Latest interactions of a customer in their DP-SGD row.
        accountant: ``"rdp"`` or ``"prv"``.
        max_epsilon: The budget per branch for (model, purpose); ``None``: the target.
    """

    target_epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    users_per_step: int = 16
    max_interactions_per_user: int = 50
    accountant: Literal["rdp", "prv"] = "rdp"
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.users_per_step < 1 or self.max_interactions_per_user < 1:
            raise ConfigError("[dp] users-per-step and max-interactions-per-user must be >= 1")
        self.federated()  # validates the rest, listing every problem

    def federated(self) -> FederatedDPConfig:
        """The shared DP settings (validated by `FederatedDPConfig`)."""
        return FederatedDPConfig(
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            grad_sample_mode="hooks",
            max_epsilon=self.max_epsilon,
            model=REC_DP_MODEL,
            purpose=REC_DP_PURPOSE,
        )

    def config_values(self, num_rounds: int) -> dict[str, int | float | str]:
        """What a branch needs to plan and run its DP rounds (never the ledger URL)."""
        return {
            **self.federated().to_run_config(include_ledger=False),
            k.KEY_REC_DP_USERS_PER_STEP: self.users_per_step,
            k.KEY_REC_DP_CAP: self.max_interactions_per_user,
            k.KEY_NUM_ROUNDS: num_rounds,
        }


@dataclass(frozen=True)
class RecHEConfig:
    """Encrypted aggregation of the item tower (``[aggregation] mode = "he"``).

    Attributes:
        public_context: The key authority's *public* CKKS context (``public.tenseal`` of
            ``fedcrm keys init``); a context holding the secret key is refused.
        checkpoint_dir: Where the server writes each round's ciphertext checkpoint
            (``round-NNNN.fche`` and ``.count``); ``None``: kept in memory only.
    """

    public_context: HEContext
    checkpoint_dir: Path | None = None


@dataclass
class RecRoundRecord:
    """One round: pooled ranking metrics, timing and traffic.

    Attributes:
        round: Round number (1-based).
        seconds: Wall time of the round (training, aggregation, evaluation).
        train_replies: Branch updates aggregated.
        train_loss: Mean local training loss (weighted by interactions).
        test: Pooled test metrics (``hr10-sampled`` ... and ``users``).
        val: Pooled validation metrics.
        bytes_up: Item-tower bytes each branch sent (node id -> bytes): the plaintext item
            arrays, or under HE the serialized ciphertext of its update.
        bytes_down: Item-tower bytes sent to each branch for training (node id -> bytes):
            the item arrays, or under HE the previous round's encrypted aggregate (the
            evaluate message carries this round's aggregate again, in either mode).
        rejected: Why replies were dropped.
        epsilon: DP runs: each branch's cumulative ε after the round (branch name -> ε).
    """

    round: int
    seconds: float
    train_replies: int
    train_loss: float
    test: dict[str, float]
    val: dict[str, float]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    rejected: list[str] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)


@dataclass
class RecFederationResult:
    """The outcome of a federated recommendation run.

    Attributes:
        items: The final aggregated item arrays (keys of `shared_state`). Empty under HE: the
            server holds only ciphertexts; the key holder replays ``checkpoints``.
        num_branches: Branches that took part.
        rounds: One record per round.
        aggregation: ``"plain"`` or ``"he"``.
        initial: The round-0 item arrays every branch starts from (public: seeded).
        checkpoints: HE runs: every round's encrypted delta sum and example count, in order
            (`fedcrm.strategies.he.replay_global_model` turns them into ``items``).
    """

    items: dict[str, NDArray[np.float32]]
    num_branches: int
    rounds: list[RecRoundRecord] = field(default_factory=list)
    aggregation: Literal["plain", "he"] = "plain"
    initial: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)


RecRoundCallback = Callable[[RecRoundRecord], None]


def initial_items(n_items: int, factors: int, *, seed: int, history: int = 0) -> ArrayRecord:
    """Return the initial item arrays, identical to every branch's own initialisation."""
    model = MatrixFactorisation(1, n_items, factors, context=history, seed=seed)
    return ArrayRecord(
        {key: Array(np.ascontiguousarray(a)) for key, a in shared_state(model).items()}
    )


def metrics_dict(metrics: RankingMetrics) -> dict[str, float]:
    """Return the pooled means as a flat dictionary (``hr10-sampled``, ... , ``users``)."""
    at = metrics.k
    return {
        f"hr{at}-sampled": metrics.hr_sampled,
        f"ndcg{at}-sampled": metrics.ndcg_sampled,
        f"hr{at}-full": metrics.hr_full,
        f"ndcg{at}-full": metrics.ndcg_full,
        "users": float(metrics.count),
    }


def _strip_prefix(record: MetricRecord, prefix: str) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for key, value in record.items():
        if key.startswith(prefix) and isinstance(value, int | float):
            out[key.removeprefix(prefix)] = value
    return out


def pool_replies(
    replies: Iterable[Message], *, top_k: int = DEFAULT_K
) -> tuple[RankingMetrics, RankingMetrics]:
    """Pool the branches' evaluation replies into (test, validation) metrics.

    Replies with an error are skipped (and logged).

    Raises:
        InconsistentReplies: A reply's metric record is malformed.
    """
    tests: list[RankingMetrics] = []
    vals: list[RankingMetrics] = []
    for reply in replies:
        if reply.has_error():
            logger.warning(
                "node %d: evaluation failed: %s", reply.metadata.src_node_id, reply.error.reason
            )
            continue
        record = reply.content.metric_records[k.METRICS]
        plain = {key: value for key, value in record.items() if isinstance(value, int | float)}
        tests.append(from_record(plain, top_k))
        vals.append(from_record(_strip_prefix(record, k.REC_VAL_PREFIX), top_k))
    return pool(tests, top_k), pool(vals, top_k)


def check_item_reply(reply: Message, item_keys: frozenset[str]) -> str | None:
    """Return why a train reply must not be aggregated, or ``None`` if it is fine.

    A usable reply carries exactly one ArrayRecord whose keys are the item keys: a reply with
    user factors (or anything else) in it is refused before it can reach the average.
    """
    if reply.has_error():
        return f"node {reply.metadata.src_node_id}: {reply.error.reason}"
    records = reply.content.array_records
    if list(records) != [k.ARRAYS]:
        return f"node {reply.metadata.src_node_id}: array records {sorted(records)}"
    keys = frozenset(records[k.ARRAYS].keys())
    if keys != item_keys:
        extra = sorted(keys - item_keys)
        return f"node {reply.metadata.src_node_id}: array keys not the item keys (extra {extra})"
    return None


def wait_for_branches(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are there.

    Raises:
        FedCrmError: Fewer than ``minimum`` branches connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise FedCrmError(f"only {len(nodes)} of {minimum} branches connected")
        time.sleep(0.5)
    return nodes


def item_payload_bytes(content: RecordDict) -> int:
    """Bytes of the item tower a message carries: its arrays and any HE ciphertext.

    Plaintext messages: the ArrayRecords' ``count_bytes``. HE messages: the bytes fields of
    the HE ConfigRecord (a branch's encrypted update, or the server's encrypted aggregate),
    plus the plaintext initial model of round 1.
    """
    total = sum(record.count_bytes() for record in content.array_records.values())
    he = content.config_records.get(HE_RECORD)
    if he is not None:
        total += sum(len(value) for value in he.values() if isinstance(value, bytes))
    return total


def _arrays_numpy(arrays: ArrayRecord) -> dict[str, NDArray[np.float32]]:
    return {key: np.asarray(array.numpy(), dtype=np.float32) for key, array in arrays.items()}


def _train_loss(metrics: MetricRecord | None) -> float:
    value: Any = None if metrics is None else metrics.get(k.KEY_TRAIN_LOSS)
    return float(value) if isinstance(value, int | float) else math.nan


def run_rec_federation(
    grid: Grid,
    cfg: RecFederationConfig,
    *,
    n_items: int,
    min_nodes: int = 2,
    on_round: RecRoundCallback | None = None,
    dp: RecDPConfig | None = None,
    ledger: PrivacyLedger | None = None,
    run_id: str = "rec",
    he: RecHEConfig | None = None,
) -> RecFederationResult:
    """Run federated MF on the branches connected to ``grid``.

    Args:
        grid: Flower's Grid (simulation or deployment).
        cfg: Run settings.
        n_items: Size of the shared item catalogue.
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round.
        dp: Customer-level DP on every branch (``None``: no DP). Every branch's privacy
            report goes to ``ledger``; only admitted updates are averaged.
        ledger: The privacy ledger of a DP run.
        run_id: The run's id in the ledger.
        he: Encrypted aggregation (``None``: plaintext FedAvg). The branches must run
            `fedcrm.client.he_mod.HEMod` with the matching secret key; replies carrying any
            plaintext array are refused.

    Returns:
        The final item arrays (plaintext runs; the ciphertext checkpoints under HE) and one
        record per round.

    Raises:
        FedCrmError: No usable update arrived in a round.
        ContextKindError: ``he`` holds a secret context.
    """
    nodes = wait_for_branches(grid, min_nodes, cfg.round_timeout)
    arrays = initial_items(n_items, cfg.factors, seed=cfg.seed, history=cfg.history_length)
    item_keys = frozenset(arrays.keys())
    fedavg = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=len(nodes),
        min_evaluate_nodes=len(nodes),
        min_available_nodes=len(nodes),
    )
    encrypted = (
        None
        if he is None
        else HEAggregation(
            fedavg, public_context=he.public_context, checkpoint_dir=he.checkpoint_dir
        )
    )
    strategy: Strategy = fedavg if encrypted is None else encrypted
    result = RecFederationResult(
        items=_arrays_numpy(arrays) if encrypted is None else {},
        num_branches=len(nodes),
        aggregation="plain" if encrypted is None else "he",
        initial=_arrays_numpy(arrays),
    )

    def check_reply(rnd: int, reply: Message) -> str | None:
        if encrypted is None:
            return check_item_reply(reply, item_keys)
        reason = encrypted.check_reply(rnd, reply)  # the ciphertext envelope; no arrays at all
        return None if reason is None else f"node {reply.metadata.src_node_id}: {reason}"

    train_config = cfg.to_config_record()
    if dp is not None:
        train_config.update(dp.config_values(cfg.num_rounds))
    for rnd in range(1, cfg.num_rounds + 1):
        start = time.perf_counter()
        out = list(strategy.configure_train(rnd, arrays, train_config, grid))
        down = {m.metadata.dst_node_id: item_payload_bytes(m.content) for m in out}
        replies = list(grid.send_and_receive(out, timeout=cfg.round_timeout))
        rejected: list[str] = []
        epsilon: dict[str, float] = {}
        if dp is not None:
            replies, events, dropped = screen_private_replies(
                rnd, replies, ledger=ledger, run_id=run_id
            )
            epsilon = {e.report.branch: e.report.epsilon for e in events}
            rejected.extend(f"node {d.node_id}: {d.reason}" for d in dropped)
            rejected.extend(
                f"{e.report.branch}: DP round refused: {e.report.reason}"
                for e in events
                if not e.report.admitted
            )
        usable: list[Message] = []
        for reply in replies:
            reason = check_reply(rnd, reply)
            if reason is None:
                usable.append(reply)
            else:
                rejected.append(reason)
                logger.warning("round %d: reply dropped: %s", rnd, reason)
        up = {r.metadata.src_node_id: item_payload_bytes(r.content) for r in usable}
        new_arrays, train_metrics = strategy.aggregate_train(rnd, usable)
        if new_arrays is None:
            raise FedCrmError(f"round {rnd}: no usable branch update; stopping the run")
        arrays = new_arrays
        evaluation = grid.send_and_receive(
            strategy.configure_evaluate(rnd, arrays, cfg.to_config_record(), grid),
            timeout=cfg.round_timeout,
        )
        try:
            test, val = pool_replies(evaluation, top_k=cfg.top_k)
        except InconsistentReplies as exc:
            raise FedCrmError(f"round {rnd}: {exc}") from exc
        record = RecRoundRecord(
            round=rnd,
            seconds=time.perf_counter() - start,
            train_replies=len(usable),
            train_loss=_train_loss(train_metrics),
            test=metrics_dict(test),
            val=metrics_dict(val),
            bytes_up=up,
            bytes_down=down,
            rejected=rejected,
            epsilon=epsilon,
        )
        result.rounds.append(record)
        logger.info(
            "round %d: HR@%d %.4f NDCG@%d %.4f (%d updates, %.2f s)",
            rnd,
            cfg.top_k,
            test.hr_sampled,
            cfg.top_k,
            test.ndcg_sampled,
            len(usable),
            record.seconds,
        )
        if on_round is not None:
            on_round(record)
    if encrypted is None:
        result.items = _arrays_numpy(arrays)
    else:  # the server holds ciphertext checkpoints only; the key holder replays them
        result.items = {}
        result.checkpoints = list(encrypted.checkpoints)
    return result
