"""Centralised baselines on the pooled rows of the same branch splits, in the same run.

These are what a single data warehouse would get: the federated model is judged against them.
"""

import copy
from dataclasses import dataclass, replace

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedcrm.models.churn import TrainSettings, build_model, predict_proba, train_local
from fedcrm.models.metrics import ChurnMetrics, exact_metrics


@dataclass(frozen=True)
class PooledData:
    """Encoded pooled train / validation / test rows."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def logistic_regression(data: PooledData, *, seed: int) -> ChurnMetrics:
    """L2-regularised logistic regression (lbfgs)."""
    model = LogisticRegression(max_iter=5000, random_state=seed).fit(data.x_train, data.y_train)
    return exact_metrics(
        data.y_val,
        model.predict_proba(data.x_val)[:, 1],
        data.y_test,
        model.predict_proba(data.x_test)[:, 1],
    )


def gradient_boosting(data: PooledData, *, seed: int) -> ChurnMetrics:
    """scikit-learn's HistGradientBoosting with its defaults (early stopping off below 10k rows)."""
    model = HistGradientBoostingClassifier(random_state=seed).fit(data.x_train, data.y_train)
    return exact_metrics(
        data.y_val,
        model.predict_proba(data.x_val)[:, 1],
        data.y_test,
        model.predict_proba(data.x_test)[:, 1],
    )


def pooled_torch(
    data: PooledData, settings: TrainSettings, *, seed: int, hidden: tuple[int, ...]
) -> ChurnMetrics:
    """The federated model's architecture and optimiser, trained on the pooled rows.

    Trains ``settings.epochs`` epochs one at a time and keeps the epoch with the best
    validation ROC-AUC (early stopping), as the federated run keeps its best round.
    """
    model = build_model(data.x_train.shape[1], seed=seed, hidden=hidden)
    one_epoch = replace(settings, epochs=1)
    best_auc, best_state = -np.inf, copy.deepcopy(model.state_dict())
    for epoch in range(settings.epochs):
        train_local(model, data.x_train, data.y_train, one_epoch, seed=seed + epoch)
        auc = float(roc_auc_score(data.y_val, predict_proba(model, data.x_val)))
        if auc > best_auc:
            best_auc, best_state = auc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return exact_metrics(
        data.y_val, predict_proba(model, data.x_val), data.y_test, predict_proba(model, data.x_test)
    )


def run_baselines(
    data: PooledData, settings: TrainSettings, *, seed: int, hidden: tuple[int, ...]
) -> dict[str, ChurnMetrics]:
    """All centralised baselines, keyed by name."""
    return {
        "logistic_regression": logistic_regression(data, seed=seed),
        "hist_gradient_boosting": gradient_boosting(data, seed=seed),
        "pooled_torch": pooled_torch(data, settings, seed=seed, hidden=hidden),
    }
