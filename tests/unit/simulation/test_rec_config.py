"""Recommendation experiment TOML: parsing, validation and the resolved-config round trip."""

import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedcrm.exceptions import ConfigError
from fedcrm.simulation.rec_config import (
    load_rec_experiment,
    parse_rec_experiment,
    rec_to_toml_dict,
)

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "movielens_zip.toml"
BASE = {"task": "recommendation", "name": "r", "dataset": "synthetic"}


@pytest.mark.parametrize("path", [EXAMPLE, EXAMPLE.with_name("movielens_zip_dp.toml")])
def test_example_parses_and_round_trips(path: Path) -> None:
    cfg = load_rec_experiment(path)
    assert cfg.dataset == "movielens-100k"
    again = parse_rec_experiment(tomllib.loads(tomli_w.dumps(rec_to_toml_dict(cfg))))
    assert again == cfg


def test_dp_example_states_its_unit_budget() -> None:
    cfg = load_rec_experiment(EXAMPLE.with_name("movielens_zip_dp.toml"))
    assert cfg.dp is not None
    dp = cfg.dp.federated()
    assert (dp.target_epsilon, dp.delta, dp.grad_sample_mode) == (8.0, 1e-5, "hooks")
    assert (dp.model, dp.purpose) == ("recommender", "recommendation-training")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({**BASE, "task": "churn"}, "task"),
        ({**BASE, "dataset": "ml-1m"}, "dataset"),
        ({**BASE, "rounds": 3}, "unknown key"),
        ({**BASE, "federation": {"num-round": 3}}, "unknown key"),
        ({**BASE, "federation": {"lr": -1.0}}, "lr"),
        ({**BASE, "synthetic": {"items": 50}}, "items"),
        ({**BASE, "synthetic": {"branches": 12}}, "branches"),
        ({**BASE, "name": "a b"}, "name"),
        ({**BASE, "dp": {"target-epsilon": -1.0}}, "target_epsilon"),
        ({**BASE, "dp": {"target-epsilon": 8.0, "users-per-step": 0}}, "users-per-step"),
        ({**BASE, "dp": {"target-epsilon": 8.0, "clip": 1.0}}, "unknown key"),
        ({**BASE, "federation": {"recency-halflife": -2.0}}, "recency_halflife"),
        ({**BASE, "federation": {"history-length": 51}}, "history_length"),
        ({**BASE, "federation": {"history-length": 2.5}}, "history_length"),
    ],
    ids=[
        "task",
        "dataset",
        "top-key",
        "federation-key",
        "lr",
        "items",
        "branches",
        "name",
        "dp-epsilon",
        "dp-users",
        "dp-key",
        "halflife",
        "history-too-long",
        "history-float",
    ],
)
def test_invalid_configs_are_rejected(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_rec_experiment(raw)
