"""The coordinator's screening of branch replies before anything is aggregated.

* The federated-statistics query before round 1: every branch answers with its training count
  and its task's statistics (computed on consented rows in a consent-gated run), or refuses.
* Consent (`fedcrm.server.consent_replies`): a consent-gated round's manifests and refusals are
  recorded (result, audit log, lineage); an update without a valid manifest is dropped.
* Privacy: a DP round's reports go to the privacy ledger; only admitted updates are kept, and a
  reply without a valid report is dropped (it may not have been trained privately).

A round left with fewer than ``min-train-nodes`` usable updates stops the run with
`FederationStopped`, naming every branch's reason.
"""

import logging
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcrm import wire as k
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
from fedcrm.exceptions import ConfigError, FedCrmError, InconsistentReplies
from fedcrm.privacy import PrivacyReport
from fedcrm.server.budget import BudgetGuard
from fedcrm.server.consent_replies import (
    ConsentRefusalEvent,
    screen_consent_replies,
    screen_statistics_replies,
)
from fedcrm.server.result import FederationResult, FederationStopped, PrivacyEvent
from fedcrm.server.run_audit import RunAudit
from fedcrm.strategies.validated import Rejection

logger = logging.getLogger(__name__)


@dataclass
class Statistics:
    """The branches' answers to the federated-statistics query."""

    records: list[MetricRecord]
    """The statistics of every branch that answered."""
    refusals: list[ConsentRefusalEvent] = field(default_factory=list)
    """Consent-gated runs: branches refusing the run's purpose (round 0)."""
    failures: list[str] = field(default_factory=list)
    """``"node <id>: <reason>"`` of every failed or malformed answer."""
    privacy: dict[int, ConfigRecord] = field(default_factory=dict)
    """DP runs: per node, its accountant's spends and noise plan (``privacy-state``)."""


def query_statistics(
    grid: Grid, nodes: list[int], config: ConfigRecord, *, timeout: float, gated: bool
) -> Statistics:
    """Ask every branch for its statistics (``gated``: over rows with valid consent only).

    A branch whose data or consent does not cover the run's purpose answers with its
    structured refusal instead (`fedcrm.server.consent_replies.screen_statistics_replies`).
    """
    messages = [
        Message(
            content=RecordDict({k.CONFIG: ConfigRecord(dict(config))}),
            dst_node_id=n,
            message_type=f"{MessageType.QUERY}.{k.ACTION_STATISTICS}",
        )
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    screen = screen_statistics_replies(replies) if gated else None
    stats = Statistics(
        [],
        screen.refusals if screen else [],
        [f"node {r.node_id}: {r.reason}" for r in (screen.dropped if screen else [])],
    )
    for reply in screen.kept if screen else replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("node %d: statistics query failed: %s", node, reply.error.reason)
            stats.failures.append(f"node {node}: {reply.error.reason}")
            continue
        record = reply.content.metric_records.get(k.METRICS)
        if record is None or not isinstance(record.get(k.KEY_NUM_EXAMPLES), int | float):
            stats.failures.append(f"node {node}: a statistics reply without {k.KEY_NUM_EXAMPLES}")
            continue
        stats.records.append(record)
        if k.PRIVACY_STATE in reply.content.config_records:
            stats.privacy[node] = reply.content.config_records[k.PRIVACY_STATE]
    logger.info("federated statistics from %d of %d branches", len(stats.records), len(nodes))
    return stats


def screen_statistics(
    stats: Statistics, *, result: FederationResult, audit: RunAudit | None
) -> list[MetricRecord]:
    """Record the statistics query's consent refusals like a round's; return the statistics.

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
    if stats.records:
        if refused:
            logger.warning(
                "federated statistics: %d branch(es) refused the run's purpose, continuing "
                "with %d: %s",
                len(refused),
                len(stats.records),
                "; ".join(refused),
            )
        return stats.records
    detail = "; ".join([*refused, *stats.failures]) or "no reply"
    if not refused:
        raise InconsistentReplies(f"no branch returned statistics ({detail})")
    raise FederationStopped(
        f"federated statistics: no branch returned statistics ({len(refused)} of "
        f"{result.num_branches} refused the run's purpose, {len(stats.failures)} failed); "
        f"stopping the run before round 1 (every refusal is in the audit log). {detail}",
        result,
    )


def screen_consent(
    rnd: int,
    replies: list[Message],
    *,
    needed: int,
    audit: RunAudit | None,
    result: FederationResult,
    rejections: list[Rejection],
) -> tuple[list[Message], list[str], dict[str, float]]:
    """Record a consent-gated round's manifests and refusals; keep the admitted replies.

    Args:
        rnd: The round.
        replies: The round's training replies.
        needed: Fewest usable updates the round needs (``min-train-nodes``, capped).
        audit: The run's audit trail.
        result: The run's result (manifests and refusals are appended).
        rejections: The run's rejected updates (dropped replies are appended).

    Returns:
        The replies to go on with, the refusals as ``"<branch>: consent: <reason>"``, and the
        round's consent counts.

    Raises:
        FederationStopped: Fewer than ``needed`` branches are left, or the audit log refused
            a record.
    """
    screen = screen_consent_replies(rnd, replies)
    result.manifests.extend(screen.manifests)
    result.consent_refusals.extend(screen.refusals)
    rejections.extend(screen.dropped)
    try:
        for manifest in screen.manifests:
            if audit is not None:
                audit.manifest(rnd, manifest.manifest)
        for refusal in screen.refusals:
            if audit is not None:
                audit.consent_refusal(rnd, refusal.refusal)
    except FedCrmError as exc:
        raise FederationStopped(
            f"round {rnd}: the audit log refused a record: {exc}", result
        ) from exc
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
    if usable < needed:
        detail = "; ".join(refused) or "no reply"
        raise FederationStopped(
            f"round {rnd}: only {usable} of {len(replies)} branches trained ({len(refused)} "
            f"refused the run's purpose), fewer than min-train-nodes = {needed}; stopping the "
            f"run (every refusal is in the audit log). {detail}",
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


def ledger_entry(report: PrivacyReport, *, run_id: str, server_round: int) -> LedgerEntry:
    """The privacy-ledger row of one branch's DP-SGD report (add/remove one row or customer).

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
    guard: BudgetGuard | None = None,
) -> tuple[list[Message], list[PrivacyEvent], list[Rejection]]:
    """Record every branch's privacy report; keep only admitted updates (and error replies).

    A reply with no valid privacy report is dropped: in a DP run an update without one may
    not have been trained privately. With a `BudgetGuard` each row's cumulative ε also counts
    the ledger's history of the branch, and an update the ledger puts above the budget is
    recorded and dropped.

    Returns:
        Replies to aggregate, the privacy events (with their ledger rows), and the dropped
        replies with reasons.

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
        if guard is not None:
            entry = guard.entry(report, node, server_round=server_round)
        else:
            entry = ledger_entry(report, run_id=run_id, server_round=server_round)
        if ledger is not None:
            entry = ledger.append(entry)
        events.append(PrivacyEvent(server_round, node, report, entry))
        if guard is not None and guard.over_budget(entry):
            dropped.append(Rejection(server_round, node, f"DP run: {entry.reason}"))
        elif report.admitted:
            kept.append(reply)
    for rejection in dropped:
        logger.warning(
            "round %d: update of node %d dropped: %s",
            rejection.server_round,
            rejection.node_id,
            rejection.reason,
        )
    return kept, events, dropped


def screen_privacy(
    rnd: int,
    replies: list[Message],
    *,
    needed: int,
    ledger: PrivacyLedger | None,
    run_id: str,
    audit: RunAudit | None,
    result: FederationResult,
    rejections: list[Rejection],
    guard: BudgetGuard | None = None,
) -> tuple[list[Message], list[str], dict[str, float]]:
    """Record a DP round's reports (ledger, audit log); keep the admitted updates.

    Returns:
        The replies to go on with, the refusals as ``"<branch>: <reason>"``, and the round's
        privacy counts (admitted, refused, largest cumulative ε).

    Raises:
        FederationStopped: The ledger refused a report, or fewer than ``needed`` branches
            were admitted.
    """
    try:
        kept, events, dropped = screen_private_replies(
            rnd, replies, ledger=ledger, run_id=run_id, guard=guard
        )
        if audit is not None:
            for event in events:
                audit.ledger_entry(event.entry)
    except LedgerError as exc:
        raise FederationStopped(
            f"round {rnd}: the privacy ledger refused a branch's report, stopping the run: {exc}",
            result,
        ) from exc
    result.privacy.extend(events)
    rejections.extend(dropped)
    admitted = [
        e.report
        for e in events
        if e.report.admitted and not (guard is not None and guard.over_budget(e.entry))
    ]
    refused = [f"{e.report.branch}: {e.report.reason}" for e in events if not e.report.admitted]
    counts = {
        "admitted": float(len(admitted)),
        "refused": float(len(refused)),
        "epsilon-max": max((r.epsilon for r in admitted), default=0.0),
    }
    if len(admitted) < needed:
        failed = [f"node {r.metadata.src_node_id}: {r.error.reason}" for r in kept if r.has_error()]
        detail = "; ".join([*refused, *failed]) or "no reply"
        raise FederationStopped(
            f"round {rnd}: only {len(admitted)} of {len(replies)} branches were admitted "
            f"({len(refused)} refused by their privacy budget, {len(failed)} failed), fewer "
            f"than min-train-nodes = {needed}; stopping the run (every privacy decision is in "
            f"the ledger). {detail}",
            result,
        )
    if refused:
        logger.warning(
            "round %d: %d branch(es) refused by their privacy budget, continuing with %d",
            rnd,
            len(refused),
            len(admitted),
        )
    return kept, refused, counts
