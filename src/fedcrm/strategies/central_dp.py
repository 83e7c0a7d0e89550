"""Branch-level (central) DP through Flower's own DP wrappers, with fedcrm's accounting.

:class:`CentralDPStrategy` sits between reply validation and Flower's
``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``: it checks the budget,
reseeds NumPy's generator from the OS CSPRNG, forces equal weights and the true reply count,
fixes the order and rule of Flower's adaptive clipping, and writes one ledger row per round
with ε from :class:`fedcrm.privacy.CentralAccountant`. The wrapping order and why each fix is
needed: docs/privacy-analysis.md#flower-work-arounds.
"""

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase

from fedcrm import wire as k
from fedcrm.compliance import (
    Accountant,
    Decision,
    LedgerEntry,
    Mechanism,
    NeighbouringRelation,
    PrivacyLedger,
    PrivacyUnit,
    SamplingMethod,
)
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy import (
    CENTRAL_SAMPLE_RATE,
    LEDGER_SCOPE,
    OPACUS_VERSION,
    AccountingEvent,
    CentralAccountant,
    CentralDPConfig,
    CentralDPMode,
    CentralNoisePlan,
    event_json,
    flower_noise_multiplier,
    reseed_global_numpy,
)
from fedcrm.strategies.validated import check_update

logger = logging.getLogger(__name__)

WEIGHT_KEY: Final = "central-dp-weight"
"""The constant weight the inner FedAvg averages by under central DP (equal weights)."""
NORM_RTOL: Final = 1e-4
"""Relative slack of the server's check that a branch-clipped update has norm <= C (float32)."""

FlowerDPWrapper = (
    DifferentialPrivacyServerSideFixedClipping
    | DifferentialPrivacyClientSideFixedClipping
    | DifferentialPrivacyServerSideAdaptiveClipping
    | DifferentialPrivacyClientSideAdaptiveClipping
)


class CentralBudgetExhausted(FedCrmError):
    """The next round would take the federation's branch-level ε past its budget."""


@dataclass
class CentralRound:
    """What one released round spent."""

    round: int
    replies: int
    clipping_norm: float
    epsilon_round: float
    epsilon: float


@dataclass
class CentralDPSummary:
    """Branch-level DP of a run, for the summary and the report."""

    description: str
    plan: CentralNoisePlan
    rounds: list[CentralRound] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """Plain JSON data."""
        return {
            "privacy_unit": str(PrivacyUnit.BRANCH),
            "neighbouring_relation": str(NeighbouringRelation.ADD_REMOVE),
            "mechanism": str(Mechanism.GAUSSIAN),
            "sampling": "none (q = 1, no amplification claimed)",
            "description": self.description,
            "noise": self.plan.describe(),
            "effective_noise_multiplier": self.plan.effective_noise_multiplier,
            "update_noise_multiplier": self.plan.update_noise_multiplier,
            "clipped_count_stddev": self.plan.clipped_count_stddev,
            "delta": self.plan.delta,
            "accountant": self.plan.accountant,
            "library_version": f"opacus {OPACUS_VERSION}",
            "planned_epsilon": self.plan.planned_epsilon,
            "epsilon": self.rounds[-1].epsilon if self.rounds else 0.0,
            "rounds": [r.__dict__ for r in self.rounds],
        }


def ledger_history(ledger: PrivacyLedger | None, config: CentralDPConfig) -> list[float]:
    """Noise multipliers of the branch-level rounds already released for (model, purpose).

    Raises:
        ConfigError: The history was accounted with another accountant or δ.
    """
    if ledger is None:
        return []
    out: list[float] = []
    for entry in ledger.entries(branch=LEDGER_SCOPE, model=config.model, purpose=config.purpose):
        if entry.decision != Decision.ADMITTED or entry.privacy_unit != PrivacyUnit.BRANCH:
            continue
        if entry.accountant != Accountant(config.accountant) or not math.isclose(
            entry.delta, config.delta, rel_tol=1e-12
        ):
            raise ConfigError(
                f"the ledger's branch-level history for ({config.model}, {config.purpose}) was "
                f"accounted with {entry.accountant} at delta {entry.delta:g}; keep accountant "
                f"{entry.accountant} and delta {entry.delta:g} (or use another ledger)"
            )
        out.extend([entry.noise_multiplier] * entry.steps)
    return out


def branch_ledger_entry(
    config: CentralDPConfig,
    *,
    run_id: str,
    server_round: int,
    noise_multiplier: float,
    clipping_norm: float,
    epsilon: float,
    cumulative: float,
    decision: Decision,
    reason: str | None = None,
    noise_added_at: str = "server",
) -> LedgerEntry:
    """One round of branch-level DP as a ledger row (Gaussian, add/remove one branch, q = 1).

    ``noise_added_at``: ``server`` (central DP) or ``branches`` (distributed DP).
    """
    admitted = decision == Decision.ADMITTED and noise_multiplier > 0
    return LedgerEntry(
        run_id=run_id,
        round=server_round,
        branch=LEDGER_SCOPE,
        model=config.model,
        purpose=config.purpose,
        privacy_unit=PrivacyUnit.BRANCH,
        neighbouring_relation=NeighbouringRelation.ADD_REMOVE,
        mechanism=Mechanism.GAUSSIAN,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        sampling_rate=CENTRAL_SAMPLE_RATE,
        sampling_method=SamplingMethod.NONE,
        steps=1,
        delta=config.delta,
        accountant=Accountant(config.accountant),
        library_version=f"opacus {OPACUS_VERSION}",
        epsilon=epsilon,
        cumulative_epsilon=cumulative,
        decision=decision,
        reason=reason,
        epsilon_budget=config.budget,
        dp_event=event_json(
            AccountingEvent(noise_multiplier, CENTRAL_SAMPLE_RATE, 1), noise_added_at=noise_added_at
        )
        if admitted
        else None,
    )


def _flower_wrapper(
    inner: Strategy, cfg: CentralDPConfig, plan: CentralNoisePlan
) -> FlowerDPWrapper:
    # num_sampled_clients is a placeholder: CentralDPStrategy sets it to the number of updates
    # aggregated, every round, before Flower computes the noise.
    z, c = plan.update_noise_multiplier, cfg.clipping_norm
    if not cfg.mode.adaptive:
        fixed = (
            DifferentialPrivacyServerSideFixedClipping
            if cfg.mode is CentralDPMode.SERVER_FIXED
            else DifferentialPrivacyClientSideFixedClipping
        )
        return fixed(inner, z, c, 1)
    sigma_b = plan.clipped_count_stddev
    if sigma_b is None:  # pragma: no cover - plan() sets it for adaptive modes
        raise ConfigError("adaptive clipping needs a clipped-count standard deviation")
    adaptive = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if cfg.mode is CentralDPMode.SERVER_ADAPTIVE
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    wrapper = adaptive(
        inner,
        flower_noise_multiplier(z, sigma_b),
        1,
        initial_clipping_norm=c,
        target_clipped_quantile=cfg.target_quantile,
        clip_norm_lr=cfg.clip_norm_lr,
        clipped_count_stddev=sigma_b,
    )
    if not math.isclose(wrapper.noise_multiplier, z, rel_tol=1e-9):
        raise FedCrmError(  # pragma: no cover - guards against a change in Flower's formula
            f"Flower's adaptive wrapper adds noise multiplier {wrapper.noise_multiplier}, "
            f"fedcrm planned {z}"
        )
    return wrapper


def _update_norm(reply: Message, sent: list[np.ndarray]) -> float:
    record = next(iter(reply.content.array_records.values()))
    squares = 0.0
    for got, ref in zip(record.to_numpy_ndarrays(), sent, strict=True):
        diff = got.astype(np.float64) - ref.astype(np.float64)
        squares += float(np.sum(diff * diff))
    return math.sqrt(squares)


def _rescale(arrays: ArrayRecord, sent: list[np.ndarray], factor: float) -> ArrayRecord:
    """``g + factor (arrays - g)``: the mean over m' updates turned into the mean over m."""
    return ArrayRecord(
        {
            name: Array((ref + factor * (got - ref)).astype(got.dtype))
            for (name, got), ref in zip(
                zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True), sent, strict=True
            )
        }
    )


class CentralDPStrategy(Strategy):
    """Branch-level central DP around a FedAvg-family strategy, with fedcrm's accounting.

    Args:
        inner: FedAvg or FedProx (a strategy whose ``aggregate_train`` is FedAvg's).
        config: The ``[central-dp]`` settings.
        rounds: Rounds of this run (the noise is planned for them).
        ledger: Where each round's ε is recorded (and the earlier history is read from).
        run_id: The run's id in the ledger.

    Raises:
        ConfigError: The inner strategy is not FedAvg's mean (FedAdam, a robust aggregator).
        fedcrm.privacy.dp.NoiseCalibrationError: The target ε cannot be reached.
    """

    def __init__(
        self,
        inner: Strategy,
        config: CentralDPConfig,
        *,
        rounds: int,
        ledger: PrivacyLedger | None = None,
        run_id: str = "run",
    ) -> None:
        if config.mode is CentralDPMode.DISTRIBUTED:
            raise ConfigError(
                "central DP mode 'distributed' runs under HE: use "
                "fedcrm.strategies.distributed_dp.DistributedDPStrategy"
            )
        if not isinstance(inner, FedAvg) or type(inner).aggregate_train is not (
            FedAvg.aggregate_train
        ):
            raise ConfigError(
                f"central DP needs FedAvg's mean as the inner aggregation, got "
                f"{type(inner).__name__}: Flower's wrappers add noise after the inner strategy, "
                "so a server optimiser or robust aggregator would not be covered by the analysis"
            )
        self.inner = inner
        self._weight_key = inner.weighted_by_key
        self.config = config
        self.plan = config.plan(rounds)
        self.dp = _flower_wrapper(inner, config, self.plan)
        self.ledger = ledger
        self.run_id = run_id
        history = ledger_history(ledger, config)
        self.accountant = CentralAccountant(
            accountant=config.accountant, delta=config.delta, history=history
        )
        self.summary_data = CentralDPSummary(config.describe(), self.plan)
        self._sent: list[np.ndarray] | None = None
        self._sent_record: ArrayRecord | None = None
        self._sent_names: list[str] = []
        self._pending_fraction: list[float] = []
        if isinstance(self.dp, DifferentialPrivacyAdaptiveBase):
            # Instance patch (not a subclass): defer Flower's clip-norm update until after the
            # noise is added, then apply Andrew et al.'s rule (see the module docstring).
            self.dp._geometric_update = self._pending_fraction.append  # type: ignore[method-assign,assignment]
        logger.info("central DP: %s; %s", config.describe(), self.plan.describe())
        if history:
            logger.info(
                "central DP: continuing from %d earlier released rounds (epsilon %.4g)",
                len(history),
                self.accountant.epsilon(),
            )

    def _entry(
        self,
        server_round: int,
        *,
        epsilon: float,
        cumulative: float,
        decision: Decision,
        reason: str | None = None,
        clipping_norm: float | None = None,
    ) -> LedgerEntry:
        return branch_ledger_entry(
            self.config,
            run_id=self.run_id,
            server_round=server_round,
            noise_multiplier=self.plan.effective_noise_multiplier,
            clipping_norm=self.clipping_norm if clipping_norm is None else clipping_norm,
            epsilon=epsilon,
            cumulative=cumulative,
            decision=decision,
            reason=reason,
        )

    @property
    def clipping_norm(self) -> float:
        """The clipping norm of the current round."""
        return float(self.dp.clipping_norm)

    # -- Strategy ---------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the settings and delegate."""
        logger.info("CentralDPStrategy: %s", self.config.describe())
        self.dp.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Refuse the round if it would exceed the budget; otherwise delegate to Flower's wrapper.

        Raises:
            CentralBudgetExhausted: The round would take ε past the budget (recorded as refused
                in the ledger first).
        """
        budget = self.config.budget
        z = self.plan.effective_noise_multiplier
        if budget is not None:
            projected = self.accountant.projected_epsilon(z)
            if projected > budget:
                current = self.accountant.epsilon()
                reason = (
                    f"branch-level epsilon would reach {projected:.4g} > budget {budget:g} for "
                    f"({self.config.model}, {self.config.purpose}) at delta {self.config.delta:g}"
                )
                if self.ledger is not None:
                    self.ledger.append(
                        self._entry(
                            server_round,
                            epsilon=CentralAccountant(
                                accountant=self.config.accountant,
                                delta=self.config.delta,
                                history=[z],
                            ).epsilon(),
                            cumulative=current,
                            decision=Decision.REFUSED,
                            reason=reason,
                        )
                    )
                raise CentralBudgetExhausted(f"round {server_round}: {reason}")
        self._sent_record = arrays
        self._sent = arrays.to_numpy_ndarrays()
        self._sent_names = list(arrays.keys())
        return self.dp.configure_train(server_round, arrays, config, grid)

    def check_reply(self, server_round: int, reply: Message) -> str | None:
        """Why ``reply`` cannot be aggregated under central DP, or ``None`` if it can.

        The plain checks (names, shapes, finite values, a positive example count), then, in the
        client-side variants, that the update's norm is at most this round's ``C`` (the branch
        clipped it) and, with adaptive clipping, that it reports its clipped bit.
        """
        if self._sent is None or self._sent_record is None:
            return "central DP: reply before configure_train"
        reason = check_update(self._sent_record, reply, k.KEY_NUM_EXAMPLES)
        if reason is not None:
            return reason
        norm = _update_norm(reply, self._sent)
        c = self.clipping_norm
        if self.config.mode.client_side and norm > c * (1 + NORM_RTOL):
            return f"central DP: update norm {norm:.6g} exceeds the clipping norm {c:.6g}"
        if self.config.mode is CentralDPMode.CLIENT_ADAPTIVE:
            metrics = next(iter(reply.content.metric_records.values()))
            if metrics.get(k.KEY_NORM_BIT) not in (0, 1):
                return "central DP: reply has no clipped bit (adaptiveclipping_mod missing)"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip (server-side variants), average with equal weights, add noise, account.

        ``replies`` have passed :meth:`check_reply` (through ``ValidatedStrategy``).
        """
        good = list(replies)
        if not good:
            return None, None
        for reply in good:
            for record in reply.content.metric_records.values():
                record[WEIGHT_KEY] = 1.0
        clipping_norm = self.clipping_norm
        m = len(good)
        sent = self._sent if self._sent is not None else []
        # An exactly-zero update (e.g. a branch whose loss gradient underflows) is a valid
        # contribution, but Flower's clipping divides by its norm. It adds nothing to the sum,
        # so Flower averages the others (m' of them, noise z C / m') and the result is rescaled
        # to the mean over all m: g + (m'/m)(out' - g) has noise z C / m, exactly as if Flower
        # had averaged all m (see _rescale).
        nonzero = [r for r in good if _update_norm(r, sent) > 0.0]
        self._pending_fraction.clear()
        reseed_global_numpy()
        if nonzero:
            self.dp.num_sampled_clients = len(nonzero)
            # Equal weights (sensitivity C on the sum) for training only; evaluation replies
            # keep the inner strategy's own weight key.
            self.inner.weighted_by_key = WEIGHT_KEY
            try:
                arrays, metrics = self.dp.aggregate_train(server_round, nonzero)
            finally:
                self.inner.weighted_by_key = self._weight_key
            if arrays is None:
                return None, metrics
            if len(nonzero) < m:
                arrays = _rescale(arrays, sent, len(nonzero) / m)
        else:  # every update is zero: the same mechanism, noise only
            std = self.plan.update_noise_multiplier * clipping_norm / m
            arrays = ArrayRecord(
                {
                    name: Array((ref + np.random.normal(0.0, std, ref.shape)).astype(ref.dtype))
                    for name, ref in zip(self._sent_names, sent, strict=True)
                }
            )
            metrics = MetricRecord()
            if self.plan.clipped_count_stddev is not None:
                noisy = float(np.random.normal(0.0, self.plan.clipped_count_stddev))
                self._pending_fraction.append(noisy / m)
        if isinstance(self.dp, DifferentialPrivacyAdaptiveBase):
            scale = len(nonzero) / m if nonzero else 1.0  # zero updates are never clipped
            for clipped_fraction in self._pending_fraction:
                # Andrew et al. 2021: C <- C exp(-lr (unclipped fraction - quantile)).
                unclipped = 1.0 - clipped_fraction * scale
                self.dp.clipping_norm *= math.exp(
                    -self.dp.clip_norm_lr * (unclipped - self.config.target_quantile)
                )
        epsilon_round, epsilon = self.accountant.record(self.plan.effective_noise_multiplier)
        if self.ledger is not None:
            self.ledger.append(
                self._entry(
                    server_round,
                    epsilon=epsilon_round,
                    cumulative=epsilon,
                    decision=Decision.ADMITTED,
                    clipping_norm=clipping_norm,
                )
            )
        self.summary_data.rounds.append(
            CentralRound(server_round, m, clipping_norm, epsilon_round, epsilon)
        )
        out = MetricRecord(
            {
                key: value
                for key, value in (metrics or MetricRecord()).items()
                if key not in (k.KEY_NORM_BIT, WEIGHT_KEY)  # the exact clipped share is private
            }
        )
        out["central-dp-epsilon"] = epsilon
        out["central-dp-clipping-norm"] = clipping_norm
        out["central-dp-branches"] = m
        logger.info(
            "round %d: central DP noise on %d branch updates (C = %.4g), branch-level epsilon "
            "%.4g (round %.4g) at delta %g",
            server_round,
            m,
            clipping_norm,
            epsilon,
            epsilon_round,
            self.config.delta,
        )
        return arrays, out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.dp.aggregate_evaluate(server_round, replies)
