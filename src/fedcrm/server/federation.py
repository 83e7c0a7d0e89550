"""The federated churn training loop the ServerApp runs on a Flower Grid.

One federated-statistics query (for the shared scaler), then ``num_rounds`` rounds of
train → aggregate → evaluate on every branch. The loop is Flower's ``Strategy.start`` written
out, so that each round is recorded and reported as soon as it ends.

With record-level DP (``dp``), every train message carries the run's DP settings and every
branch answers with a privacy report: admitted (trained with DP-SGD, parameters attached) or
refused (its budget would be exceeded; nothing trained, nothing sent). The coordinator writes
each report to the privacy ledger, aggregates the admitted updates only, and stops the run with
`FederationStopped` when fewer than ``min-train-nodes`` branches are admitted.

A run that declares a purpose (``purpose``) sends it with every message; each branch trains
only on rows with valid consent for it and answers with a round manifest, or refuses the run
(`fedcrm.server.consent_replies`). Refusals are handled like budget refusals: recorded, left
out, and the run stops below ``min-train-nodes``; refusals of the statistics query are recorded
as round 0, and a run where no branch sends statistics stops there with every branch's reason
(`FederationStopped`). With a `RunAudit`, the configuration,
manifests, refusals and ledger entries also go to the run's audit log.
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
    Purpose,
    SamplingMethod,
)
from fedcrm.data.preprocess import Moments, Scaler, combine_moments
from fedcrm.data.schema import get_schema
from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies
from fedcrm.models.churn import build_model
from fedcrm.privacy.federated import FederatedDPConfig, PrivacyReport
from fedcrm.server.config import FederationConfig
from fedcrm.server.consent_replies import (
    ConsentRefusalEvent,
    ManifestEvent,
    screen_consent_replies,
    screen_statistics_replies,
)
from fedcrm.server.run_audit import RunAudit
from fedcrm.strategies.central_dp import CentralBudgetExhausted
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
    consent: dict[str, float] = field(default_factory=dict)
    """Consent-gated runs: branches admitted and refused, training rows used and excluded."""


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
    manifests: list[ManifestEvent] = field(default_factory=list)
    """Every branch's round manifest (consent-gated runs)."""
    consent_refusals: list[ConsentRefusalEvent] = field(default_factory=list)
    """Every branch's refusal of the run's purpose, round by round."""
    central_dp: dict[str, object] | None = None
    """Branch-level central DP: what each round spent (`CentralDPSummary.as_dict`)."""


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


@dataclass
class FederatedStatistics:
    """The branches' answers to the federated-statistics query."""

    scaler: Scaler | None
    """The shared scaler; ``None`` when no branch returned statistics."""
    answered: int
    """Branches whose moments the scaler combines."""
    refusals: list[ConsentRefusalEvent] = field(default_factory=list)
    """Consent-gated runs: branches refusing the run's purpose (round 0)."""
    failures: list[str] = field(default_factory=list)
    """``"node <id>: <reason>"`` of every failed or malformed answer."""


def query_statistics(
    grid: Grid, nodes: list[int], cfg: FederationConfig, *, consent: dict[str, str] | None = None
) -> FederatedStatistics:
    """Ask every branch for its moments and combine them into the shared scaler.

    ``consent`` (the run's purpose and id) makes branches compute them on consented rows only;
    a branch whose data or consent does not cover the purpose answers with its structured
    refusal instead (`fedcrm.server.consent_replies.screen_statistics_replies`).

    Raises:
        InconsistentReplies: An answer's moments are malformed.
    """
    schema = get_schema(cfg.schema)
    content = RecordDict({k.CONFIG: ConfigRecord({k.KEY_SCHEMA: cfg.schema, **(consent or {})})})
    messages = [
        Message(
            content=content, dst_node_id=n, message_type=f"{MessageType.QUERY}.{k.ACTION_MOMENTS}"
        )
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    screen = screen_statistics_replies(replies) if consent else None
    if screen is not None:
        replies = screen.kept
    parts: list[Moments] = []
    failures = [f"node {r.node_id}: {r.reason}" for r in (screen.dropped if screen else [])]
    for reply in replies:
        if reply.has_error():
            logger.warning(
                "node %d: statistics query failed: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            failures.append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        values = reply.content.metric_records[k.METRICS][k.KEY_MOMENTS]
        parts.append(Moments.from_list(values, len(schema.numeric)))  # type: ignore[arg-type]
    logger.info("federated statistics from %d of %d branches", len(parts), len(nodes))
    scaler = Scaler.from_moments(combine_moments(parts)) if parts else None
    refusals = screen.refusals if screen else []
    return FederatedStatistics(scaler, len(parts), refusals, failures)


def federated_scaler(
    grid: Grid, nodes: list[int], cfg: FederationConfig, *, consent: dict[str, str] | None = None
) -> Scaler:
    """The shared scaler from :func:`query_statistics`.

    Raises:
        InconsistentReplies: No branch answered, or an answer is malformed.
    """
    stats = query_statistics(grid, nodes, cfg, consent=consent)
    if stats.scaler is None:
        raise InconsistentReplies(
            "no branch returned statistics; cannot build the shared scaler"
            + (f" ({'; '.join(stats.failures)})" if stats.failures else "")
        )
    return stats.scaler


def screen_statistics(
    stats: FederatedStatistics,
    *,
    result: FederationResult,
    audit: RunAudit | None,
) -> Scaler:
    """Record the statistics query's consent refusals like a round's; return the scaler.

    Every refusal goes to ``result.consent_refusals`` (round 0) and to the audit log.

    Raises:
        FederationStopped: No branch returned statistics and at least one refused the run's
            purpose (the message names each branch's reason), or the audit log refused a
            record.
        InconsistentReplies: No branch returned statistics, none refused.
    """
    result.consent_refusals.extend(stats.refusals)
    try:
        for event in stats.refusals:
            if audit is not None:
                audit.consent_refusal(event.round, event.refusal)
    except FedCrmError as exc:
        message = f"federated statistics: the audit log refused a record: {exc}"
        raise FederationStopped(message, result) from exc
    refused = [f"{e.refusal.branch}: consent: {e.refusal.reason}" for e in stats.refusals]
    if stats.scaler is not None:
        if refused:
            logger.warning(
                "federated statistics: %d branch(es) refused the run's purpose, continuing "
                "with %d: %s",
                len(refused),
                stats.answered,
                "; ".join(refused),
            )
        return stats.scaler
    detail = "; ".join([*refused, *stats.failures]) or "no reply"
    if not refused:
        raise InconsistentReplies(
            f"no branch returned statistics; cannot build the shared scaler ({detail})"
        )
    raise FederationStopped(
        f"federated statistics: no branch returned statistics ({len(refused)} of "
        f"{result.num_branches} refused the run's purpose, {len(stats.failures)} failed); "
        f"stopping the run before round 1 (every refusal is in the audit log). {detail}",
        result,
    )


def _message_config(
    cfg: FederationConfig,
    scaler: Scaler,
    dp: FederatedDPConfig | None = None,
    consent: dict[str, str] | None = None,
) -> ConfigRecord:
    extra: dict[str, Any] = dict(consent or {})
    if dp is not None:  # the ledger URL stays on the coordinator
        extra.update(dp.to_run_config(include_ledger=False))
        extra[k.KEY_NUM_ROUNDS] = cfg.num_rounds
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


def screen_consent(
    rnd: int,
    replies: list[Message],
    *,
    sent: int,
    cfg: FederationConfig,
    audit: RunAudit | None,
    result: FederationResult,
    strategy: ValidatedStrategy,
) -> tuple[list[Message], list[str], dict[str, float]]:
    """Record a consent-gated round's manifests and refusals; keep the admitted replies.

    Returns:
        The replies to go on with, the refusals as ``"<branch>: consent: <reason>"``, and the
        round's consent counts.

    Raises:
        FederationStopped: Fewer than ``min-train-nodes`` branches are left, or the audit log
            refused a record.
    """
    screen = screen_consent_replies(rnd, replies)
    result.manifests.extend(screen.manifests)
    result.consent_refusals.extend(screen.refusals)
    strategy.rejections.extend(screen.dropped)
    try:
        for manifest in screen.manifests:
            if audit is not None:
                audit.manifest(rnd, manifest.manifest)
        for refusal in screen.refusals:
            if audit is not None:
                audit.consent_refusal(rnd, refusal.refusal)
    except FedCrmError as exc:
        result.rejections = list(strategy.rejections)
        message = f"round {rnd}: the audit log refused a record: {exc}"
        raise FederationStopped(message, result) from exc
    refused = [f"{e.refusal.branch}: consent: {e.refusal.reason}" for e in screen.refusals]
    usable = sum(not reply.has_error() for reply in screen.kept)
    counts = {
        "admitted": float(len(screen.manifests)),
        "refused": float(len(refused)),
        "rows-used": float(sum(e.manifest.rows_after for e in screen.manifests)),
        "rows-excluded": float(
            sum(e.manifest.rows_before - e.manifest.rows_after for e in screen.manifests)
        ),
    }
    needed = min(cfg.min_train_nodes, sent)
    if usable < needed:
        result.rejections = list(strategy.rejections)
        detail = "; ".join(refused) or "no reply"
        raise FederationStopped(
            f"round {rnd}: only {usable} of {sent} branches trained ({len(refused)} refused the "
            f"run's purpose), fewer than min-train-nodes = {needed}; stopping the run (every "
            f"refusal is in the audit log). {detail}",
            result,
        )
    if refused:
        logger.warning(
            "round %d: %d branch(es) refused the run's purpose, continuing with %d",
            rnd,
            len(refused),
            usable,
        )
    return screen.kept, refused, counts


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
    purpose: Purpose | None = None,
    audit: RunAudit | None = None,
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
        run_id: The run's id in the ledger, the audit log and the branches' manifests.
        purpose: The run's declared purpose: every branch gates its rows on consent for it
            (``None``: no consent gate).
        audit: The run's audit trail (configuration, manifests, refusals, ledger entries).

    Raises:
        ConfigError: DP was asked for with FedProx (its proximal term is not clipped).
        FederationStopped: Privacy budgets or consent refusals left fewer than
            ``min-train-nodes`` admitted branches, or the ledger refused a branch's report.
        FedCrmError: A round produced no usable update.
    """
    if dp is not None and cfg.strategy is StrategyName.FEDPROX:
        raise ConfigError("record-level DP cannot run with fedprox: use fedavg or fedadam")
    if dp is not None:
        logger.info("privacy: %s", dp.describe())
    consent = None
    if purpose is not None:
        consent = {k.KEY_CONSENT_PURPOSE: purpose.value, k.KEY_RUN_ID: run_id}
    if audit is not None:
        audit.configuration(
            {
                **cfg.to_run_config(),
                **(consent or {}),
                **({} if dp is None else dp.to_run_config(include_ledger=False)),
            }
        )
    nodes = wait_for_nodes(grid, min_nodes, cfg.round_timeout)
    stats = query_statistics(grid, nodes, cfg, consent=consent)
    schema = get_schema(cfg.schema)
    model = build_model(schema.input_dim, seed=cfg.seed, hidden=cfg.hidden)
    identity = Scaler(np.zeros(len(schema.numeric)), np.ones(len(schema.numeric)))
    result = FederationResult(model.state_dict(), stats.scaler or identity, len(nodes), dp=dp)
    scaler = screen_statistics(stats, result=result, audit=audit)
    arrays = ArrayRecord(model.state_dict())
    inner = build_strategy(
        cfg.strategy,
        num_nodes=len(nodes),
        fraction_train=cfg.fraction_train,
        proximal_mu=cfg.proximal_mu,
        server_lr=cfg.server_lr,
    )
    strategy = ValidatedStrategy(wrap_strategy(inner) if wrap_strategy else inner)
    config = _message_config(cfg, scaler, dp, consent)
    best_val = -np.inf
    for rnd in range(1, cfg.num_rounds + 1):
        start = time.perf_counter()
        before = len(strategy.rejections)
        try:
            messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid))
        except CentralBudgetExhausted as exc:
            result.rejections = list(strategy.rejections)
            raise FederationStopped(
                f"{exc}; stopping the run (the refusal is in the privacy ledger)", result
            ) from exc
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        received = len(replies)
        refused: list[str] = []
        privacy: dict[str, float] = {}
        consent_refused: list[str] = []
        consent_counts: dict[str, float] = {}
        if purpose is not None:
            replies, consent_refused, consent_counts = screen_consent(
                rnd,
                replies,
                sent=len(messages),
                cfg=cfg,
                audit=audit,
                result=result,
                strategy=strategy,
            )
        if dp is not None:
            try:
                replies, events, dropped = screen_private_replies(
                    rnd, replies, ledger=ledger, run_id=run_id
                )
                if audit is not None:
                    for event in events:
                        entry = ledger_entry(event.report, run_id=run_id, server_round=rnd)
                        audit.ledger_entry(entry)
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
            refused=consent_refused + refused,
            privacy=privacy,
            consent=consent_counts,
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
