"""fedcrm.data: the public API of the subpackage.

Data sets, schemas and checks, partitions into branches, preprocessing and MovieLens splits.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "check": (
        "coerce_frame",
        "read_export",
        "validate_frame",
    ),
    "interactions": (
        "IntArray",
        "Interactions",
        "NO_ITEM",
        "latest_items",
        "preceding_items",
        "synthetic_interactions",
    ),
    "loaders": (
        "load_branch_export",
        "load_dataset",
    ),
    "movielens": (
        "BranchView",
        "LeaveOneOutSplit",
        "NUM_SAMPLED_NEGATIVES",
        "RecData",
        "SampledNegatives",
        "branch_view",
        "leave_one_out",
        "load_movielens_100k",
        "load_or_sample_negatives",
        "make_branch",
        "sample_negatives",
    ),
    "partition": (
        "PartitionKind",
        "partition_indices",
    ),
    "preprocess": (
        "Moments",
        "Scaler",
        "combine_moments",
        "encode",
        "local_moments",
    ),
    "pseudonymise": (
        "load_or_create_key",
        "pseudonymise_series",
    ),
    "schema": (
        "ChurnSchema",
        "MLC",
        "SCHEMAS",
        "get_schema",
    ),
    "split": (
        "Split",
        "split_frame",
    ),
    "synthetic": ("synthetic_export",),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
