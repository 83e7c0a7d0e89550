"""Encrypted recommendation aggregation on Flower's simulation engine (Ray), end to end.

The HE run goes through ``simulate-rec`` (keys in the run directory, HEMod on every branch,
ciphertext checkpoints on the server, items replayed with the secret key at the end); the
reference is the same experiment in plaintext through the same round loop and ClientApp in
process. The final item arrays must agree within CKKS error.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcrm import constants as k
from fedcrm.client.rec_app import make_rec_client_app
from fedcrm.rec_cli import rec_app
from fedcrm.server.rec_federation import run_rec_federation
from fedcrm.simulation.rec_config import load_rec_experiment
from fedcrm.simulation.rec_runner import (
    InProcessGrid,
    RecBranches,
    in_process_identity,
    load_rec_data,
)
from fedcrm.strategies.guardrails import AggregationMode

pytestmark = pytest.mark.integration

CONFIG = """
task = "recommendation"
name = "rec-he-it"
dataset = "synthetic"
seed = 0
cpus-per-branch = 0.5

[synthetic]
users = 60
items = 150
branches = 3

[federation]
num-rounds = 2
local-epochs = 2
lr = 0.05
factors = 8
batch-size = 256
history-length = 2

[baselines]
enabled = false

[aggregation]
mode = "he"
"""


def test_he_run_on_ray_matches_plaintext_fedavg(tmp_path: Path) -> None:
    config = tmp_path / "rec.toml"
    config.write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(
        rec_app, ["simulate-rec", str(config), "--runs-dir", str(tmp_path / "runs")]
    )
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "keys").is_dir()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.fche")) == [
        "round-0001.fche",
        "round-0002.fche",
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["aggregation"] == "he"

    cfg = load_rec_experiment(config)
    plain = replace(cfg, aggregation=AggregationMode.PLAIN)
    data = load_rec_data(plain)
    grid = InProcessGrid(make_rec_client_app(RecBranches(plain)), len(data.branches))
    with in_process_identity():
        reference = run_rec_federation(
            grid, plain.federation, n_items=data.n_items, min_nodes=len(data.branches)
        )
    with np.load(run_dir / k.REC_ITEMS_FILE, allow_pickle=False) as stored:
        decrypted = {key: stored[key] for key in stored.files}
    assert set(decrypted) == set(reference.items)
    for key, array in reference.items.items():
        np.testing.assert_allclose(decrypted[key], array, atol=1e-4, err_msg=key)
