"""The coordinator's side of the consent gate: read every reply's consent record.

In a run that declares a purpose, every branch answers a training message with either a round
manifest (it trained on the rows valid for the purpose; the reply carries the root and counts)
or a structured refusal (its data or consent does not cover the purpose; no parameters). An
update without a valid manifest is dropped: it may have used rows without consent.

The federated-statistics query before round 1 is gated too: a branch answers with its moments
over consented rows, or with the same structured refusal, recorded as a refusal of round 0.
"""

import logging
from dataclasses import dataclass

from flwr.app import Message

from fedcrm import wire as k
from fedcrm.compliance import ManifestError
from fedcrm.compliance.manifest import ConsentRefusal, RoundManifest, parse_consent_record
from fedcrm.strategies.validated import Rejection

logger = logging.getLogger(__name__)


STATISTICS_ROUND = 0
"""The round number of the federated-statistics query in refusal events and the audit log."""


@dataclass(frozen=True)
class ManifestEvent:
    """A branch's round manifest, as received by the coordinator."""

    round: int
    node_id: int
    manifest: RoundManifest


@dataclass(frozen=True)
class ConsentRefusalEvent:
    """A branch's refusal of the run's purpose, as received by the coordinator."""

    round: int
    node_id: int
    refusal: ConsentRefusal


@dataclass
class ConsentScreen:
    """The outcome of screening one round's training replies."""

    kept: list[Message]
    """Replies with a valid manifest, and error replies (the validating strategy records those)."""
    manifests: list[ManifestEvent]
    refusals: list[ConsentRefusalEvent]
    dropped: list[Rejection]
    """Updates without a valid consent record."""


def screen_consent_replies(server_round: int, replies: list[Message]) -> ConsentScreen:
    """Split a round's training replies into admitted (with manifest), refused and dropped."""
    screen = ConsentScreen([], [], [], [])
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            screen.kept.append(reply)
            continue
        record = reply.content.config_records.get(k.CONSENT)
        if record is None:
            reason = "consent-gated run: reply has no round manifest"
            screen.dropped.append(Rejection(server_round, node, reason))
            continue
        try:
            parsed = parse_consent_record(dict(record))
        except ManifestError as exc:
            screen.dropped.append(Rejection(server_round, node, f"consent-gated run: {exc}"))
            continue
        if isinstance(parsed, ConsentRefusal):
            screen.refusals.append(ConsentRefusalEvent(server_round, node, parsed))
            continue
        screen.manifests.append(ManifestEvent(server_round, node, parsed))
        screen.kept.append(reply)
    for rejection in screen.dropped:
        logger.warning(
            "round %d: update of node %d dropped: %s",
            rejection.server_round,
            rejection.node_id,
            rejection.reason,
        )
    return screen


@dataclass
class StatisticsScreen:
    """The outcome of screening the federated-statistics replies of a consent-gated run."""

    kept: list[Message]
    """Replies carrying statistics (no consent record), and error replies."""
    refusals: list[ConsentRefusalEvent]
    """Branches refusing the run's purpose (round :data:`STATISTICS_ROUND`)."""
    dropped: list[Rejection]
    """Replies with a malformed consent record (a statistics reply carries none otherwise)."""


def screen_statistics_replies(replies: list[Message]) -> StatisticsScreen:
    """Split the statistics replies into statistics, refusals of the run, and malformed ones."""
    screen = StatisticsScreen([], [], [])
    for reply in replies:
        record = None if reply.has_error() else reply.content.config_records.get(k.CONSENT)
        if record is None:
            screen.kept.append(reply)
            continue
        node = reply.metadata.src_node_id
        try:
            parsed = parse_consent_record(dict(record))
        except ManifestError as exc:
            parsed = None
            reason = f"consent-gated run: {exc}"
        else:
            reason = "consent-gated run: a statistics reply carries a round manifest"
        if isinstance(parsed, ConsentRefusal):
            screen.refusals.append(ConsentRefusalEvent(STATISTICS_ROUND, node, parsed))
            continue
        screen.dropped.append(Rejection(STATISTICS_ROUND, node, reason))
        logger.warning("statistics query: reply of node %d dropped: %s", node, reason)
    return screen
