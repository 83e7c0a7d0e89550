from pathlib import Path

import pytest

from fedcrm.data.partition import PartitionKind
from fedcrm.exceptions import ConfigError
from fedcrm.simulation.config import load_experiment, parse_experiment, to_toml_dict

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


CHURN_EXAMPLES = sorted(
    p for p in EXAMPLES.glob("*.toml") if 'task = "recommendation"' not in p.read_text()
)


@pytest.mark.parametrize("path", CHURN_EXAMPLES, ids=lambda p: p.stem)
def test_examples_parse(path: Path) -> None:
    cfg = load_experiment(path)
    assert parse_experiment(to_toml_dict(cfg)) == cfg


def test_defaults_and_schema_from_dataset() -> None:
    cfg = parse_experiment(
        {"name": "x", "dataset": "synthetic:telco", "partition": {"kind": "dirichlet"}}
    )
    assert cfg.federation.schema == "telco"
    assert cfg.partition.kind is PartitionKind.DIRICHLET


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dataset": "mlc"}, "missing top-level key 'name'"),
        ({"name": "x", "dataset": "bank"}, "dataset must be one of"),
        ({"name": "x", "dataset": "mlc", "rounds": 3}, r"unknown key\(s\) \['rounds'\]"),
        (
            {"name": "x", "dataset": "mlc", "federation": {"num-round": 3}},
            r"\[federation\] has unknown key",
        ),
        ({"name": "x", "dataset": "mlc", "partition": {"kind": "random"}}, r"\[partition\]"),
        ({"name": "a/b", "dataset": "mlc"}, "name must be"),
        ({"name": "x", "dataset": "mlc", "federation": "fast"}, "must be a table"),
    ],
)
def test_invalid_configs(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_experiment(raw)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "missing.toml")
