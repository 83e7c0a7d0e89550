"""The federated churn training loop the ServerApp runs on a Flower Grid.

One federated-statistics query (for the shared scaler), then ``num_rounds`` rounds of
train → aggregate → evaluate on every branch. The loop is Flower's ``Strategy.start`` written
out, so that each round is recorded and reported as soon as it ends.

With record-level DP (``dp``), every train message carries the run's DP settings and every
branch answers with a privacy report: admitted (trained with DP-SGD, parameters attached) or
refused (its budget would be exceeded; nothing trained, nothing sent). The coordinator writes
each report to the privacy ledger, aggregates the admitted updates only, and stops the run with
`FederationStopped` when fewer than ``min-train-nodes`` branches are admitted.
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
from fedcrm.compliance import (
    Accountant,
    Decision,
    LedgerEntry,
    LedgerError,
    Mechanism,
    NeighbouringRelation,
    PrivacyLedger,
    PrivacyUnit,
    SamplingMethod,
)
from fedcrm.data.preprocess import Moments, Scaler, combine_moments
from fedcrm.data.schema import get_schema
from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies
from fedcrm.models.churn import build_model
from fedcrm.privacy.federated import FederatedDPConfig, PrivacyReport
from fedcrm.server.config import FederationConfig
from fedcrm.strategies.factory import StrategyName, build_strategy
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
    refused: list[str] = field(default_factory=list)
    """``"<branch>: <reason>"`` of every branch whose privacy budget refused the round."""
    privacy: dict[str, float] = field(default_factory=dict)
    """DP runs: admitted and refused counts and the largest cumulative ε after the round."""


@dataclass(frozen=True)
class PrivacyEvent:
    """A branch's privacy report for one round, as received by the coordinator."""

    round: int
    node_id: int
    report: PrivacyReport


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
    dp: FederatedDPConfig | None = None
    privacy: list[PrivacyEvent] = field(default_factory=list)
    """Every branch's privacy report, round by round (DP runs)."""


class FederationStopped(FedCrmError):
    """The run stopped before its last round; ``result`` holds what was done until then.

    Args:
        message: Why, naming the branches and reasons.
        result: The partial result (rounds completed, privacy events so far).
    """

    def __init__(self, message: str, result: FederationResult) -> None:
        self.result = result
        super().__init__(message)


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


def _message_config(
    cfg: FederationConfig, scaler: Scaler, dp: FederatedDPConfig | None = None
) -> ConfigRecord:
    extra: dict[str, Any] = {}
    if dp is not None:  # the ledger URL stays on the coordinator
        extra = {**dp.to_run_config(include_ledger=False), k.KEY_NUM_ROUNDS: cfg.num_rounds}
    return ConfigRecord(
        {
            **extra,
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


def ledger_entry(report: PrivacyReport, *, run_id: str, server_round: int) -> LedgerEntry:
    """The privacy-ledger row of one branch's report (record-level DP-SGD, add/remove one row).

    Raises:
        fedcrm.compliance.LedgerError: The report's figures break a ledger constraint.
    """
    return LedgerEntry(
        run_id=run_id,
        round=server_round,
        branch=report.branch,
        model=report.model,
        purpose=report.purpose,
        privacy_unit=PrivacyUnit(report.privacy_unit),
        neighbouring_relation=NeighbouringRelation.ADD_REMOVE,
        mechanism=Mechanism.SUBSAMPLED_GAUSSIAN,
        noise_multiplier=report.noise_multiplier,
        clipping_norm=report.max_grad_norm,
        sampling_rate=report.sample_rate,
        sampling_method=SamplingMethod.POISSON,
        steps=report.steps,
        delta=report.delta,
        accountant=Accountant(report.accountant),
        library_version=report.library_version,
        epsilon=report.epsilon_round,
        cumulative_epsilon=report.epsilon,
        decision=Decision.ADMITTED if report.admitted else Decision.REFUSED,
        reason=report.reason,
        epsilon_budget=report.budget,
    )


def screen_private_replies(
    server_round: int,
    replies: list[Message],
    *,
    ledger: PrivacyLedger | None,
    run_id: str,
) -> tuple[list[Message], list[PrivacyEvent], list[Rejection]]:
    """Record every branch's privacy report; keep only admitted updates (and error replies).

    A reply with no valid privacy report is dropped: in a DP run an update without one may
    not have been trained privately.

    Returns:
        Replies to aggregate, the privacy events, and the dropped replies with reasons.

    Raises:
        LedgerError: The ledger refused an entry (e.g. a branch reports a cumulative ε below
            the recorded one: its accountant was reset or rolled back).
    """
    kept: list[Message] = []
    events: list[PrivacyEvent] = []
    dropped: list[Rejection] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            kept.append(reply)  # the validating strategy records it
            continue
        record = reply.content.config_records.get(k.PRIVACY)
        if record is None:
            dropped.append(Rejection(server_round, node, "DP run: reply has no privacy report"))
            continue
        try:
            report = PrivacyReport.from_record(dict(record))
        except ConfigError as exc:
            dropped.append(Rejection(server_round, node, f"DP run: {exc}"))
            continue
        events.append(PrivacyEvent(server_round, node, report))
        if ledger is not None:
            ledger.append(ledger_entry(report, run_id=run_id, server_round=server_round))
        if report.admitted:
            kept.append(reply)
    for rejection in dropped:
        logger.warning(
            "round %d: update of node %d dropped: %s",
            rejection.server_round,
            rejection.node_id,
            rejection.reason,
        )
    return kept, events, dropped


def run_federation(
    grid: Grid,
    cfg: FederationConfig,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    wrap_strategy: StrategyWrapper | None = None,
    dp: FederatedDPConfig | None = None,
    ledger: PrivacyLedger | None = None,
    run_id: str = "run",
) -> FederationResult:
    """Run federated churn training on the branches connected to ``grid``.

    Args:
        grid: Flower's grid of connected branches.
        cfg: Federation settings.
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round.
        wrap_strategy: Wraps the optimisation strategy (inside the reply validation).
        dp: Record-level DP settings sent to every branch (``None``: no DP).
        ledger: Where every branch's privacy decision is recorded (DP runs).
        run_id: The run's id in the ledger.

    Raises:
        ConfigError: DP was asked for with FedProx (its proximal term is not clipped).
        FederationStopped: Privacy budgets left fewer than ``min-train-nodes`` admitted
            branches, or the ledger refused a branch's report.
        FedCrmError: A round produced no usable update.
    """
    if dp is not None and cfg.strategy is StrategyName.FEDPROX:
        raise ConfigError("record-level DP cannot run with fedprox: use fedavg or fedadam")
    if dp is not None:
        logger.info("privacy: %s", dp.describe())
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
    config = _message_config(cfg, scaler, dp)
    result = FederationResult(model.state_dict(), scaler, len(nodes), dp=dp)
    best_val = -np.inf
    for rnd in range(1, cfg.num_rounds + 1):
        start = time.perf_counter()
        before = len(strategy.rejections)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid))
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        received = len(replies)
        refused: list[str] = []
        privacy: dict[str, float] = {}
        if dp is not None:
            try:
                replies, events, dropped = screen_private_replies(
                    rnd, replies, ledger=ledger, run_id=run_id
                )
            except LedgerError as exc:
                result.rejections = list(strategy.rejections)
                raise FederationStopped(
                    f"round {rnd}: the privacy ledger refused a branch's report, stopping the "
                    f"run: {exc}",
                    result,
                ) from exc
            result.privacy.extend(events)
            strategy.rejections.extend(dropped)
            admitted = [e.report for e in events if e.report.admitted]
            refused = [
                f"{e.report.branch}: {e.report.reason}" for e in events if not e.report.admitted
            ]
            privacy = {
                "admitted": float(len(admitted)),
                "refused": float(len(refused)),
                "epsilon-max": max((r.epsilon for r in admitted), default=0.0),
            }
            needed = min(cfg.min_train_nodes, len(messages))
            if len(admitted) < needed:
                failed = [
                    f"node {r.metadata.src_node_id}: {r.error.reason}"
                    for r in replies
                    if r.has_error()
                ]
                detail = "; ".join([*refused, *failed]) or "no reply"
                result.rejections = list(strategy.rejections)
                raise FederationStopped(
                    f"round {rnd}: only {len(admitted)} of {len(messages)} branches were "
                    f"admitted ({len(refused)} refused by their privacy budget, {len(failed)} "
                    f"failed), fewer than min-train-nodes = {needed}; stopping the run (every "
                    f"privacy decision is in the ledger). {detail}",
                    result,
                )
            if refused:
                logger.warning(
                    "round %d: %d branch(es) refused by their privacy budget, continuing with %d",
                    rnd,
                    len(refused),
                    len(admitted),
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
            train_replies=received,
            train=_plain(train_metrics),
            evaluate=_plain(eval_metrics),
            rejected=[r.reason for r in strategy.rejections[before:]],
            refused=refused,
            privacy=privacy,
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
