"""HE aggregation on Flower's simulation engine (Ray): 3 branches, 2 rounds, CKKS on.

One simulation (Ray takes ~20 s to start on 2 cores). The plaintext reference is computed
in-process from the same branch exports, scaler, initial model and training settings: the same
local training (``fedcrm.client.branch.train``) and FedAvg's weighted mean. Local training
uses full batches (batch size above every branch's row count), so the per-node shuffling seed
only permutes rows and the two runs must agree to float rounding plus CKKS noise.
"""

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from fedcrm.data.schema import get_schema
from fedcrm.models.churn import build_model
from fedcrm.privacy import keys
from fedcrm.simulation.config import parse_experiment
from fedcrm.simulation.runner import run_experiment
from fedcrm.strategies.he import Checkpoint, replay_global_model
from support import plaintext_fedavg

pytestmark = [
    pytest.mark.integration,
    # Since the Ray session-dir change (0c019b5) Ray leaves a helper process running past its
    # Popen object; its ResourceWarning surfaces as an unraisable-exception warning (also in
    # test_simulation.py). Silenced for this module only, until the runner reaps it.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    cfg = parse_experiment(
        {
            "name": "he",
            "dataset": "synthetic:mlc",
            "rows": 450,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {
                "num-rounds": ROUNDS,
                "lr": 0.05,
                "local-epochs": 2,
                "batch-size": 1000,
            },
            "aggregation": {"mode": "he"},
            "baselines": {"enabled": False},
        }
    )
    run_dir = run_experiment(cfg, runs_root=tmp_path_factory.mktemp("runs"))
    return run_dir, cfg


def _he_models(run_dir: Path, cfg: object) -> list[dict[str, np.ndarray]]:
    """Decrypt the server's ciphertext checkpoints with the key authority's secret key."""
    fed = cfg.federation  # type: ignore[attr-defined]
    schema = get_schema(fed.schema)
    initial = build_model(schema.input_dim, seed=fed.seed, hidden=fed.hidden).state_dict()
    secret = keys.load_secret_context(keys.current_generation(run_dir / "keys").secret_path)
    chain = [
        Checkpoint(
            rnd,
            int((run_dir / f"checkpoints/round-{rnd:04d}.count").read_text()),
            (run_dir / f"checkpoints/round-{rnd:04d}.fche").read_bytes(),
        )
        for rnd in range(1, ROUNDS + 1)
    ]
    start = {n: t.numpy() for n, t in initial.items()}
    return [replay_global_model(start, chain[:r], secret) for r in range(1, ROUNDS + 1)]


def test_he_run_matches_plaintext_fedavg(run: tuple[Path, object]) -> None:
    run_dir, cfg = run
    expected = plaintext_fedavg(run_dir, cfg, ROUNDS)
    got = _he_models(run_dir, cfg)
    for rnd, (e, g) in enumerate(zip(expected, got, strict=True), start=1):
        for name in e:
            np.testing.assert_allclose(g[name], e[name], atol=1e-4, err_msg=f"round {rnd}")
    # and training moved the model (the comparison is not trivially between initial models)
    assert max(np.abs(expected[1][n] - expected[0][n]).max() for n in expected[0]) > 1e-3


def test_rounds_complete_without_rejections(run: tuple[Path, object]) -> None:
    run_dir, _ = run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["train_replies"] == 3 and r["rejected"] == [] for r in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.5 < summary["federated"]["roc_auc"] <= 1.0


def test_server_stores_ciphertext_and_researcher_model_is_the_replay(
    run: tuple[Path, object],
) -> None:
    run_dir, cfg = run
    for rnd in range(1, ROUNDS + 1):
        assert (run_dir / f"checkpoints/round-{rnd:04d}.fche").read_bytes()[:4] == b"FCHE"
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["federated"]["best_round"]
    final = load_file(str(run_dir / "model.safetensors"))
    replayed = _he_models(run_dir, cfg)[best - 1]
    for name, value in replayed.items():
        np.testing.assert_array_equal(final[name].numpy(), value)


def test_key_files_follow_custody_rules(run: tuple[Path, object]) -> None:
    run_dir, _ = run
    gen = keys.current_generation(run_dir / "keys")
    assert stat.S_IMODE(gen.secret_path.stat().st_mode) == 0o600
    assert keys.load_public_context(gen.public_path).is_public()
