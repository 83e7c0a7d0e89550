"""fedcrm.data: the public API of the subpackage.

Data sets, schemas and checks, partitions into branches, preprocessing and MovieLens splits.
"""

from fedcrm.data.check import (
    coerce_frame,
    read_export,
    validate_frame,
)
from fedcrm.data.interaction_export import (
    read_catalogue,
    read_interaction_export,
    write_catalogue,
    write_interaction_export,
)
from fedcrm.data.interactions import (
    NO_ITEM,
    IntArray,
    Interactions,
    latest_items,
    preceding_items,
    synthetic_interactions,
)
from fedcrm.data.loaders import load_branch_export, load_dataset
from fedcrm.data.movielens import (
    NUM_SAMPLED_NEGATIVES,
    BranchView,
    LeaveOneOutSplit,
    RecData,
    SampledNegatives,
    branch_view,
    leave_one_out,
    load_movielens_100k,
    load_or_sample_negatives,
    make_branch,
    sample_negatives,
)
from fedcrm.data.partition import PartitionKind, partition_indices
from fedcrm.data.preprocess import (
    Moments,
    Scaler,
    combine_moments,
    encode,
    local_moments,
)
from fedcrm.data.pseudonymise import load_or_create_key, pseudonymise_series
from fedcrm.data.schema import (
    MLC,
    SCHEMAS,
    ChurnSchema,
    get_schema,
)
from fedcrm.data.split import Split, split_frame
from fedcrm.data.synthetic import synthetic_export

__all__ = [
    "MLC",
    "NO_ITEM",
    "NUM_SAMPLED_NEGATIVES",
    "SCHEMAS",
    "BranchView",
    "ChurnSchema",
    "IntArray",
    "Interactions",
    "LeaveOneOutSplit",
    "Moments",
    "PartitionKind",
    "RecData",
    "SampledNegatives",
    "Scaler",
    "Split",
    "branch_view",
    "coerce_frame",
    "combine_moments",
    "encode",
    "get_schema",
    "latest_items",
    "leave_one_out",
    "load_branch_export",
    "load_dataset",
    "load_movielens_100k",
    "load_or_create_key",
    "load_or_sample_negatives",
    "local_moments",
    "make_branch",
    "partition_indices",
    "preceding_items",
    "pseudonymise_series",
    "read_catalogue",
    "read_export",
    "read_interaction_export",
    "sample_negatives",
    "split_frame",
    "synthetic_export",
    "synthetic_interactions",
    "validate_frame",
    "write_catalogue",
    "write_interaction_export",
]
