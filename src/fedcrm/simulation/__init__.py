"""fedcrm.simulation: the public API of the subpackage.

Experiments on Flower's simulation engine: configuration, runners, baselines and reports.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "baselines": (
        "PooledData",
        "logistic_regression",
        "pooled_torch",
    ),
    "config": (
        "ExperimentConfig",
        "load_experiment",
    ),
    "consent_setup": (
        "ConsentSetup",
        "import_consent",
        "write_consent_csv",
    ),
    "rec_baselines": (
        "HISTORY_MF",
        "item_knn_scorer",
        "popularity_scorer",
        "train_centralised_mf",
    ),
    "rec_config": (
        "RecExperimentConfig",
        "load_rec_experiment",
    ),
    "rec_he": (
        "replay_items",
        "setup_rec_he",
    ),
    "rec_metrics": (
        "comparison_table",
        "from_record",
        "pool",
        "to_record",
    ),
    "rec_runner": (
        "InProcessGrid",
        "RecBranches",
        "in_process_identity",
        "load_rec_data",
        "model_label",
        "prepare_split",
        "run_rec_experiment",
    ),
    "runner": (
        "pooled_splits",
        "run_experiment",
        "write_branches",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
