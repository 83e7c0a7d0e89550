"""Encrypted aggregation in a recommendation simulation: keys in, plaintext item tower out.

The simulation's researcher plays the key authority, as `fedcrm.simulation.runner` does for the
churn task: `setup_rec_he` creates a key generation in ``<run_dir>/keys`` (``fedcrm keys
init``), hands the server only the public context (`RecHEConfig`, checkpoints in
``<run_dir>/checkpoints``) and the branches `HEMod` over the same key directory. After the run,
`replay_items` decrypts the server's chain of ciphertext checkpoints into the final item arrays
(``items.npz``), exactly what every branch holds after the last round's evaluation.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fedcrm.client.he_mod import HEMod
from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.keys import KeyGeneration, init_keys, load_public_context, load_secret_context
from fedcrm.server.rec_federation import RecFederationResult, RecHEConfig
from fedcrm.strategies.he import replay_global_model

__all__ = ["CHECKPOINTS_DIR", "KEYS_DIR", "RecHESetup", "replay_items", "setup_rec_he"]

KEYS_DIR = "keys"
"""The run's key directory (secret and public context of generation 1)."""
CHECKPOINTS_DIR = "checkpoints"
"""The server's ciphertext checkpoints (``round-NNNN.fche`` and ``.count``)."""


@dataclass(frozen=True)
class RecHESetup:
    """What the two sides of an encrypted recommendation run get.

    Attributes:
        keys: The key generation created for the run.
        server: The server's settings (public context only).
        mod: The branches' mod (loads the secret context from the run's key directory).
    """

    keys: KeyGeneration
    server: RecHEConfig
    mod: HEMod


def setup_rec_he(run_dir: Path) -> RecHESetup:
    """Create the run's keys and the server and branch sides of HE aggregation.

    Raises:
        KeyFileError: ``<run_dir>/keys`` already holds a keyring.
    """
    key_dir = run_dir / KEYS_DIR
    keys = init_keys(key_dir)
    server = RecHEConfig(
        public_context=load_public_context(keys.public_path),
        checkpoint_dir=run_dir / CHECKPOINTS_DIR,
    )
    return RecHESetup(keys=keys, server=server, mod=HEMod(key_dir))


def replay_items(result: RecFederationResult, secret_path: Path) -> dict[str, NDArray[np.float32]]:
    """Decrypt an HE run's checkpoints into its final item arrays (the key holder's step).

    Args:
        result: The run's result: the public initial items and every round's checkpoint.
        secret_path: The key generation's ``secret.tenseal``.

    Raises:
        FedCrmError: ``result`` is not an HE run or holds no checkpoint.
        HEError: A checkpoint does not decrypt under the key.
    """
    if result.aggregation != "he" or not result.checkpoints:
        raise FedCrmError("not an encrypted run with checkpoints: nothing to replay")
    model = replay_global_model(
        result.initial, result.checkpoints, load_secret_context(secret_path)
    )
    return {name: np.asarray(a, dtype=np.float32) for name, a in model.items()}
