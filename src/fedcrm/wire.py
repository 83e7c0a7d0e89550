"""Record keys and message actions shared by the ServerApp and the ClientApp.

One place for every key that crosses the network, so the two sides cannot drift apart.
"""

from typing import Final

# Message actions (message_type = "<category>.<action>").
ACTION_MOMENTS: Final = "moments"
"""Query: a branch's count / sum / sum of squares of its numeric training columns."""

# Record names inside a Message's RecordDict.
ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"
PRIVACY: Final = "privacy"
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

# Record-level DP settings sent with every train message of a DP run (absent: no DP). The
# dp-* names match `fedcrm.privacy.config.RUN_CONFIG_KEYS`.
KEY_DP_TARGET_EPSILON: Final = "dp-target-epsilon"
KEY_DP_DELTA: Final = "dp-delta"  # absent: delta = 1 / (branch training rows)
KEY_DP_MAX_GRAD_NORM: Final = "dp-max-grad-norm"
KEY_DP_ACCOUNTANT: Final = "dp-accountant"
KEY_DP_GRAD_SAMPLE_MODE: Final = "dp-grad-sample-mode"
KEY_DP_NOISE_MULTIPLIER: Final = "dp-noise-multiplier"  # absent: planned from the target
KEY_DP_MAX_EPSILON: Final = "dp-max-epsilon"  # absent: the target is the budget
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

# Federated recommendations (`fedcrm.server.rec_federation`, `fedcrm.client.rec_app`); the
# seed, lr, epochs, batch-size, weight-decay and num-examples keys above are reused.
KEY_REC_FACTORS: Final = "factors"
KEY_REC_NEGATIVES: Final = "negatives-per-positive"
KEY_REC_LOSS: Final = "loss"
KEY_REC_TOP_K: Final = "top-k"
KEY_REC_RECENCY_HALFLIFE: Final = "recency-halflife"
KEY_REC_TRAIN_ON_VALIDATION: Final = "train-on-validation"
KEY_REC_HISTORY: Final = "history-length"
KEY_REC_DP_USERS_PER_STEP: Final = "rec-dp-users-per-step"  # customer-level DP: rows = customers
KEY_REC_DP_CAP: Final = "rec-dp-max-interactions-per-user"
REC_VAL_PREFIX: Final = "val-"
"""Prefix of the validation-item ranking sums in a recommendation evaluation reply."""
STATE_REC_USER_FACTORS: Final = "rec-user-factors"
"""ArrayRecord in ``Context.state`` holding a branch's user factors between rounds (never sent)."""
REC_USER_FACTORS_FILE: Final = "user_factors.npz"
"""A simulated branch's user factors, in its own folder ``branches/<name>/``."""
REC_ITEMS_FILE: Final = "items.npz"
"""The final aggregated item factors and biases, in the run directory."""
