"""fedcrm.models: the public API of the subpackage.

The churn MLP and the recommender, their local training and metrics.
"""

from fedcrm.models.churn import (
    TrainSettings,
    build_model,
    make_optimizer,
    model_from_state,
    predict_proba,
    train_local,
)
from fedcrm.models.metrics import (
    ChurnMetrics,
    ScoreHistogram,
    exact_metrics,
    log_loss_sum,
    spread,
)
from fedcrm.models.rec_private import (
    fit_user_factors,
    train_items_private,
    user_rows,
)
from fedcrm.models.rec_training import (
    DEFAULT_K,
    Loss,
    MFSettings,
    RankingMetrics,
    ScoreFn,
    evaluate_branch,
    evaluate_scores,
    model_scorer,
    top_n,
    train_branch,
)
from fedcrm.models.recommender import (
    MatrixFactorisation,
    context_length_of,
    load_local_state,
    load_shared_state,
    local_state,
    shared_state,
)

__all__ = [
    "DEFAULT_K",
    "ChurnMetrics",
    "Loss",
    "MFSettings",
    "MatrixFactorisation",
    "RankingMetrics",
    "ScoreFn",
    "ScoreHistogram",
    "TrainSettings",
    "build_model",
    "context_length_of",
    "evaluate_branch",
    "evaluate_scores",
    "exact_metrics",
    "fit_user_factors",
    "load_local_state",
    "load_shared_state",
    "local_state",
    "log_loss_sum",
    "make_optimizer",
    "model_from_state",
    "model_scorer",
    "predict_proba",
    "shared_state",
    "spread",
    "top_n",
    "train_branch",
    "train_items_private",
    "train_local",
    "user_rows",
]
