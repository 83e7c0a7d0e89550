"""Centralised recommendation baselines on the same leave-one-out split as the federation.

* popularity: an item's score is its number of training interactions;
* item-kNN: cosine similarity between item columns of the binary training matrix, a user's
  score for an item is the summed similarity to the items they interacted with (Sarwar et al.
  2001, "Item-based collaborative filtering", WWW; Deshpande & Karypis 2004);
* centralised MF: `MatrixFactorisation` without history, trained on pooled data with the
  `train_branch` loop the branches use (He et al. 2017, arXiv:1708.05031);
* centralised MF + history: when the federation's model has a history context, the same model
  trained on pooled data (the like-for-like reference the federated run is compared to).

All of them are measured by `fedcrm.models.rec_training.evaluate_scores`, the code branches use.
"""

import copy
import logging
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fedcrm.data.interactions import IntArray, Interactions
from fedcrm.data.movielens import LeaveOneOutSplit, SampledNegatives
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import (
    DEFAULT_K,
    MFSettings,
    RankingMetrics,
    ScoreFn,
    evaluate_branch,
    evaluate_scores,
    model_scorer,
    train_branch,
)
from fedcrm.models.recommender import MatrixFactorisation

logger = logging.getLogger(__name__)

HISTORY_MF: Final = "mf+history"
"""Name of the centralised history model among the baselines."""


def _binary_matrix(log: Interactions) -> NDArray[np.float64]:
    matrix = np.zeros((log.n_users, log.n_items), dtype=np.float64)
    matrix[log.user, log.item] = 1.0
    return matrix


def popularity_scorer(train: Interactions) -> ScoreFn:
    """Score every item by its number of training interactions, the same for every user."""
    counts = train.counts_per_item().astype(np.float64)

    def score(users: IntArray) -> NDArray[np.float64]:
        return np.broadcast_to(counts, (len(users), train.n_items)).copy()

    return score


def item_knn_scorer(train: Interactions, *, neighbours: int | None = None) -> ScoreFn:
    """Score items by cosine item-item similarity to the user's training items.

    Args:
        train: Training interactions.
        neighbours: Keep only each item's ``neighbours`` most similar items (``None``: all).

    Raises:
        ConfigError: ``neighbours`` is not positive.
    """
    if neighbours is not None and neighbours < 1:
        raise ConfigError(f"neighbours must be >= 1 or None, got {neighbours}")
    matrix = _binary_matrix(train)
    norms = np.sqrt(matrix.sum(axis=0))
    norms[norms == 0] = 1.0
    similarity = (matrix.T @ matrix) / np.outer(norms, norms)
    np.fill_diagonal(similarity, 0.0)
    if neighbours is not None and neighbours < train.n_items - 1:
        # Zero all but the top `neighbours` similarities of each item (row = neighbour source).
        cut = np.argpartition(-similarity, neighbours, axis=0)[neighbours:]
        np.put_along_axis(similarity, cut, 0.0, axis=0)

    def score(users: IntArray) -> NDArray[np.float64]:
        scores: NDArray[np.float64] = matrix[users] @ similarity
        return scores

    return score


@dataclass(frozen=True)
class MFFit:
    """A trained MF model and how it was selected.

    Attributes:
        model: The selected model.
        best_epoch: Epochs trained by the selected model.
        val_history: ``(epochs, validation HR@k sampled)`` after each chunk (empty without
            validation).
    """

    model: MatrixFactorisation
    best_epoch: int
    val_history: tuple[tuple[int, float], ...]


def train_centralised_mf(
    split: LeaveOneOutSplit,
    settings: MFSettings,
    *,
    seed: int,
    negatives: SampledNegatives | None = None,
    k: int = DEFAULT_K,
) -> MFFit:
    """Train `MatrixFactorisation` on the pooled training interactions of every user.

    With ``negatives``, the model is scored on the *validation* items after every
    ``settings.eval_every`` epochs and the best state is kept; test items are never looked at.

    Args:
        split: The pooled split.
        settings: Hyper-parameters.
        seed: Seed of initialisation, sampling and shuffling.
        negatives: Sampled negatives for validation-based early stopping (``None``: train all
            epochs and keep the last state).
        k: Cut-off of the validation HR.
    """
    model = MatrixFactorisation(
        split.n_users,
        split.n_items,
        settings.factors,
        context=settings.history_length,
        seed=seed,
    )
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_hr = 0, -1.0
    history: list[tuple[int, float]] = []
    done = 0
    while done < settings.epochs:
        chunk = min(settings.eval_every, settings.epochs - done)
        train_branch(
            model,
            split.train,
            epochs=chunk,
            lr=settings.lr,
            negatives_per_positive=settings.negatives_per_positive,
            seed=seed * 100_003 + done,
            weight_decay=settings.weight_decay,
            batch_size=settings.batch_size,
            loss=settings.loss,
            recency_halflife=settings.recency_halflife,
        )
        done += chunk
        if negatives is None:
            continue
        val_hr = evaluate_branch(model, split, negatives, target="val", k=k).hr_sampled
        history.append((done, val_hr))
        logger.debug("centralised MF: %d epochs, validation HR@%d %.4f", done, k, val_hr)
        if val_hr > best_hr:
            best_hr, best_epoch = val_hr, done
            best_state = copy.deepcopy(model.state_dict())
    if negatives is None:
        return MFFit(model=model, best_epoch=done, val_history=())
    model.load_state_dict(best_state)
    return MFFit(model=model, best_epoch=best_epoch, val_history=tuple(history))


def centralised_baselines(
    split: LeaveOneOutSplit,
    negatives: SampledNegatives,
    *,
    seed: int,
    mf: MFSettings | None = None,
    knn_neighbours: int | None = None,
    k: int = DEFAULT_K,
    select_on_validation: bool = True,
) -> dict[str, RankingMetrics]:
    """Measure popularity, item-kNN and centralised MF on the test items of ``split``.

    Args:
        split: The pooled split (global user indices).
        negatives: Its sampled negatives.
        seed: Seed of the MF initialisation and training.
        mf: MF hyper-parameters (`MFSettings` defaults when ``None``); the MF model is
            early-stopped on the validation items. With ``history_length > 0`` both plain MF
            and the history model are trained.
        knn_neighbours: Neighbourhood size of item-kNN (``None``: all items).
        k: Cut-off of HR and NDCG.
        select_on_validation: Early-stop MF on the validation items; ``False`` trains exactly
            ``mf.epochs`` epochs (the final fit of a split whose training log holds the
            validation items, see `LeaveOneOutSplit.with_validation_in_train`).

    Returns:
        ``{"popularity": ..., "item-knn": ..., "mf": ...}`` (and `HISTORY_MF` for a history
        model), each a `RankingMetrics`.
    """
    settings = mf or MFSettings()
    models = {"mf": replace(settings, history_length=0)}
    if settings.history_length:
        models[HISTORY_MF] = settings
    scorers: dict[str, ScoreFn] = {
        "popularity": popularity_scorer(split.train),
        "item-knn": item_knn_scorer(split.train, neighbours=knn_neighbours),
    }
    for name, chosen in models.items():
        model = train_centralised_mf(
            split, chosen, seed=seed, negatives=negatives if select_on_validation else None, k=k
        ).model
        scorers[name] = model_scorer(model, split.history("test") if model.context_length else None)
    return {
        name: evaluate_scores(scorer, split, negatives, target="test", k=k)
        for name, scorer in scorers.items()
    }
