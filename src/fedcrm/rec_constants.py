"""Record keys, actions and file names of the federated recommender, shared by both apps.

The churn keys that mean the same thing (seed, learning rate, epochs, ``num-examples``, the
record names) are reused from `fedcrm.constants`; only the recommendation-specific ones live
here, so the ServerApp and the ClientApp cannot drift apart.
"""

from typing import Final

# ConfigRecord keys sent by the server (besides fedcrm.constants' seed / lr / epochs / batch).
KEY_FACTORS: Final = "factors"
KEY_NEGATIVES: Final = "negatives-per-positive"
KEY_LOSS: Final = "loss"
KEY_TOP_K: Final = "top-k"

# MetricRecord keys sent by branches (besides fedcrm.simulation.rec_metrics' ranking sums).
VAL_PREFIX: Final = "val-"
"""Prefix of the validation-item ranking sums in an evaluation reply."""

# Node-local state (Flower ``Context.state``): never part of a message.
STATE_USER_FACTORS: Final = "rec-user-factors"
"""ArrayRecord in ``Context.state`` holding the branch's user factors between rounds."""

# Files of a recommendation run directory.
USER_FACTORS_FILE: Final = "user_factors.npz"
"""A branch's user factors, written by its ClientApp into its own folder ``branches/<name>/``."""
ITEMS_FILE: Final = "items.npz"
"""The final aggregated item factors and biases, in the run directory."""
