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


def test_example_parses_and_round_trips() -> None:
    cfg = load_rec_experiment(EXAMPLE)
    assert cfg.dataset == "movielens-100k"
    again = parse_rec_experiment(tomllib.loads(tomli_w.dumps(rec_to_toml_dict(cfg))))
    assert again == cfg


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
    ],
    ids=["task", "dataset", "top-key", "federation-key", "lr", "items", "branches", "name"],
)
def test_invalid_configs_are_rejected(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_rec_experiment(raw)
