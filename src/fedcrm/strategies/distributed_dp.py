"""Branch-level DP under HE (``[central-dp] mode = "distributed"``): budget, K_min, ledger.

:class:`DistributedDPStrategy` wraps :class:`~fedcrm.strategies.he.HEAggregation`: it sends the
branches ``z``, ``C`` and ``K_min`` in every train message's HE record (they clip and noise
their own updates before encrypting), makes the sum equal-weighted, refuses to release a sum of
fewer than ``K_min`` branches, and accounts each released round as one Gaussian mechanism with
:class:`fedcrm.privacy.CentralAccountant`. See docs/privacy-analysis.md#distributed-dp-under-he.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrm.compliance import (
    Decision,
    LedgerEntry,
    PrivacyLedger,
)
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import CentralAccountant, CentralDPConfig, CentralDPMode, DistributedNoise
from fedcrm.strategies.central_dp import (
    WEIGHT_KEY,
    CentralBudgetExhausted,
    CentralDPSummary,
    CentralRound,
    branch_ledger_entry,
    ledger_history,
)
from fedcrm.strategies.he import HEAggregation
from fedcrm.wire import HE_RECORD

__all__ = ["DistributedDPStrategy"]

logger = logging.getLogger(__name__)


class DistributedDPStrategy(Strategy):
    """Distributed branch-level DP around :class:`fedcrm.strategies.he.HEAggregation`.

    Args:
        he: The HE aggregation wrapper (its ``min_summands`` is set to ``min_honest``).
        config: The ``[central-dp]`` settings, ``mode = "distributed"``.
        rounds: Rounds of this run (the noise is planned for them).
        min_honest: ``K_min``: honest branches assumed; each branch's noise is sized so that
            any ``K_min`` of them give std ``z C`` on the sum.
        ledger: Where each round's ε is recorded (and the earlier history is read from).
        run_id: The run's id in the ledger.

    Raises:
        ConfigError: ``config.mode`` is not distributed, or ``min_honest`` < 1.
        fedcrm.privacy.dp.NoiseCalibrationError: The target ε cannot be reached.
    """

    def __init__(
        self,
        he: HEAggregation,
        config: CentralDPConfig,
        *,
        rounds: int,
        min_honest: int,
        ledger: PrivacyLedger | None = None,
        run_id: str = "run",
    ) -> None:
        if config.mode is not CentralDPMode.DISTRIBUTED:
            raise ConfigError(f"DistributedDPStrategy needs mode 'distributed', got {config.mode}")
        self.he = he
        self.config = config
        self.plan = config.plan(rounds)
        self.noise = DistributedNoise(
            self.plan.effective_noise_multiplier, config.clipping_norm, min_honest
        )
        he.min_summands = min_honest
        self.ledger = ledger
        self.run_id = run_id
        history = ledger_history(ledger, config)
        self.accountant = CentralAccountant(
            accountant=config.accountant, delta=config.delta, history=history
        )
        self.summary_data = CentralDPSummary(self.describe(), self.plan)
        logger.info("%s; %s", self.describe(), self.plan.describe())
        if history:
            logger.info(
                "distributed DP: continuing from %d earlier released rounds (epsilon %.4g)",
                len(history),
                self.accountant.epsilon(),
            )

    def describe(self) -> str:
        """One line: the central-DP description plus the distributed noise split."""
        return (
            f"{self.config.describe()}; distributed under HE: each branch clips to C and adds "
            f"N(0, {self.noise.branch_std:.4g}^2) (z C / sqrt(K_min), K_min = "
            f"{self.noise.min_honest} honest branches) before encrypting"
        )

    def _entry(
        self,
        server_round: int,
        *,
        epsilon: float,
        cumulative: float,
        decision: Decision,
        reason: str | None = None,
    ) -> LedgerEntry:
        return branch_ledger_entry(
            self.config,
            run_id=self.run_id,
            server_round=server_round,
            noise_multiplier=self.noise.noise_multiplier,
            clipping_norm=self.noise.clipping_norm,
            epsilon=epsilon,
            cumulative=cumulative,
            decision=decision,
            reason=reason,
            noise_added_at="branches",
        )

    def _round_epsilon(self) -> float:
        return CentralAccountant(
            accountant=self.config.accountant,
            delta=self.config.delta,
            history=[self.noise.noise_multiplier],
        ).epsilon()

    def _refuse(self, server_round: int, reason: str) -> None:
        logger.warning("round %d: distributed DP: %s", server_round, reason)
        if self.ledger is not None:
            self.ledger.append(
                self._entry(
                    server_round,
                    epsilon=self._round_epsilon(),
                    cumulative=self.accountant.epsilon(),
                    decision=Decision.REFUSED,
                    reason=reason,
                )
            )

    # -- Strategy ---------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the settings and delegate."""
        logger.info("DistributedDPStrategy: %s", self.describe())
        self.he.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse the round past the budget; otherwise add ``z``, ``C``, ``K_min`` for branches.

        Raises:
            CentralBudgetExhausted: The round would take ε past the budget (recorded first).
        """
        budget = self.config.budget
        if budget is not None:
            projected = self.accountant.projected_epsilon(self.noise.noise_multiplier)
            if projected > budget:
                reason = (
                    f"branch-level epsilon would reach {projected:.4g} > budget {budget:g} for "
                    f"({self.config.model}, {self.config.purpose}) at delta {self.config.delta:g}"
                )
                self._refuse(server_round, reason)
                raise CentralBudgetExhausted(f"round {server_round}: {reason}")
        messages = list(self.he.configure_train(server_round, arrays, config, grid))
        for msg in messages:
            record = msg.content.config_records[HE_RECORD]
            for key, value in self.noise.to_fields().items():
                record[key] = value
        return messages

    def check_reply(self, server_round: int, reply: Message) -> str | None:
        """Delegate to :meth:`HEAggregation.check_reply` (the envelope and the example count)."""
        return self.he.check_reply(server_round, reply)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum with equal weights; release and account only a sum of at least ``K_min``."""
        good = list(replies)
        for reply in good:
            if reply.has_error():
                continue
            for record in reply.content.metric_records.values():
                record[WEIGHT_KEY] = 1.0
        inner = self.he.inner
        weight_key = inner.weighted_by_key
        inner.weighted_by_key = WEIGHT_KEY  # equal weights: the checkpoint's count is K
        try:
            arrays, metrics = self.he.aggregate_train(server_round, good)
        finally:
            inner.weighted_by_key = weight_key
        if arrays is None:
            self._refuse(
                server_round,
                f"fewer than K_min = {self.noise.min_honest} branch updates could be summed "
                f"({len(good)} replies); the round is not released",
            )
            return None, None
        summed = self.he.checkpoints[-1].count
        epsilon_round, epsilon = self.accountant.record(self.noise.noise_multiplier)
        if self.ledger is not None:
            self.ledger.append(
                self._entry(
                    server_round,
                    epsilon=epsilon_round,
                    cumulative=epsilon,
                    decision=Decision.ADMITTED,
                )
            )
        self.summary_data.rounds.append(
            CentralRound(server_round, summed, self.noise.clipping_norm, epsilon_round, epsilon)
        )
        out = MetricRecord(
            {key: v for key, v in (metrics or MetricRecord()).items() if key != WEIGHT_KEY}
        )
        out["central-dp-epsilon"] = epsilon
        out["central-dp-clipping-norm"] = self.noise.clipping_norm
        out["central-dp-branches"] = summed
        logger.info(
            "round %d: distributed DP over %d encrypted branch updates (C = %.4g, z = %.4g), "
            "branch-level epsilon %.4g (round %.4g) at delta %g (%s, Gaussian, add/remove one "
            "branch)",
            server_round,
            summed,
            self.noise.clipping_norm,
            self.noise.noise_multiplier,
            epsilon,
            epsilon_round,
            self.config.delta,
            self.config.accountant.upper(),
        )
        return arrays, out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.he.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.he.aggregate_evaluate(server_round, replies)
