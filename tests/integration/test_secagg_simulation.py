"""SecAgg+ on Flower's simulation engine (Ray): 3 branches, 2 rounds, through `run_experiment`.

The plaintext reference is FedAvg computed in-process from the run's own branch exports
(same local training, full batches, as in ``test_he_simulation.py``); the SecAgg+ model must
match it within the quantization error, and the run directory must hold the usual artefacts.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from fedcrm.data.schema import get_schema
from fedcrm.models.churn import build_model
from fedcrm.simulation.config import ExperimentConfig, parse_experiment
from fedcrm.simulation.runner import run_experiment
from support import plaintext_fedavg

pytestmark = [
    pytest.mark.integration,
    # Ray's helper process outlives its Popen object (see test_he_simulation.py).
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

ROUNDS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExperimentConfig]:
    cfg = parse_experiment(
        {
            "name": "secagg",
            "dataset": "synthetic:mlc",
            "rows": 450,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {
                "num-rounds": ROUNDS,
                "lr": 0.05,
                "local-epochs": 2,
                "batch-size": 1000,
            },
            "aggregation": {"mode": "secagg", "secagg-num-shares": 3, "secagg-threshold": 2},
            "baselines": {"enabled": False},
        }
    )
    return run_experiment(cfg, runs_root=tmp_path_factory.mktemp("runs")), cfg


def test_secagg_run_matches_plaintext_fedavg(run: tuple[Path, ExperimentConfig]) -> None:
    run_dir, cfg = run
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["federated"]["best_round"]
    expected = plaintext_fedavg(run_dir, cfg, ROUNDS)[best - 1]
    final = load_file(str(run_dir / "model.safetensors"))
    for name, value in expected.items():
        np.testing.assert_allclose(final[name].numpy(), value, atol=1e-4, err_msg=name)
    initial = build_model(get_schema("mlc").input_dim, seed=cfg.seed).state_dict()
    assert max((final[n] - initial[n]).abs().max().item() for n in initial) > 1e-3


def test_rounds_sum_every_branch_and_write_the_run_dir(run: tuple[Path, ExperimentConfig]) -> None:
    run_dir, _ = run
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["rejected"] == [] and r["train"]["secagg-summed"] == 3 for r in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.5 < summary["federated"]["roc_auc"] <= 1.0
    assert "secagg" in (run_dir / "config.toml").read_text()
    traffic = summary["traffic"]
    assert traffic["aggregation"] == "secagg" and traffic["median_round_seconds"] > 0
    # masked int64 vector + keys + shares up; evaluation replies too
    assert traffic["bytes_up_per_branch_per_round"] > 8 * sum(
        t.numel() for t in build_model(get_schema("mlc").input_dim, seed=0).state_dict().values()
    )
    assert all(r["traffic"]["branches"] == 3 for r in lines)
    assert "bytes up" in (run_dir / "report.md").read_text()
