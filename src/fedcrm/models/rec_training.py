"""Local training and leave-one-out ranking evaluation of the recommender, for one branch.

`train_branch` runs one branch's local epochs on implicit feedback with sampled negatives:
binary cross-entropy with ``k`` negatives per positive (He et al. 2017, "Neural Collaborative
Filtering", arXiv:1708.05031) or the pairwise BPR loss (Rendle et al. 2009, arXiv:1205.2618).
`evaluate_branch` ranks each evaluated user's held-out item against the 99 fixed sampled
negatives and against the full catalogue, and returns *sums and counts* (`RankingMetrics`) so a
server can pool branches exactly by adding them.

The ranking math (`target_ranks`, `hit_ratio`, `ndcg`) takes plain score arrays so that the
centralised baselines are measured by the same code.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from fedcrm.data.interactions import IntArray, Interactions, latest_items, preceding_items
from fedcrm.data.movielens import LeaveOneOutSplit, SampledNegatives
from fedcrm.exceptions import ConfigError, DataError
from fedcrm.models.recommender import MatrixFactorisation

DEFAULT_K: Final = 10
"""Cut-off of HR@k and NDCG@k."""
Loss = Literal["bce", "bpr"]
"""Training loss: pointwise BCE with sampled negatives, or pairwise BPR."""
Target = Literal["test", "val"]
"""Which held-out item to rank."""
ScoreFn = Callable[[IntArray], NDArray[np.floating]]
"""Maps a batch of user indices to their ``(batch, n_items)`` score matrix (higher = better)."""

_MAX_RESAMPLE_ROUNDS: Final = 64


# ---------------------------------------------------------------------------------------------
# Ranking metrics (pure functions on score arrays).


def target_ranks(
    target_scores: NDArray[np.floating],
    candidate_scores: NDArray[np.floating],
    excluded: NDArray[np.bool_] | None = None,
) -> IntArray:
    """Return the 0-based rank of each user's target among its candidates.

    The rank counts the candidates scoring *at least* as high as the target, so ties count
    against the target: a model that scores everything equally gets no credit.

    Args:
        target_scores: ``(n,)`` score of each user's held-out item.
        candidate_scores: ``(n, m)`` scores of the items it competes with.
        excluded: Optional ``(n, m)`` mask of candidates that do not compete (for example the
            target's own column and the user's training items in full-catalogue ranking).

    Raises:
        DataError: Shapes disagree or a score is not finite (a diverged model must not look
            perfect because NaN compares false).
    """
    target = np.asarray(target_scores, dtype=np.float64)
    candidates = np.asarray(candidate_scores, dtype=np.float64)
    if candidates.ndim != 2 or target.shape != (candidates.shape[0],):
        raise DataError(
            f"scores shapes disagree: target {target.shape}, candidates {candidates.shape}"
        )
    if excluded is not None and excluded.shape != candidates.shape:
        raise DataError(f"excluded mask {excluded.shape} must match candidates {candidates.shape}")
    if not (np.isfinite(target).all() and np.isfinite(candidates).all()):
        raise DataError("scores must be finite")
    beats = candidates >= target[:, None]
    if excluded is not None:
        beats &= ~excluded
    ranks: IntArray = beats.sum(axis=1).astype(np.int64)
    return ranks


def hit_ratio(ranks: IntArray, k: int = DEFAULT_K) -> NDArray[np.float64]:
    """Return 1.0 where the target ranks in the top ``k`` (0-based rank < k), else 0.0."""
    return (np.asarray(ranks) < k).astype(np.float64)


def ndcg(ranks: IntArray, k: int = DEFAULT_K) -> NDArray[np.float64]:
    """Return ``1 / log2(rank + 2)`` in the top ``k``, else 0 (one relevant item, so IDCG = 1)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


@dataclass(frozen=True)
class RankingMetrics:
    """HR@k and NDCG@k as sums over evaluated users, so that parts add up exactly.

    Attributes:
        k: The cut-off.
        count: Number of evaluated users.
        hr_sampled_sum: Sum of HR@k against the sampled negatives.
        ndcg_sampled_sum: Sum of NDCG@k against the sampled negatives.
        hr_full_sum: Sum of HR@k against the full catalogue (seen items excluded).
        ndcg_full_sum: Sum of NDCG@k against the full catalogue.
    """

    k: int
    count: int
    hr_sampled_sum: float
    ndcg_sampled_sum: float
    hr_full_sum: float
    ndcg_full_sum: float

    def __add__(self, other: "RankingMetrics") -> "RankingMetrics":
        if self.k != other.k:
            raise DataError(f"cannot add metrics at k={self.k} and k={other.k}")
        return RankingMetrics(
            k=self.k,
            count=self.count + other.count,
            hr_sampled_sum=self.hr_sampled_sum + other.hr_sampled_sum,
            ndcg_sampled_sum=self.ndcg_sampled_sum + other.ndcg_sampled_sum,
            hr_full_sum=self.hr_full_sum + other.hr_full_sum,
            ndcg_full_sum=self.ndcg_full_sum + other.ndcg_full_sum,
        )

    @classmethod
    def empty(cls, k: int = DEFAULT_K) -> "RankingMetrics":
        """Return the zero element (no users)."""
        return cls(
            k=k,
            count=0,
            hr_sampled_sum=0.0,
            ndcg_sampled_sum=0.0,
            hr_full_sum=0.0,
            ndcg_full_sum=0.0,
        )

    def _mean(self, total: float) -> float:
        return total / self.count if self.count else math.nan

    @property
    def hr_sampled(self) -> float:
        """Mean HR@k against the sampled negatives (NaN without users)."""
        return self._mean(self.hr_sampled_sum)

    @property
    def ndcg_sampled(self) -> float:
        """Mean NDCG@k against the sampled negatives (NaN without users)."""
        return self._mean(self.ndcg_sampled_sum)

    @property
    def hr_full(self) -> float:
        """Mean full-catalogue HR@k (NaN without users)."""
        return self._mean(self.hr_full_sum)

    @property
    def ndcg_full(self) -> float:
        """Mean full-catalogue NDCG@k (NaN without users)."""
        return self._mean(self.ndcg_full_sum)


def top_n(
    scores: NDArray[np.floating], *, exclude: IntArray, n: int
) -> tuple[IntArray, NDArray[np.float64]]:
    """Return the ``n`` best items of one user's catalogue scores, skipping ``exclude``.

    Ties are broken by the smaller item index, so the list is deterministic. Use it with a
    model's scores for a known customer, or with popularity counts as the fallback for a
    customer without history.

    Args:
        scores: ``(n_items,)`` scores of one user.
        exclude: Items not to recommend (those the user already interacted with).
        n: List length (shorter if fewer items remain).

    Returns:
        Item indices, best first, and their scores.

    Raises:
        ConfigError: ``n < 1``.
        DataError: ``scores`` is not one-dimensional and finite.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not np.isfinite(values).all():
        raise DataError("scores must be a finite one-dimensional array")
    allowed = np.ones(len(values), dtype=bool)
    allowed[np.asarray(exclude, dtype=np.int64)] = False
    candidates = np.flatnonzero(allowed)
    order = np.lexsort((candidates, -values[candidates]))[:n]
    best: IntArray = candidates[order].astype(np.int64)
    return best, values[best]


# ---------------------------------------------------------------------------------------------
# Evaluation.


def _items_by_user(log: Interactions) -> list[IntArray]:
    order = np.argsort(log.user, kind="stable")
    bounds = np.cumsum(np.bincount(log.user, minlength=log.n_users))[:-1]
    return np.split(log.item[order], bounds)


def evaluate_scores(
    score_fn: ScoreFn,
    split: LeaveOneOutSplit,
    negatives: SampledNegatives,
    *,
    target: Target = "test",
    k: int = DEFAULT_K,
    batch_size: int = 256,
) -> RankingMetrics:
    """Rank every evaluated user's held-out item with any scorer.

    Sampled protocol: the target competes with the user's fixed negatives. Full-catalogue
    protocol: the target competes with every item except the user's training items (and, for
    the test target, the validation item).

    Args:
        score_fn: Scores of a batch of users for the whole catalogue.
        split: The split (user indices as ``score_fn`` understands them).
        negatives: Sampled negatives aligned with ``split.eval_users``.
        target: ``"test"`` (latest item) or ``"val"`` (the one before).
        k: Cut-off of HR and NDCG.
        batch_size: Users scored at once.

    Raises:
        DataError: The negatives do not belong to the split, or scores are malformed.
    """
    if not np.array_equal(negatives.users, split.eval_users):
        raise DataError("the negatives are not aligned with the split's evaluated users")
    if k < 1 or batch_size < 1:
        raise ConfigError(f"k and batch_size must be >= 1, got {k}, {batch_size}")
    targets = split.targets(target)
    train_items = _items_by_user(split.train)
    total = RankingMetrics.empty(k)
    for start in range(0, len(split.eval_users), batch_size):
        users = split.eval_users[start : start + batch_size]
        wanted = targets[start : start + batch_size]
        scores = np.asarray(score_fn(users), dtype=np.float64)
        if scores.shape != (len(users), split.n_items):
            raise DataError(
                f"score_fn returned {scores.shape}, expected {(len(users), split.n_items)}"
            )
        rows = np.arange(len(users))
        target_scores = scores[rows, wanted]
        sampled = target_ranks(
            target_scores, scores[rows[:, None], negatives.items[start : start + batch_size]]
        )
        excluded = np.zeros(scores.shape, dtype=bool)
        for row, user in enumerate(users):
            excluded[row, train_items[user]] = True
        excluded[rows, wanted] = True
        if target == "test":
            excluded[rows, split.val_items[start : start + batch_size]] = True
        full = target_ranks(target_scores, scores, excluded)
        total = total + RankingMetrics(
            k=k,
            count=len(users),
            hr_sampled_sum=float(hit_ratio(sampled, k).sum()),
            ndcg_sampled_sum=float(ndcg(sampled, k).sum()),
            hr_full_sum=float(hit_ratio(full, k).sum()),
            ndcg_full_sum=float(ndcg(full, k).sum()),
        )
    return total


def model_scorer(model: MatrixFactorisation, history: Interactions | None = None) -> ScoreFn:
    """Wrap a model as a `ScoreFn` (evaluation mode, no gradients).

    Args:
        model: The model.
        history: The events known at scoring time, whose latest items form each user's history
            context (required exactly when the model has one).

    Raises:
        ConfigError: ``history`` is missing for a context model or given to plain MF.
    """
    if (history is None) != (model.context_length == 0):
        raise ConfigError("pass the users' history exactly when the model has a history context")
    recent = (
        None if history is None else torch.from_numpy(latest_items(history, model.context_length))
    )

    def score(users: IntArray) -> NDArray[np.float32]:
        model.eval()
        index = torch.as_tensor(users, dtype=torch.long)
        with torch.no_grad():
            out = model.score_all(index, None if recent is None else recent[index])
        return out.numpy()

    return score


def evaluate_branch(
    model: MatrixFactorisation,
    split: LeaveOneOutSplit,
    negatives: SampledNegatives,
    *,
    target: Target = "test",
    k: int = DEFAULT_K,
) -> RankingMetrics:
    """Evaluate a branch's model on its own users: HR@k / NDCG@k sums, sampled and full.

    Args:
        model: The branch's model (its user factors and the current shared item part).
        split: The branch's split (local user indices, see `fedcrm.data.movielens.branch_view`).
        negatives: The branch's sampled negatives.
        target: ``"test"`` or ``"val"``.
        k: Cut-off.

    Returns:
        Sums and the user count; add the branches' results and divide to pool them exactly.

    Raises:
        ConfigError: The model's sizes do not match the split.
    """
    _check_sizes(model, split.train)
    history = split.history(target) if model.context_length else None
    return evaluate_scores(model_scorer(model, history), split, negatives, target=target, k=k)


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass(frozen=True)
class TrainMetrics:
    """What one local training run reports.

    Attributes:
        num_examples: Number of positive training interactions (the FedAvg weight).
        epoch_losses: Mean training loss of each epoch, in order.
    """

    num_examples: int
    epoch_losses: tuple[float, ...]

    @property
    def final_loss(self) -> float:
        """Mean loss of the last epoch (NaN without epochs)."""
        return self.epoch_losses[-1] if self.epoch_losses else math.nan


def _check_sizes(model: MatrixFactorisation, log: Interactions) -> None:
    if (model.n_users, model.n_items) != (log.n_users, log.n_items):
        raise ConfigError(
            f"model is sized for {model.n_users} users x {model.n_items} items, "
            f"data has {log.n_users} x {log.n_items}"
        )


def sample_training_negatives(
    log: Interactions, per_positive: int, rng: np.random.Generator
) -> IntArray:
    """Draw ``per_positive`` items per event uniformly among items its user has not interacted with.

    Returns:
        ``(len(log), per_positive)`` item indices.

    Raises:
        DataError: A user has interacted with every item, so no negative exists.
    """
    positives = np.unique(log.keys())
    if len(log) and log.counts_per_user().max() >= log.n_items:
        raise DataError("a user has interacted with every item; no negative can be sampled")
    users = np.repeat(log.user, per_positive)
    items = rng.integers(0, log.n_items, size=len(users), dtype=np.int64)
    for _ in range(_MAX_RESAMPLE_ROUNDS):
        keys = users * log.n_items + items
        pos = np.searchsorted(positives, keys)
        clash = (pos < len(positives)) & (positives[np.minimum(pos, len(positives) - 1)] == keys)
        if not clash.any():
            return items.reshape(len(log), per_positive)
        items[clash] = rng.integers(0, log.n_items, size=int(clash.sum()), dtype=np.int64)
    raise DataError("could not sample negatives; the interaction matrix is nearly full")


def recency_weights(log: Interactions, halflife: float) -> NDArray[np.float64]:
    """Return a weight per event that halves every ``halflife`` later events of the same user.

    An event's recency rank ``r`` is the number of its user's events that come after it (ties
    in time: the later row is the later event, as in `fedcrm.data.movielens.leave_one_out`);
    its weight is ``0.5 ** (r / halflife)``, divided by the mean weight of the log so that the
    loss keeps its scale. It is time-weighted collaborative filtering (Ding & Li 2005, "Time
    weight collaborative filtering", CIKM): a user's latest events say most about the next one.
    Each weight depends only on the user's own events, so a branch computes it locally.

    Args:
        log: A (training) log.
        halflife: In events; ``0`` gives weight 1 everywhere.

    Raises:
        ConfigError: ``halflife`` is negative or not finite.
    """
    if not (math.isfinite(halflife) and halflife >= 0):
        raise ConfigError(f"recency halflife must be a finite number >= 0, got {halflife}")
    if halflife == 0 or len(log) == 0:
        return np.ones(len(log), dtype=np.float64)
    order = np.lexsort((np.arange(len(log)), log.timestamp, log.user))
    counts = np.bincount(log.user, minlength=log.n_users)
    position = np.arange(len(log)) - np.repeat(np.cumsum(counts) - counts, counts)
    later = np.empty(len(log), dtype=np.float64)
    later[order] = np.repeat(counts, counts) - 1 - position
    weights: NDArray[np.float64] = 0.5 ** (later / halflife)
    normalised: NDArray[np.float64] = weights / weights.mean()
    return normalised


@dataclass(frozen=True)
class MFSettings:
    """Hyper-parameters of MF training, shared by the centralised baseline and the branches.

    Attributes:
        factors: Latent dimension.
        epochs: Maximum training epochs.
        lr: Adam learning rate.
        negatives_per_positive: Sampled negatives per positive.
        weight_decay: Per-batch L2 penalty (see `train_branch`).
        batch_size: Examples per step.
        loss: ``"bce"`` or ``"bpr"``.
        eval_every: Epochs per training chunk; with validation, the model is checked after each
            chunk and the best one kept (early stopping). Adam restarts at each chunk, as it
            does at each federated round.
        recency_halflife: Time weighting of each user's events (see `recency_weights`).
        history_length: History context of the model (0: plain MF).
    """

    factors: int = 64
    epochs: int = 15
    lr: float = 0.01
    negatives_per_positive: int = 4
    weight_decay: float = 0.001
    batch_size: int = 4096
    loss: Loss = "bce"
    eval_every: int = 3
    recency_halflife: float = 0.0
    history_length: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.recency_halflife) and self.recency_halflife >= 0):
            raise ConfigError(
                f"recency_halflife must be a finite number >= 0, got {self.recency_halflife}"
            )
        if self.factors < 1 or self.eval_every < 1 or self.history_length < 0:
            raise ConfigError(
                "factors and eval_every must be >= 1 and history_length >= 0, got "
                f"{self.factors}, {self.eval_every}, {self.history_length}"
            )
        _validate_training(
            epochs=self.epochs,
            lr=self.lr,
            negatives_per_positive=self.negatives_per_positive,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            loss=self.loss,
        )


def _validate_training(
    *,
    epochs: int,
    lr: float,
    negatives_per_positive: int,
    batch_size: int,
    weight_decay: float,
    loss: str,
) -> None:
    if epochs < 1 or negatives_per_positive < 1 or batch_size < 1:
        raise ConfigError(
            "epochs, negatives_per_positive and batch_size must be >= 1, got "
            f"{epochs}, {negatives_per_positive}, {batch_size}"
        )
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a finite number > 0, got {lr}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if loss not in ("bce", "bpr"):
        raise ConfigError(f"loss must be 'bce' or 'bpr', got {loss!r}")


def train_branch(
    model: MatrixFactorisation,
    interactions: Interactions,
    *,
    epochs: int,
    lr: float,
    negatives_per_positive: int,
    seed: int,
    weight_decay: float = 0.0,
    batch_size: int = 1024,
    loss: Loss = "bce",
    recency_halflife: float = 0.0,
) -> TrainMetrics:
    """Train the model in place on a branch's training interactions.

    Every epoch draws fresh negatives: ``negatives_per_positive`` items per positive that the
    user has not interacted with (He et al. 2017). With ``loss="bce"`` each positive and each
    negative is a labelled example; with ``loss="bpr"`` each (positive, negative) pair is
    ranked (Rendle et al. 2009). Adam optimises both towers. With a history context, each
    event's user vector holds the items of its user's earlier events in ``interactions``
    (`fedcrm.data.interactions.preceding_items`), so the model learns to predict the next item.

    Args:
        model: The model; its user part must cover the log's users.
        interactions: The branch's *training* interactions (``split.train``).
        epochs: Local epochs (>= 1).
        lr: Adam learning rate (> 0).
        negatives_per_positive: Sampled negatives per positive (>= 1).
        seed: Seed of negative sampling and shuffling.
        weight_decay: L2 penalty on the user vectors (history included), item factors and
            biases used in each batch, averaged per example (Rendle et al. 2009). Unlike
            optimiser weight decay it never shrinks a row that no batch uses, so rare items are
            not pulled to zero by every branch.
        batch_size: Examples per step.
        loss: ``"bce"`` or ``"bpr"``.
        recency_halflife: Weight each positive (and, with BPR, its pairs) by
            ``0.5 ** (r / recency_halflife)``, ``r`` = how many of its user's training events
            are later (see `recency_weights`); ``0`` weighs all events equally.

    Returns:
        Example count and per-epoch mean loss.

    Raises:
        ConfigError: A setting is out of range or the model does not match the data.
        DataError: Negatives cannot be sampled.
    """
    _validate_training(
        epochs=epochs,
        lr=lr,
        negatives_per_positive=negatives_per_positive,
        batch_size=batch_size,
        weight_decay=weight_decay,
        loss=loss,
    )
    _check_sizes(model, interactions)
    if not (math.isfinite(recency_halflife) and recency_halflife >= 0):
        raise ConfigError(f"recency_halflife must be a finite number >= 0, got {recency_halflife}")
    if len(interactions) == 0:
        return TrainMetrics(num_examples=0, epoch_losses=())

    weights = torch.from_numpy(recency_weights(interactions, recency_halflife)).float()
    recent = (
        torch.from_numpy(preceding_items(interactions, model.context_length))
        if model.context_length
        else None
    )
    rng = np.random.default_rng(seed)
    shuffle = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    users = torch.from_numpy(interactions.user)
    items = torch.from_numpy(interactions.item)
    k = negatives_per_positive
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        negs = torch.from_numpy(sample_training_negatives(interactions, k, rng))
        if loss == "bce":
            ex_users = torch.cat([users, users.repeat_interleave(k)])
            ex_items = torch.cat([items, negs.reshape(-1)])
            labels = torch.cat([torch.ones(len(users)), torch.zeros(len(users) * k)])
            ex_weights = torch.cat([weights, torch.ones(len(users) * k)])
            ex_recent = (
                None if recent is None else torch.cat([recent, recent.repeat_interleave(k, 0)])
            )
        else:
            ex_users = users.repeat_interleave(k)
            ex_items = items.repeat_interleave(k)
            labels = negs.reshape(-1)  # the paired negative item of each example
            ex_weights = weights.repeat_interleave(k)
            ex_recent = None if recent is None else recent.repeat_interleave(k, 0)
        order = torch.randperm(len(ex_users), generator=shuffle)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            u, i = ex_users[idx], ex_items[idx]
            p = model.user_vectors(u, None if ex_recent is None else ex_recent[idx])
            q, b = model.items(i)
            logits = (p * q).sum(dim=-1) + b
            if loss == "bce":
                per_example = F.binary_cross_entropy_with_logits(
                    logits, labels[idx], reduction="none"
                )
                reg = p.pow(2).sum(-1) + q.pow(2).sum(-1) + b.pow(2)
            else:
                q_neg, b_neg = model.items(labels[idx])
                logits_neg = (p * q_neg).sum(dim=-1) + b_neg
                per_example = F.softplus(logits_neg - logits)
                reg = (
                    p.pow(2).sum(-1)
                    + q.pow(2).sum(-1)
                    + b.pow(2)
                    + q_neg.pow(2).sum(-1)
                    + b_neg.pow(2)
                )
            batch_loss = (per_example * ex_weights[idx]).mean()
            objective = batch_loss + weight_decay * reg.mean() if weight_decay else batch_loss
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            total += float(batch_loss.detach()) * len(idx)
            seen += len(idx)
        losses.append(total / seen)
    model.eval()
    return TrainMetrics(num_examples=len(interactions), epoch_losses=tuple(losses))
