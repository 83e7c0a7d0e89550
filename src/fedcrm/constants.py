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

# node_config keys (a SuperNode's `--node-config`, or set by the simulation engine).
NODE_PARTITION_ID: Final = "partition-id"
NODE_DATA_PATH: Final = "data-path"
NODE_KEY_PATH: Final = "key-path"
