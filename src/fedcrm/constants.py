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
