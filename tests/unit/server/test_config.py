import pytest

from fedcrm.exceptions import ConfigError
from fedcrm.server import FederationConfig
from fedcrm.strategies import StrategyName


def test_round_trip_through_run_config() -> None:
    cfg = FederationConfig(num_rounds=7, strategy=StrategyName.FEDPROX, server_lr=0.1)
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg


def test_types_are_coerced_and_checked() -> None:
    cfg = FederationConfig.from_run_config(
        {"num-rounds": 5.0, "server-lr": 1, "strategy": "fedadam", "lr": "ignored: a task key"}
    )
    assert cfg.num_rounds == 5 and cfg.server_lr == 1.0 and cfg.strategy is StrategyName.FEDADAM
    with pytest.raises(ConfigError, match=r"num-rounds must be a whole number, got 2\.5"):
        FederationConfig.from_run_config({"num-rounds": 2.5})
    with pytest.raises(ConfigError, match=r"strategy must be one of .* got .fedsgd."):
        FederationConfig.from_run_config({"strategy": "fedsgd"})
    with pytest.raises(ConfigError, match="unknown task 'scoring'; registered tasks"):
        FederationConfig.from_run_config({"task": "scoring"})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_rounds": 0}, "num-rounds must be >= 1"),
        ({"fraction_train": 1.5}, "fraction-train must be in"),
        ({"server_lr": 0.0}, "server-lr must be > 0"),
        ({"proximal_mu": -1.0}, "proximal-mu must be >= 0"),
        ({"task": "recommendation", "strategy": StrategyName.FEDPROX}, "supports strategy"),
    ],
)
def test_invalid_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FederationConfig(**changes)  # type: ignore[arg-type]
