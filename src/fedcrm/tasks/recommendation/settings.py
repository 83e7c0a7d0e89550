"""The recommendation task's settings: the MF model, its local training and evaluation cut-off."""

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import DEFAULT_K, MFSettings
from fedcrm.settings import check_positive

Loss = Literal["bce", "bpr"]
MAX_HISTORY: Final = 50
"""Longest history context a recommendation run accepts (items per user vector)."""


@dataclass(frozen=True)
class RecSettings:
    """How every branch trains and evaluates the recommender (sent with every message).

    Matrix factorisation as in Ammad-ud-din et al. 2019 ("Federated Collaborative Filtering",
    arXiv:1901.09888): user factors stay on the branch, item factors and biases are averaged.

    Attributes:
        local_epochs: Local epochs per branch and round.
        lr: Adam learning rate of the local training.
        factors: Latent dimension of user and item factors.
        negatives_per_positive: Sampled training negatives per positive.
        weight_decay: Per-batch L2 penalty (see `fedcrm.models.rec_training.train_branch`).
        batch_size: Examples per local step.
        loss: ``"bce"`` or ``"bpr"``.
        top_k: Cut-off of HR@k and NDCG@k.
        recency_halflife: Time weighting of each user's training events, in events (see
            `fedcrm.models.rec_training.recency_weights`; 0: off).
        train_on_validation: The final fit: branches also train on their users' validation
            items (`fedcrm.data.movielens.LeaveOneOutSplit.with_validation_in_train`). Choose
            the settings and the rounds on a run without it first: validation metrics are no
            longer held out, and the released model is the last round's.
        history_length: Items of each user's latest earlier events in their user vector
            (`fedcrm.models.recommender.MatrixFactorisation` ``context``; 0: plain MF).
        users_per_step: Customer-level DP (``[dp] users-per-step``): expected customers per
            DP-SGD step (capped at a branch's customers: a full batch).
        max_interactions_per_user: Customer-level DP (``[dp] max-interactions-per-user``):
            latest interactions of a customer in their DP-SGD row.
        num_items: Size of the shared item catalogue (a simulation takes it from the data set;
            a deployment sets it, and every branch checks its catalogue against it).
    """

    local_epochs: int = 2
    lr: float = 0.01
    factors: int = 64
    negatives_per_positive: int = 4
    weight_decay: float = 0.001
    batch_size: int = 4096
    loss: Loss = "bce"
    top_k: int = DEFAULT_K
    recency_halflife: float = 0.0
    train_on_validation: bool = False
    history_length: int = 0
    users_per_step: int = 16
    max_interactions_per_user: int = 50
    num_items: int = 0

    def __post_init__(self) -> None:
        check_positive(
            self,
            (
                "local_epochs",
                "factors",
                "negatives_per_positive",
                "batch_size",
                "top_k",
                "users_per_step",
                "max_interactions_per_user",
            ),
        )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.recency_halflife) and self.recency_halflife >= 0):
            raise ConfigError(
                f"recency-halflife must be a finite number >= 0, got {self.recency_halflife}"
            )
        if not 0 <= self.history_length <= MAX_HISTORY:
            raise ConfigError(
                f"history-length must be an integer in [0, {MAX_HISTORY}], "
                f"got {self.history_length}"
            )
        if self.num_items < 0:
            raise ConfigError(f"num-items must be >= 0, got {self.num_items}")

    def local_fit(self, *, seed: int) -> dict[str, Any]:
        """The keyword arguments of one round's local fit (`train_branch`, `fit_user_factors`)."""
        return {
            "epochs": self.local_epochs,
            "lr": self.lr,
            "negatives_per_positive": self.negatives_per_positive,
            "seed": seed,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "loss": self.loss,
            "recency_halflife": self.recency_halflife,
        }

    def mf(self, *, epochs: int) -> MFSettings:
        """The same model and optimiser for a centralised MF baseline of ``epochs`` epochs."""
        return MFSettings(
            factors=self.factors,
            epochs=epochs,
            lr=self.lr,
            negatives_per_positive=self.negatives_per_positive,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            loss=self.loss,
            recency_halflife=self.recency_halflife,
            history_length=self.history_length,
        )
