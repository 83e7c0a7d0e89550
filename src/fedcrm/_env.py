"""Offline and loopback-only defaults for Flower and Ray.

Notes:
    Flower sends telemetry and checks for updates unless told not to, the SuperLink installs
    app dependencies at run time (which would pull a CUDA build of torch), and Ray binds its
    gRPC ports to every interface unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set before
    it starts. Values the user set explicitly are kept (``setdefault``).
"""

import os

SAFE_DEFAULTS: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    # Opt in to Ray's future behaviour now (silences its FutureWarning; no GPUs here anyway).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Flower Datasets partitioners run on Hugging Face `datasets`: never reach a hub.
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # flwr-datasets draws tqdm bars on stderr while partitioning; fedcrm shows its own progress.
    "TQDM_DISABLE": "1",
}


def apply_safe_defaults() -> None:
    """Set the offline defaults in ``os.environ`` unless the user chose otherwise."""
    for key, value in SAFE_DEFAULTS.items():
        os.environ.setdefault(key, value)
