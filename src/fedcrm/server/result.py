"""What a federated run produces: one record per round and the run's result."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedcrm.compliance import LedgerEntry
from fedcrm.exceptions import FedCrmError
from fedcrm.privacy import DPSGDConfig, PrivacyReport
from fedcrm.server.consent_replies import ConsentRefusalEvent, ManifestEvent
from fedcrm.strategies.validated import Rejection
from fedcrm.tasks import Arrays


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
    """``"<branch>: <reason>"`` of every branch whose consent or budget refused the round."""
    privacy: dict[str, float] = field(default_factory=dict)
    """DP runs: admitted and refused counts and the largest cumulative ε after the round."""
    consent: dict[str, float] = field(default_factory=dict)
    """Consent-gated runs: branches admitted and refused, training customers used and excluded."""


@dataclass(frozen=True)
class PrivacyEvent:
    """A branch's privacy report for one round, as received by the coordinator."""

    round: int
    node_id: int
    report: PrivacyReport
    entry: LedgerEntry
    """Its privacy-ledger row (as stored, when the run has a ledger)."""


@dataclass
class FederationResult:
    """The outcome of a federated run.

    Attributes:
        task: The run's task.
        arrays: The released model (the round the task's selection metric chose, else the
            last); empty under HE, where the server holds ciphertext checkpoints only and the
            key holder replays them (`fedcrm.strategies.he.replay_global_model`).
        statistics: The values every train and evaluate message carried (the churn scaler).
        num_branches: Branches connected at the start.
        best_round: The released round.
        rounds: One record per round.
        rejections: Every update left out of aggregation, with the reason.
        dp: The run's DP-SGD settings (``None``: no DP).
        privacy: Every branch's privacy report, round by round (DP runs).
        manifests: Every branch's round manifest (consent-gated runs).
        consent_refusals: Every branch's refusal of the run's purpose, round by round.
        central_dp: Branch-level DP: what each round spent (`CentralDPSummary.as_dict`).
    """

    task: str
    arrays: Arrays
    statistics: dict[str, Any]
    num_branches: int
    best_round: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    dp: DPSGDConfig | None = None
    privacy: list[PrivacyEvent] = field(default_factory=list)
    manifests: list[ManifestEvent] = field(default_factory=list)
    consent_refusals: list[ConsentRefusalEvent] = field(default_factory=list)
    central_dp: dict[str, object] | None = None


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
