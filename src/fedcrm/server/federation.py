"""The federated churn training loop the ServerApp runs on a Flower Grid.

One federated-statistics query (for the shared scaler), then ``num_rounds`` rounds of
train → aggregate → evaluate on every branch. The loop is Flower's ``Strategy.start`` written
out, so that each round is recorded and reported as soon as it ends.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrm import constants as k
from fedcrm.data.preprocess import Moments, Scaler, combine_moments
from fedcrm.data.schema import get_schema
from fedcrm.exceptions import FedCrmError, InconsistentReplies
from fedcrm.models.churn import build_model
from fedcrm.server.config import FederationConfig
from fedcrm.strategies.factory import build_strategy
from fedcrm.strategies.validated import Rejection, ValidatedStrategy

logger = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What happened in one round: aggregated training and evaluation metrics."""

    round: int
    seconds: float
    train_replies: int
    train: dict[str, Any]
    evaluate: dict[str, Any]
    rejected: list[str]


@dataclass
class FederationResult:
    """The outcome of a federated run."""

    state_dict: dict[str, torch.Tensor]
    """The global model of the round with the best pooled validation ROC-AUC."""
    scaler: Scaler
    num_branches: int
    best_round: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


RoundCallback = Callable[[RoundRecord], None]
StrategyWrapper = Callable[[Strategy], Strategy]
"""Wraps the inner strategy (e.g. HE aggregation) inside the reply validation."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are there.

    Raises:
        FedCrmError: Fewer than ``minimum`` branches connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise FedCrmError(
                f"only {len(nodes)} of {minimum} branches connected in {timeout:.0f} s"
            )
        time.sleep(1.0)


def federated_scaler(grid: Grid, nodes: list[int], cfg: FederationConfig) -> Scaler:
    """Ask every branch for its moments and combine them into the shared scaler.

    Raises:
        InconsistentReplies: No branch answered, or an answer is malformed.
    """
    schema = get_schema(cfg.schema)
    content = RecordDict({k.CONFIG: ConfigRecord({k.KEY_SCHEMA: cfg.schema})})
    messages = [
        Message(
            content=content, dst_node_id=n, message_type=f"{MessageType.QUERY}.{k.ACTION_MOMENTS}"
        )
        for n in nodes
    ]
    parts: list[Moments] = []
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        if reply.has_error():
            logger.warning(
                "node %d: statistics query failed: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        values = reply.content.metric_records[k.METRICS][k.KEY_MOMENTS]
        parts.append(Moments.from_list(values, len(schema.numeric)))  # type: ignore[arg-type]
    if not parts:
        raise InconsistentReplies("no branch returned statistics; cannot build the shared scaler")
    logger.info("federated statistics from %d of %d branches", len(parts), len(nodes))
    return Scaler.from_moments(combine_moments(parts))


def _message_config(cfg: FederationConfig, scaler: Scaler) -> ConfigRecord:
    return ConfigRecord(
        {
            k.KEY_SCHEMA: cfg.schema,
            k.KEY_SEED: cfg.seed,
            k.KEY_LR: cfg.lr,
            k.KEY_LOCAL_EPOCHS: cfg.local_epochs,
            k.KEY_BATCH_SIZE: cfg.batch_size,
            k.KEY_WEIGHT_DECAY: cfg.weight_decay,
            k.KEY_OPTIMIZER: cfg.optimizer,
            k.KEY_MOMENTUM: cfg.momentum,
            k.KEY_SCALER_MEAN: [float(v) for v in scaler.mean],
            k.KEY_SCALER_STD: [float(v) for v in scaler.std],
        }
    )


def _plain(record: Any) -> dict[str, Any]:
    return {} if record is None else {key: record[key] for key in record}


def run_federation(
    grid: Grid,
    cfg: FederationConfig,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    wrap_strategy: StrategyWrapper | None = None,
) -> FederationResult:
    """Run federated churn training on the branches connected to ``grid``."""
    nodes = wait_for_nodes(grid, min_nodes, cfg.round_timeout)
    scaler = federated_scaler(grid, nodes, cfg)
    schema = get_schema(cfg.schema)
    model = build_model(schema.input_dim, seed=cfg.seed, hidden=cfg.hidden)
    arrays = ArrayRecord(model.state_dict())
    inner = build_strategy(
        cfg.strategy,
        num_nodes=len(nodes),
        fraction_train=cfg.fraction_train,
        proximal_mu=cfg.proximal_mu,
        server_lr=cfg.server_lr,
    )
    strategy = ValidatedStrategy(wrap_strategy(inner) if wrap_strategy else inner)
    config = _message_config(cfg, scaler)
    result = FederationResult(model.state_dict(), scaler, len(nodes))
    best_val = -np.inf
    for rnd in range(1, cfg.num_rounds + 1):
        start = time.perf_counter()
        before = len(strategy.rejections)
        replies = list(
            grid.send_and_receive(
                strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid),
                timeout=cfg.round_timeout,
            )
        )
        new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        if new_arrays is None:
            raise FedCrmError(f"round {rnd}: no usable branch update; stopping the run")
        arrays = new_arrays
        eval_metrics = strategy.aggregate_evaluate(
            rnd,
            grid.send_and_receive(
                strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid),
                timeout=cfg.round_timeout,
            ),
        )
        record = RoundRecord(
            round=rnd,
            seconds=time.perf_counter() - start,
            train_replies=len(replies),
            train=_plain(train_metrics),
            evaluate=_plain(eval_metrics),
            rejected=[r.reason for r in strategy.rejections[before:]],
        )
        result.rounds.append(record)
        # Model selection on the branches' validation rows only (never on test rows).
        val_auc = float(record.evaluate.get("val-roc-auc", np.nan))
        if np.isfinite(val_auc) and val_auc > best_val:
            best_val, result.best_round = val_auc, rnd
            result.state_dict = arrays.to_torch_state_dict()
        logger.info(
            "round %d: AUC %.4f (%d updates, %.2f s)",
            rnd,
            float(record.evaluate.get("roc-auc", np.nan)),
            len(replies),
            record.seconds,
        )
        if on_round is not None:
            on_round(record)
    if result.best_round == 0:  # validation AUC undefined (a single class): keep the last model
        result.state_dict, result.best_round = arrays.to_torch_state_dict(), cfg.num_rounds
    result.rejections = list(strategy.rejections)
    return result
