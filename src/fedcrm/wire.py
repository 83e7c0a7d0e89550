"""What crosses the network: record keys, message actions and the update encoding both sides use.

One place for every key the ServerApp and the ClientApp (and its mods) exchange, so the two
sides cannot drift apart, and the pure helpers of the HE update encoding (flatten, pre-weight,
apply an aggregate) that the server, the branch's HE mod and the key holder's replay share.
"""

from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

# Message actions (message_type = "<category>.<action>").
ACTION_STATISTICS: Final = "statistics"
"""Query before round 1: a branch's training-row count and its task's statistics (for churn the
count / sum / sum of squares of its numeric training columns, for the shared scaler)."""

# Record names inside a Message's RecordDict.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
PRIVACY: Final = "privacy"
PRIVACY_STATE: Final = "privacy-state"
"""DP runs: a branch's answer to the statistics query carries its accountant's spends and its
noise plan, so the coordinator can reconcile them with the privacy ledger before round 1."""
KEY_LEDGER_SPENDS: Final = "ledger-spends"
"""A train message's spends the ledger holds for this branch and its accountant lacks (JSON);
the branch adds them before its budget check (ε only grows)."""
"""ConfigRecord of a DP train reply: the branch's privacy report (admitted or refused)."""
CONSENT: Final = "consent"
"""ConfigRecord of a consent-gated train reply: the round manifest, or the branch's refusal."""

# ConfigRecord keys sent by the server.
KEY_SCHEMA: Final = "schema"
KEY_SEED: Final = "seed"
KEY_LR: Final = "lr"
KEY_LOCAL_EPOCHS: Final = "local-epochs"
KEY_BATCH_SIZE: Final = "batch-size"
KEY_WEIGHT_DECAY: Final = "weight-decay"
KEY_OPTIMIZER: Final = "optimizer"
KEY_MOMENTUM: Final = "momentum"
KEY_PROXIMAL_MU: Final = "proximal-mu"  # the key Flower's FedProx sends
KEY_SCALER_MEAN: Final = "scaler-mean"
KEY_SCALER_STD: Final = "scaler-std"
KEY_SERVER_ROUND: Final = "server-round"  # injected by Flower strategies
KEY_NUM_ROUNDS: Final = "num-rounds"  # planned rounds (DP noise is planned for all of them)
KEY_CONSENT_PURPOSE: Final = "consent-purpose"  # the run's declared purpose (absent: no gate)
KEY_RUN_ID: Final = "run-id"  # the run's id, naming the branch's archived round manifests

# Record-level DP settings sent with every train message of a DP run (absent: no DP);
# `fedcrm.privacy.DPSGD_RUN_CONFIG_KEYS` maps them to `DPSGDConfig` fields.
KEY_DP_TARGET_EPSILON: Final = "dp-target-epsilon"
KEY_DP_DELTA: Final = "dp-delta"  # absent: delta = 1 / (branch training rows)
KEY_DP_MAX_GRAD_NORM: Final = "dp-max-grad-norm"
KEY_DP_ACCOUNTANT: Final = "dp-accountant"
KEY_DP_GRAD_SAMPLE_MODE: Final = "dp-grad-sample-mode"
KEY_DP_NOISE_MULTIPLIER: Final = "dp-noise-multiplier"  # absent: planned from the target
KEY_DP_MAX_EPSILON: Final = "dp-max-epsilon"  # absent: the target is the budget
KEY_DP_CUSTOMER_BUDGET: Final = "dp-customer-budget"  # absent: no privacy filter
KEY_PRIVACY_MODEL: Final = "privacy-model"
KEY_PRIVACY_PURPOSE: Final = "privacy-purpose"
KEY_LEDGER_URL: Final = "ledger-url"  # run config only; never sent to branches

# Run-config keys (``[tool.flwr.app.config]``) read by more than one module.
KEY_STRATEGY: Final = "strategy"
KEY_AGGREGATION_MODE: Final = "aggregation-mode"  # "plain", "he" or "secagg"
KEY_CENTRAL_DP_MODE: Final = "central-dp-mode"  # branch-level DP; the ClientApp reads it too

# MetricRecord keys sent by branches.
KEY_NUM_EXAMPLES: Final = "num-examples"
KEY_TRAIN_LOSS: Final = "train-loss"
KEY_MOMENTS: Final = "moments"
KEY_LOSS_SUM: Final = "loss-sum"
KEY_BRANCH_AUC: Final = "branch-auc"
KEY_HIST_VAL_POS: Final = "hist-val-pos"
KEY_HIST_VAL_NEG: Final = "hist-val-neg"
KEY_HIST_TEST_POS: Final = "hist-test-pos"
KEY_HIST_TEST_NEG: Final = "hist-test-neg"
# ... and, in a DP run, the round's privacy figures (also in the PRIVACY ConfigRecord).
KEY_DP_EPSILON_ROUND: Final = "dp-epsilon-round"
KEY_DP_EPSILON: Final = "dp-epsilon"  # cumulative, for (branch, model, purpose)
KEY_DP_SIGMA: Final = "dp-sigma"
KEY_DP_SAMPLE_RATE: Final = "dp-sample-rate"
KEY_DP_STEPS: Final = "dp-steps"
KEY_DP_DELTA_USED: Final = "dp-delta-used"

# node_config keys (a SuperNode's `--node-config`, or set by the simulation engine).
NODE_PARTITION_ID: Final = "partition-id"
NODE_DATA_PATH: Final = "data-path"
NODE_KEY_PATH: Final = "key-path"
NODE_PRIVACY_DIR: Final = "privacy-dir"
"""Folder of the branch's persistent privacy accountants (default: ``privacy/`` beside the data)."""
NODE_BRANCH_NAME: Final = "branch-name"
"""How the branch is named in the privacy ledger (default: ``node-<id>``)."""
NODE_CONSENT_DB: Final = "consent-db"
"""The branch's consent registry: a SQLAlchemy URL or a SQLite file path."""
NODE_CONSENT_DIR: Final = "consent-dir"
"""Folder of the branch's commitment salts and round manifests (default: ``consent/`` beside
the data)."""
NODE_PURPOSES: Final = "purposes"
"""Comma-separated purposes the branch's data is collected for (absent: not declared)."""
NODE_RETENTION_DAYS: Final = "retention-days"
"""Rows whose latest consent decision is older than this many days are left out."""

# Task settings and the run's task (``task`` in the run config and every message).
KEY_TASK: Final = "task"

# Federated recommendations (`fedcrm.tasks.recommendation`).
REC_VAL_PREFIX: Final = "val-"
"""Prefix of the validation-item ranking sums in a recommendation evaluation reply."""
STATE_REC_USER_FACTORS: Final = "rec-user-factors"
"""ArrayRecord in ``Context.state`` holding a branch's user factors between rounds (never sent)."""
REC_USER_FACTORS_FILE: Final = "user_factors.npz"
"""A branch's user factors, in its own folder (``branches/NNN/`` in a simulation)."""
REC_ITEMS_FILE: Final = "items.npz"
"""The final aggregated item factors and biases, in the run directory."""
NODE_CATALOGUE_PATH: Final = "catalogue-path"
"""node_config: the branch's copy of the shared item catalogue (one item id per line)."""

# Homomorphic encryption (`fedcrm.strategies.he` on the server, `fedcrm.client.he_mod` on the
# branch): one ConfigRecord carries the HE fields in both directions.
HE_RECORD: Final = "he"
"""ConfigRecord name carrying the HE fields in both directions."""
HE_KEY_ID: Final = "he-key-id"
"""The key id the round uses (server -> branch); the branch encrypts under it."""
HE_ROUND: Final = "he-round"
"""Server -> branch: the round whose aggregate is attached (0: plaintext initial model)."""
HE_AGGREGATE: Final = "he-aggregate"
"""Server -> branch: serialized encrypted aggregate (``EncryptedUpdate.to_bytes``)."""
HE_COUNT: Final = "he-count"
"""Server -> branch: the summed example count of the aggregate."""
HE_UPDATE: Final = "he-update"
"""Branch -> server: the serialized encrypted pre-weighted delta."""
NODE_HE_KEY_DIR: Final = "he-key-dir"
"""node_config: the branch's key directory when its HE mod is built without one (deployment)."""

# SecAgg+ (`fedcrm.strategies.secagg` -> `fedcrm.client.secagg_client`): fit-config keys.
KEY_PARAM_NAMES: Final = "secagg-param-names"
"""JSON list of the model's parameter names, in the order of the legacy parameter list."""
KEY_SECAGG_CLIPPING_RANGE: Final = "secagg-clipping-range"
KEY_SECAGG_MAX_WEIGHT: Final = "secagg-max-weight"
KEY_SECAGG_SUMMED: Final = "secagg-summed"
"""Train metric: how many branches' masked updates entered the round's sum."""

# Client-side clipping for branch-level DP: the keys of Flower's own wrappers and mods.
KEY_CLIPPING_NORM: Final = "clipping_norm"
"""The key Flower's client-side wrappers put in the train config (``KEY_CLIPPING_NORM``)."""
KEY_NORM_BIT: Final = "norm_bit"
"""The clipped bit ``adaptiveclipping_mod`` adds to the reply's metrics (``KEY_NORM_BIT``)."""


# ---- The update encoding of HE rounds (pure NumPy, shared by server, branch and replay) ----

FloatArrays = Mapping[str, npt.NDArray[np.floating]]

WEIGHT_UNIT: Final = 100.0
"""Branches pre-weight their delta by ``n_k / WEIGHT_UNIT`` rather than ``n_k``.

CKKS parameters declare a range per encrypted value (``max_abs_value``, 1e3 by default); raw
counts pushed a Telco branch of 2,500 customers past it in round 1 (a delta entry of 0.54 times
2,500). With this unit a branch of 10,000 rows may send delta entries up to 10. The unit cancels
in `apply_aggregate`; the price is that CKKS's absolute error per value (about 6e-7 for 1,000
branches) is scaled by ``WEIGHT_UNIT / sum(n_k)``, negligible once the round holds a few
hundred rows."""


def flatten(arrays: FloatArrays) -> npt.NDArray[np.float64]:
    """Concatenate arrays (in the mapping's order: the model's ``state_dict`` order)."""
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(
    vector: npt.NDArray[np.float64], like: FloatArrays
) -> dict[str, npt.NDArray[np.floating]]:
    """Cut ``vector`` into arrays shaped and typed like ``like``.

    Raises:
        ValueError: ``vector`` has another length than ``like`` holds values.
    """
    total = sum(int(np.asarray(a).size) for a in like.values())
    if vector.size != total:
        raise ValueError(f"vector of {vector.size} values for a model of {total}")
    out: dict[str, npt.NDArray[np.floating]] = {}
    offset = 0
    for name, ref in like.items():
        ref_arr = np.asarray(ref)
        out[name] = (
            vector[offset : offset + ref_arr.size].reshape(ref_arr.shape).astype(ref_arr.dtype)
        )
        offset += ref_arr.size
    return out


def pre_weight(delta: npt.NDArray[np.float64], count: float) -> npt.NDArray[np.float64]:
    """The vector a branch encrypts: its delta weighted by ``count / WEIGHT_UNIT``."""
    return (float(count) / WEIGHT_UNIT) * delta


def apply_aggregate(
    base: FloatArrays, total: npt.NDArray[np.float64], count: float
) -> dict[str, npt.NDArray[np.floating]]:
    """The next global model: ``base + total * WEIGHT_UNIT / count``.

    ``total`` is the decrypted sum of the branches' `pre_weight`-ed deltas and ``count`` the
    sum of their example counts, so the result is the example-weighted mean delta (FedAvg).

    Raises:
        ValueError: ``count`` is not positive, or the lengths differ.
    """
    if not count > 0:
        raise ValueError(f"the aggregate's example count must be > 0, got {count}")
    return unflatten(flatten(base) + total * (WEIGHT_UNIT / count), base)
