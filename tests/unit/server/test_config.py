import pytest

from fedcrm.exceptions import ConfigError
from fedcrm.server.config import FederationConfig
from fedcrm.strategies.factory import StrategyName


def test_round_trip_through_run_config() -> None:
    cfg = FederationConfig(schema="telco", num_rounds=7, strategy=StrategyName.FEDPROX, lr=0.1)
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg


def test_types_are_coerced_and_checked() -> None:
    cfg = FederationConfig.from_run_config({"num-rounds": 5.0, "lr": "0.5", "strategy": "fedadam"})
    assert cfg.num_rounds == 5 and cfg.lr == 0.5 and cfg.strategy is StrategyName.FEDADAM
    with pytest.raises(ConfigError, match=r"num-rounds: invalid value 2\.5"):
        FederationConfig.from_run_config({"num-rounds": 2.5})
    with pytest.raises(ConfigError, match="strategy: invalid value 'fedsgd'"):
        FederationConfig.from_run_config({"strategy": "fedsgd"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_rounds": 0}, "num-rounds must be >= 1"),
        ({"fraction_train": 1.5}, "fraction-train must be in"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"schema": "bank"}, "schema must be one of"),
        ({"proximal_mu": -1.0}, "proximal-mu must be >= 0"),
    ],
)
def test_invalid_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FederationConfig(**changes)  # type: ignore[arg-type]
