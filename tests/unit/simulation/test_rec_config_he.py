"""``[aggregation]`` of a recommendation experiment: HE accepted, the rest refused clearly."""

import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedcrm.exceptions import ConfigError
from fedcrm.simulation.rec_config import (
    RecExperimentConfig,
    load_rec_experiment,
    parse_rec_experiment,
    rec_to_toml_dict,
)
from fedcrm.strategies.guardrails import AggregationMode

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
BASE = {"task": "recommendation", "name": "r", "dataset": "synthetic"}


def test_he_example_is_the_plain_example_with_he_aggregation() -> None:
    he = load_rec_experiment(EXAMPLES / "movielens_zip_he.toml")
    plain = load_rec_experiment(EXAMPLES / "movielens_zip.toml")
    assert he.aggregation is AggregationMode.HE
    assert plain.aggregation is AggregationMode.PLAIN
    assert (he.federation, he.baselines, he.dataset, he.seed, he.dp) == (
        plain.federation,
        plain.baselines,
        plain.dataset,
        plain.seed,
        None,
    )
    again = parse_rec_experiment(tomllib.loads(tomli_w.dumps(rec_to_toml_dict(he))))
    assert again == he


def test_plain_is_the_default_and_not_written_back() -> None:
    cfg = parse_rec_experiment(BASE)
    assert cfg.aggregation is AggregationMode.PLAIN
    assert "aggregation" not in rec_to_toml_dict(cfg)
    assert parse_rec_experiment({**BASE, "aggregation": {"mode": "plain"}}) == cfg


def test_he_combines_with_customer_level_dp() -> None:
    cfg = parse_rec_experiment(
        {**BASE, "aggregation": {"mode": "he"}, "dp": {"target-epsilon": 8.0}}
    )
    assert cfg.aggregation is AggregationMode.HE and cfg.dp is not None
    assert rec_to_toml_dict(cfg)["aggregation"] == {"mode": "he"}


def test_a_string_mode_is_coerced() -> None:
    cfg = RecExperimentConfig(name="r", dataset="synthetic", aggregation="he")  # type: ignore[arg-type]
    assert cfg.aggregation is AggregationMode.HE


@pytest.mark.parametrize(
    ("aggregation", "match"),
    [
        ({"mode": "secagg"}, r"'secagg' is not supported for recommendations.*mode = 'he'"),
        ({"mode": "paillier"}, r"must be one of \['plain', 'he'\].*got 'paillier'"),
        ({"mode": 1}, r"must be one of"),
        ({"mode": "he", "robust": "krum"}, r"takes only 'mode', got \['robust'\]"),
        ({"secagg-threshold": 3}, r"takes only 'mode'.*SecAgg\+ settings"),
        ("he", r"\[aggregation\] must be a table"),
    ],
    ids=["secagg", "unknown-mode", "mode-type", "robust", "secagg-key", "not-a-table"],
)
def test_refused_aggregation_settings(aggregation: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_rec_experiment({**BASE, "aggregation": aggregation})
