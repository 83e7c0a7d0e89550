"""User-level DP-SGD for the shared item tower of the recommender (one customer = one DP unit).

DP-SGD (Abadi et al. 2016, arXiv:1607.00133) through the Opacus adapter
(`fedcrm.privacy.make_private`), with *users* as the rows that are Poisson-sampled,
clipped and noised: each row holds one customer's most recent ``cap`` training interactions and
their sampled negatives, and that customer's whole gradient on the item factors and biases is
clipped to norm C before Gaussian noise is added (user-level DP-SGD, McMahan et al. 2018,
"Learning differentially private recurrent language models", arXiv:1710.06963).

A round alternates two steps (as in private alternating minimisation, Jain, Thakkar and
Thakurta 2018, "Differentially private matrix completion revisited", arXiv:1712.09765):

1. `fit_user_factors`: the branch fits its customers' user factors on their own interactions
   with the item tower frozen. User factors never leave the branch.
2. `train_items_private`: the item tower is trained with user-level DP-SGD, user factors fixed.

Notes:
    What ε protects: the item tower a branch sends (and everything computed from it) is
    (ε, δ)-DP with respect to adding or removing one customer of that branch with all of their
    interactions (add/remove neighbours). Customer u's user factors depend on u's own data and
    on earlier, already private, item towers; they enter only u's own clipped row, so u's
    influence on every noisy step stays bounded by C. The user factors themselves are not
    private: they are the branch's and serve only that customer (joint or "billboard" DP, Hsu
    et al. 2014, arXiv:1311.2828), as the branch holds the raw interactions anyway. The cap
    bounds the work per row; it is not needed for the guarantee (the clipping is per customer).
"""

from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrm.data.interactions import NO_ITEM, Interactions, preceding_items
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import Loss, TrainMetrics, sample_training_negatives, train_branch
from fedcrm.models.recommender import ItemTower, MatrixFactorisation
from fedcrm.privacy import AccountingEvent, make_private

PADDING: Final = -1.0
"""Target value of the padding slots of a user row (they add nothing to the loss)."""


@dataclass(frozen=True)
class UserRows:
    """One row per customer with training interactions: the DP-SGD dataset.

    Attributes:
        users: Local index of each row's customer.
        items: ``(rows, cap * (1 + k))`` item indices (padding slots hold item 0).
        targets: Same shape: 1 for a positive, 0 for a sampled negative, `PADDING` for padding.
        recent: For a history model, ``(rows, cap * (1 + k), history)``: the items of the
            customer's events before each slot's event (`NO_ITEM` in padding); else ``None``.
    """

    users: Tensor
    items: Tensor
    targets: Tensor
    recent: Tensor | None = None

    def __len__(self) -> int:
        return int(self.users.shape[0])


def user_rows(
    log: Interactions,
    *,
    cap: int,
    negatives_per_positive: int,
    rng: np.random.Generator,
    history: int = 0,
) -> UserRows:
    """Build one row per customer: their latest ``cap`` events, each with its sampled negatives.

    With ``history > 0`` each slot also carries the items of the customer's ``history`` events
    before its event (all of them the same customer's data, inside the same row).

    Raises:
        ConfigError: ``cap`` or ``negatives_per_positive`` is below 1.
    """
    if cap < 1 or negatives_per_positive < 1:
        raise ConfigError(
            f"cap and negatives_per_positive must be >= 1, got {cap}, {negatives_per_positive}"
        )
    order = np.lexsort((np.arange(len(log)), -log.timestamp, log.user))  # latest first
    users_sorted = log.user[order]
    counts = np.bincount(users_sorted, minlength=log.n_users)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(log)) - np.repeat(starts, counts)
    keep = order[position < cap]  # each customer's latest `cap` events
    kept_mask = np.isin(np.arange(len(log)), keep)
    kept = log.select(kept_mask)
    context = preceding_items(log, history)[kept_mask]
    negatives = sample_training_negatives(kept, negatives_per_positive, rng)
    customers = np.flatnonzero(kept.counts_per_user() > 0)
    row_of = np.full(log.n_users, -1, dtype=np.int64)
    row_of[customers] = np.arange(len(customers))
    width = cap * (1 + negatives_per_positive)
    items = np.zeros((len(customers), width), dtype=np.int64)
    targets = np.full((len(customers), width), PADDING, dtype=np.float32)
    recent = np.full((len(customers), width, history), NO_ITEM, dtype=np.int64)
    slot = np.zeros(len(customers), dtype=np.int64)
    per_event = 1 + negatives_per_positive
    for event in range(len(kept)):
        row = row_of[kept.user[event]]
        start = slot[row]
        items[row, start] = kept.item[event]
        targets[row, start] = 1.0
        items[row, start + 1 : start + per_event] = negatives[event]
        targets[row, start + 1 : start + per_event] = 0.0
        recent[row, start : start + per_event] = context[event]
        slot[row] = start + per_event
    return UserRows(
        users=torch.from_numpy(customers.astype(np.int64)),
        items=torch.from_numpy(items),
        targets=torch.from_numpy(targets),
        recent=torch.from_numpy(recent) if history else None,
    )


class ItemScorer(nn.Module):
    """Logits of a user row's items from the user's (fixed) factors and the shared item tower.

    The input packs each row as ``[user factors (d), item indices (W), history (W * h)]`` in
    one float tensor (the history part only for a history model), so that Opacus sees one
    example per customer; only ``items`` holds parameters.
    """

    def __init__(self, items: ItemTower, factors: int) -> None:
        super().__init__()
        self.items = items
        self.factors = factors

    def forward(self, features: Tensor) -> Tensor:
        """Return ``(batch, W)`` logits."""
        history = self.items.context_length
        p = features[:, : self.factors]
        packed = features[:, self.factors :].round().long()
        width = packed.shape[1] // (1 + history)
        q, b = self.items(packed[:, :width])
        users = p[:, None, :]
        if history:
            users = users + self.items.history(packed[:, width:].reshape(-1, width, history))
        out: Tensor = (users * q).sum(dim=-1) + b
        return out


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy that ignores `PADDING` targets (0 loss, 0 gradient there).

    With ``reduction="none"`` each slot's loss is multiplied by the row width, so that the
    adapter's per-row mean is the *sum* over the customer's slots: a customer's gradient then
    grows with their interactions until the clipping norm bounds it, instead of being divided
    by the padded row width.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-slot losses (``reduction="none"``), or their mean / sum."""
        mask = targets != PADDING
        labels = torch.where(mask, targets, torch.zeros_like(targets))
        losses = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        losses = torch.where(mask, losses, torch.zeros_like(losses))
        if self.reduction == "none":
            return losses * losses.shape[-1]
        return losses.sum() if self.reduction == "sum" else losses.mean()


def fit_user_factors(
    model: MatrixFactorisation,
    log: Interactions,
    *,
    epochs: int,
    lr: float,
    negatives_per_positive: int,
    seed: int,
    weight_decay: float,
    batch_size: int,
    loss: Loss,
    recency_halflife: float,
) -> TrainMetrics:
    """Train only the user factors (item tower frozen): the branch-local half of a DP round."""
    frozen = list(model.items.parameters())
    for param in frozen:
        param.requires_grad_(False)
    try:
        return train_branch(
            model,
            log,
            epochs=epochs,
            lr=lr,
            negatives_per_positive=negatives_per_positive,
            seed=seed,
            weight_decay=weight_decay,
            batch_size=batch_size,
            loss=loss,
            recency_halflife=recency_halflife,
        )
    finally:
        for param in frozen:
            param.requires_grad_(True)


def train_items_private(
    model: MatrixFactorisation,
    rows: UserRows,
    *,
    lr: float,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    max_grad_norm: float,
    max_steps: int,
    seed: int | None = None,
) -> tuple[float, AccountingEvent | None]:
    """Train the item tower with user-level DP-SGD (plain SGD on the noisy gradients).

    Plain SGD, not Adam: Adam rescales every coordinate to a step of about ``lr`` whatever its
    signal, so on the many item rows that no sampled customer touched it would take full steps
    of pure noise.

    Args:
        model: The branch's model; its user factors are read, never changed.
        rows: One row per customer (`user_rows`).
        lr: SGD learning rate.
        batch_size: Expected customers per step (Poisson rate = batch_size / rows).
        epochs: Local epochs (``int(1/q)`` steps each).
        noise_multiplier: σ planned for the federation.
        max_grad_norm: C, the per-customer clipping norm.
        max_steps: Steps admitted by the budget check.
        seed: Noise and sampling seed for reproducible tests; ``None`` seeds from the OS.

    Returns:
        The mean loss of the last epoch and the accounting event (``None`` if no step ran).
    """
    with torch.no_grad():
        factors = model.users.embedding.weight[rows.users].detach().clone()
    packed = [factors, rows.items.to(factors.dtype)]
    if rows.recent is not None:
        packed.append(rows.recent.reshape(len(rows), -1).to(factors.dtype))
    features = torch.cat(packed, dim=1)
    loader = DataLoader(TensorDataset(features, rows.targets), batch_size=batch_size)
    scorer = ItemScorer(model.items, model.factors)
    optimiser = torch.optim.SGD(scorer.parameters(), lr=lr)
    scorer.train()
    loss = float("nan")
    with make_private(
        scorer,
        optimiser,
        loader,
        criterion=MaskedBCEWithLogits(),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        grad_sample_mode="hooks",
        max_steps=max_steps,
        seed=seed,
    ) as private:
        for _ in range(epochs):
            loss = private.train_epoch()
        event = private.event()
        private.close()
    model.eval()
    return loss, event
