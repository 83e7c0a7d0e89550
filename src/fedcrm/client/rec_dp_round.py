"""A branch's user-level DP round of the recommender: plan, check the budget, train, account.

The same discipline as churn's record-level rounds (`fedcrm.client.dp_round`): σ is planned
once for the whole federation from (target ε, δ, rounds, local epochs, customers per step /
customers), the branch's persistent accountant is checked before any training, a round past the
budget is refused with a `PrivacyReport` and sends nothing, and an admitted round records its
steps before the reply leaves. The difference is the unit: a DP-SGD row here is one *customer*
with all of their (capped) interactions, so ε is customer-level (`fedcrm.models.rec_private`).
"""

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedcrm.client.dp_round import accountant_path, round_report
from fedcrm.data.interactions import Interactions
from fedcrm.models.rec_private import fit_user_factors, train_items_private, user_rows
from fedcrm.models.rec_training import Loss
from fedcrm.models.recommender import MatrixFactorisation
from fedcrm.privacy.accounting import BranchAccountant, NoisePlan, plan_for_config
from fedcrm.privacy.config import DPConfig
from fedcrm.privacy.federated import FederatedDPConfig, PrivacyReport

logger = logging.getLogger(__name__)

UNIT_NOTE = (
    "customer-level DP-SGD on the item tower: each customer's latest interactions (capped) "
    "form one clipped row; user factors stay on the branch (joint DP)"
)


@dataclass(frozen=True)
class RecDPRound:
    """The local settings of a user-level DP round.

    Attributes:
        epochs: Local epochs (user-factor fit, then DP-SGD on the item tower).
        lr: Adam learning rate of the user-factor fit.
        negatives_per_positive: Sampled negatives per positive.
        weight_decay: L2 of the user-factor fit.
        batch_size: Examples per step of the user-factor fit.
        loss: Loss of the user-factor fit.
        recency_halflife: Time weighting of the user-factor fit.
        users_per_step: Expected customers per DP-SGD step (Poisson rate = this / customers;
            at most all of the branch's customers, which makes every step a full batch).
        cap: Latest interactions kept per customer in a DP-SGD row.
        rounds: Planned rounds (σ is planned for all of them).
        seed: Seed of negatives and of the user-factor fit.
        dp_lr: SGD learning rate of the private item-tower step.
        noise_seed: Seed of DP noise and sampling (tests only; ``None``: the OS CSPRNG).
    """

    epochs: int
    lr: float
    negatives_per_positive: int
    weight_decay: float
    batch_size: int
    loss: Loss
    recency_halflife: float
    users_per_step: int
    cap: int
    rounds: int
    seed: int
    dp_lr: float = 1.0
    noise_seed: int | None = None


@dataclass(frozen=True)
class RecDPOutcome:
    """The report, and whether the model was trained (refused: nothing may be sent)."""

    report: PrivacyReport
    trained: bool
    num_examples: int


def plan_rec_branch(
    dp: FederatedDPConfig, *, customers: int, settings: RecDPRound
) -> tuple[DPConfig, NoisePlan]:
    """The branch's DP configuration and σ for the federation (one row per customer).

    Raises:
        fedcrm.privacy.config.InvalidDPConfig: A value is out of range.
        fedcrm.privacy.accounting.AccountingError: More customers per step than customers, or
            no σ reaches the target.
    """
    config = dp.for_branch(
        num_rows=customers,
        batch_size=min(settings.users_per_step, customers),
        local_epochs=settings.epochs,
        rounds=settings.rounds,
    )
    return config, _plan(config, customers)


@functools.lru_cache(maxsize=64)
def _plan(config: DPConfig, customers: int) -> NoisePlan:
    """σ is a deterministic function of these inputs: plan it once per process, not per round."""
    return plan_for_config(config, num_rows=customers)


def private_rec_round(
    model: MatrixFactorisation,
    train: Interactions,
    settings: RecDPRound,
    *,
    dp: FederatedDPConfig,
    privacy_dir: Path,
    branch_name: str,
) -> RecDPOutcome:
    """Run one budget-checked, customer-level DP round on the branch (model trained in place).

    Raises:
        fedcrm.privacy.accounting.AccountantStateError: The stored accountant is corrupted.
        fedcrm.privacy.accounting.AccountingError: σ cannot be planned.
    """
    rng = np.random.default_rng(settings.seed)
    rows = user_rows(
        train,
        cap=settings.cap,
        negatives_per_positive=settings.negatives_per_positive,
        rng=rng,
        history=model.context_length,
    )
    config, plan = plan_rec_branch(dp, customers=len(rows), settings=settings)
    path = accountant_path(privacy_dir, model=dp.model, purpose=dp.purpose)
    accountant = BranchAccountant.open(path, accountant=config.accountant)
    decision = accountant.would_exceed(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.steps_per_round,
        delta=config.delta,
        budget=config.budget,
    )

    def report(*, reason: str, steps: int, after: float) -> PrivacyReport:
        return round_report(
            decision,
            reason=reason,
            branch_name=branch_name,
            dp=dp,
            config=config,
            plan=plan,
            unit="customer",
            steps=steps,
            after=after,
        )

    if not decision.admitted:
        logger.warning("%s: recommender DP round refused: %s", branch_name, decision.reason)
        return RecDPOutcome(
            report(reason=decision.reason, steps=0, after=decision.current_epsilon),
            trained=False,
            num_examples=len(rows),
        )
    fit_user_factors(
        model,
        train,
        epochs=settings.epochs,
        lr=settings.lr,
        negatives_per_positive=settings.negatives_per_positive,
        seed=settings.seed,
        weight_decay=settings.weight_decay,
        batch_size=settings.batch_size,
        loss=settings.loss,
        recency_halflife=settings.recency_halflife,
    )
    _, event = train_items_private(
        model,
        rows,
        lr=settings.dp_lr,
        batch_size=config.batch_size,
        epochs=settings.epochs,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.max_grad_norm,
        max_steps=plan.steps_per_round,
        seed=settings.noise_seed,
    )
    if event is not None:
        accountant.record(event)
        accountant.save(path)
    after = accountant.epsilon(config.delta)
    steps = 0 if event is None else event.steps
    logger.info(
        "%s: recommender DP round admitted, epsilon %.4f -> %.4f (delta %.3g, %d steps)",
        branch_name,
        decision.current_epsilon,
        after,
        config.delta,
        steps,
    )
    return RecDPOutcome(
        report(reason=f"{decision.reason}; {UNIT_NOTE}", steps=steps, after=after),
        trained=True,
        num_examples=len(rows),
    )
