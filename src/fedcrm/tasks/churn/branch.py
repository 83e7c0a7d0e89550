"""A churn branch's side of a round: its export, local training and local evaluation.

Everything here runs on the branch. Only aggregates leave it: model parameters, row counts,
per-feature moments, log-loss sums and score histograms; never a row or a customer id.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrm.data.check import coerce_frame, read_export
from fedcrm.data.loaders import load_branch_export
from fedcrm.data.preprocess import Moments, Scaler, encode, local_moments
from fedcrm.data.schema import ChurnSchema
from fedcrm.data.split import Split, split_frame
from fedcrm.models.churn import (
    TrainSettings,
    make_optimizer,
    model_from_state,
    predict_proba,
    train_local,
)
from fedcrm.models.metrics import ScoreHistogram, log_loss_sum
from fedcrm.privacy import AccountingEvent, DPSGDConfig, NoisePlan, make_private

EXPORT_FILE: Final = "export.parquet"
"""A simulated branch's pseudonymised export, in its folder ``branches/NNN/``."""


@dataclass(frozen=True)
class BranchData:
    """Where a branch's export lives and whether its ids still need pseudonymising."""

    export: Path
    key: bytes | None = None
    """The branch's HMAC key; ``None`` when the export's ids are already pseudonyms."""

    def load(self, schema: ChurnSchema, *, seed: int) -> Split:
        """Read, validate, pseudonymise and split the export (same split on every call)."""
        if self.key is not None:
            frame = load_branch_export(self.export, schema, self.key)
        else:
            frame = coerce_frame(read_export(self.export), schema)
        return split_frame(frame, label=schema.label, seed=seed)


def _keep(frame: pd.DataFrame, id_column: str, kept: set[str]) -> pd.DataFrame:
    # A set lookup per row: Series.isin converts the whole set for Arrow strings (slower).
    mask = [str(customer) in kept for customer in frame[id_column].tolist()]
    return frame[mask].reset_index(drop=True)


@dataclass(frozen=True)
class ChurnData:
    """A branch's split rows and the schema they follow."""

    split: Split
    schema: ChurnSchema

    @property
    def num_examples(self) -> int:
        """Training rows."""
        return len(self.split.train)

    def subjects(self) -> dict[str, list[str]]:
        """The pseudonymous ids of each part (one row per customer)."""
        column = self.schema.id_column
        parts = {"train": self.split.train, "val": self.split.val, "test": self.split.test}
        return {name: [str(c) for c in frame[column].tolist()] for name, frame in parts.items()}

    def keep(self, kept: set[str]) -> "ChurnData":
        """The rows of the customers in ``kept`` only."""
        column = self.schema.id_column
        split = Split(
            *(_keep(f, column, kept) for f in (self.split.train, self.split.val, self.split.test))
        )
        return ChurnData(split, self.schema)

    def one_row_per_customer(self) -> bool:
        """Whether every training row is a distinct customer (DP's unit is then the customer)."""
        ids = self.split.train[self.schema.id_column]
        return bool(ids.notna().all()) and bool(ids.is_unique)


def moments(split: Split, schema: ChurnSchema) -> Moments:
    """The branch's contribution to the federated scaler (training rows only)."""
    return local_moments(split.train, schema)


@dataclass(frozen=True)
class TrainOutcome:
    """The branch's new local parameters and how they were obtained."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float


def train(
    split: Split,
    schema: ChurnSchema,
    scaler: Scaler,
    global_state: dict[str, torch.Tensor],
    settings: TrainSettings,
    *,
    seed: int,
) -> TrainOutcome:
    """Train the global model on the branch's training rows."""
    x, y = encode(split.train, schema, scaler)
    model = model_from_state(global_state)
    loss = train_local(model, x, y, settings, seed=seed, global_state=global_state)
    return TrainOutcome(model.state_dict(), len(y), loss)


@dataclass(frozen=True)
class PrivateTrainOutcome:
    """The branch's new parameters after a DP-SGD round, and the steps it took.

    No training loss: it is computed from the private rows outside the DP mechanism, so it is
    never released.
    """

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    event: AccountingEvent | None
    """The steps actually taken, for the branch's accountant (``None``: no step)."""


def train_private(
    split: Split,
    schema: ChurnSchema,
    scaler: Scaler,
    global_state: dict[str, torch.Tensor],
    settings: TrainSettings,
    *,
    dp: DPSGDConfig,
    plan: NoisePlan,
    seed: int | None = None,
) -> PrivateTrainOutcome:
    """Train the global model on the branch's training rows with record-level DP-SGD.

    DP-SGD (Abadi et al. 2016, arXiv:1607.00133) through :func:`fedcrm.privacy.make_private`:
    Poisson batches at rate ``plan.sample_rate``, per-example clipping to ``dp.max_grad_norm``,
    Gaussian noise ``plan.noise_multiplier * C``, at most ``plan.steps_per_round`` steps (the
    number the budget check admitted). The local optimiser (SGD with momentum or Adam) only
    post-processes the noisy gradients. FedProx's proximal term is not applied (its gradient
    is not per-example clipped); the federation config refuses FedProx with DP.

    Args:
        split: The branch's rows.
        schema: Declared schema.
        scaler: The federated scaler.
        global_state: The global model.
        settings: Local optimisation settings (epochs, batch size, lr, optimiser).
        dp: The run's DP-SGD settings (clipping norm, per-sample gradient mode).
        plan: The branch's noise, planned once for the federation (its batch size must equal
            ``settings.batch_size``).
        seed: Noise and sampling seed for reproducible experiments; ``None`` (deployment)
            seeds from the OS CSPRNG.
    """
    x, y = encode(split.train, schema, scaler)
    model = model_from_state(global_state)
    optimizer = make_optimizer(model, settings)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=plan.batch_size
    )
    model.train()
    with make_private(
        model,
        optimizer,
        loader,
        criterion=nn.BCEWithLogitsLoss(),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        grad_sample_mode=dp.grad_sample_mode,
        max_steps=plan.steps_per_round,
        seed=seed,
    ) as private:
        for _ in range(plan.local_epochs):
            private.train_epoch()
        event = private.event()
        trained = private.close()
    return PrivateTrainOutcome(
        {name: t.detach().clone() for name, t in trained.state_dict().items()}, len(y), event
    )


@dataclass(frozen=True)
class EvalOutcome:
    """Aggregates of the global model's scores on the branch's validation and test rows."""

    num_examples: int
    loss_sum: float
    branch_auc: float
    val: ScoreHistogram
    test: ScoreHistogram


def evaluate(
    split: Split, schema: ChurnSchema, scaler: Scaler, global_state: dict[str, torch.Tensor]
) -> EvalOutcome:
    """Score the global model on the branch's held-out rows."""
    model = model_from_state(global_state)
    x_val, y_val = encode(split.val, schema, scaler)
    x_test, y_test = encode(split.test, schema, scaler)
    p_val, p_test = predict_proba(model, x_val), predict_proba(model, x_test)
    auc = float(roc_auc_score(y_test, p_test)) if len(np.unique(y_test)) == 2 else float("nan")
    return EvalOutcome(
        num_examples=len(y_test),
        loss_sum=log_loss_sum(y_test, p_test),
        branch_auc=auc,
        val=ScoreHistogram.of(y_val, p_val),
        test=ScoreHistogram.of(y_test, p_test),
    )


def write_export(frame: pd.DataFrame, schema: ChurnSchema, path: Path) -> None:
    """Write a coerced, pseudonymised frame as a Parquet export that `BranchData` reads back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = frame.copy()
    out[schema.label] = np.where(out[schema.label] == 1, *reversed(schema.label_values))
    out.to_parquet(path, index=False)
