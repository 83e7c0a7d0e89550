"""Federated recommendations on Flower's simulation engine (Ray), end to end.

One simulation (synthetic interactions, 3 branches, 2 rounds, driven through the one
``simulate`` command) serves every assertion, including the ``recommend`` command's.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedcrm import wire as k
from fedcrm.cli import app

pytestmark = pytest.mark.integration

CONFIG = """
task = "recommendation"
name = "rec-it"
dataset = "synthetic"
seed = 0
cpus-per-branch = 0.5

[synthetic]
users = 90
items = 150
branches = 3
cold-customers = 1

[federation]
num-rounds = 2
local-epochs = 5
lr = 0.05
factors = 16
batch-size = 256
history-length = 3

[baselines]
mf-epochs = 6
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rec")
    config = root / "rec.toml"
    config.write_text(CONFIG, encoding="utf-8")
    result = CliRunner().invoke(app, ["simulate", str(config), "--runs-dir", str(root / "runs")])
    assert result.exit_code == 0, result.output
    (found,) = (root / "runs").iterdir()
    return found


def test_run_directory_is_complete(run_dir: Path) -> None:
    for name in ("config.toml", "metrics.jsonl", "summary.json", "report.md", k.REC_ITEMS_FILE):
        assert (run_dir / name).is_file(), name
    for folder in ("000", "001", "002"):
        assert (run_dir / "branches" / folder / k.REC_USER_FACTORS_FILE).is_file()
    names = [
        json.loads(p.read_text())["name"] for p in sorted(run_dir.glob("branches/*/branch.json"))
    ]
    assert names == ["zip-0", "zip-1", "zip-2"]
    with np.load(run_dir / k.REC_ITEMS_FILE, allow_pickle=False) as items:
        assert sorted(items.files) == [
            "items.bias.weight",
            "items.context.weight",
            "items.embedding.weight",
            "items.position.weight",
        ]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    report = (run_dir / "report.md").read_text()
    assert "ML-1M" in report and "centralised mf+history" in report


def test_federated_hr_improves_or_beats_popularity(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    hr = [r["evaluate"]["hr10-sampled"] for r in rounds]
    popularity = summary["centralised"]["popularity"]["hr_sampled"]
    assert hr[-1] > hr[0] or hr[-1] > popularity, (hr, popularity)
    assert set(summary["centralised"]) == {"popularity", "item-knn", "mf", "mf+history"}
    assert summary["federated"]["k"] == 10
    # Up per branch and round: the item arrays (float32), then protobuf framing, the train
    # metrics and the evaluation sums (a few hundred bytes).
    per_branch = summary["traffic"]["bytes_up_per_branch_per_round"]
    payload = (150 * (2 * 16 + 1) + 3) * 4
    assert 0 < per_branch - payload < 0.1 * payload


def _recommend(run_dir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["recommend", "--run", str(run_dir), *args])
    return result.exit_code, result.output


def test_recommend_excludes_seen_items(run_dir: Path) -> None:
    code, out = _recommend(run_dir, "--branch", "zip-0", "--customer", "u0", "-n", "5")
    assert code == 0, out
    assert "top 5 for customer u0" in out
    assert "fallback" not in out


def test_recommend_cold_customer_gets_popularity_fallback(run_dir: Path) -> None:
    code, out = _recommend(run_dir, "--branch", "zip-1", "--customer", "c1-0", "-n", "3")
    assert code == 0, out
    assert "popularity fallback" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--branch", "zip-0", "--customer", "nobody"), "unknown customer"),
        (("--branch", "zip-0", "--customer", "c1-0"), "unknown customer"),
        (("--branch", "zip-7", "--customer", "u0"), "unknown branch"),
        (("--branch", "zip-0", "--customer", "u0", "-n", "0"), "-n must be >= 1"),
    ],
    ids=["unknown-customer", "other-branch-customer", "unknown-branch", "n-zero"],
)
def test_recommend_bad_inputs_exit_2(run_dir: Path, args: tuple[str, ...], message: str) -> None:
    code, out = _recommend(run_dir, *args)
    assert code == 2
    assert message in out
