"""fedcrm.models: the public API of the subpackage.

The churn MLP and the recommender, their local training and metrics.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "churn": (
        "TrainSettings",
        "build_model",
        "make_optimizer",
        "model_from_state",
        "predict_proba",
        "train_local",
    ),
    "metrics": (
        "ChurnMetrics",
        "ScoreHistogram",
        "exact_metrics",
        "log_loss_sum",
        "spread",
    ),
    "rec_private": (
        "fit_user_factors",
        "train_items_private",
        "user_rows",
    ),
    "rec_training": (
        "DEFAULT_K",
        "Loss",
        "MFSettings",
        "RankingMetrics",
        "ScoreFn",
        "evaluate_branch",
        "evaluate_scores",
        "model_scorer",
        "top_n",
        "train_branch",
    ),
    "recommender": (
        "MatrixFactorisation",
        "context_length_of",
        "load_local_state",
        "load_shared_state",
        "local_state",
        "shared_state",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
