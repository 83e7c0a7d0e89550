import tomllib
from pathlib import Path

from fedcrm.server.config import FederationConfig

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def test_flower_app_config_matches_federation_defaults() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FederationConfig().to_run_config()
    assert set(declared) <= set(defaults), set(declared) - set(defaults)
    assert FederationConfig.from_run_config(declared) == FederationConfig()
