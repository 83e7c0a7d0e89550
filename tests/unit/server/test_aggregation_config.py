"""The deployed ServerApp's aggregation mode comes from run-config keys."""

from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg

from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy import keys
from fedcrm.server.aggregation import wrapper
from fedcrm.strategies.guardrails import CombinationRefused
from fedcrm.strategies.he import HEAggregation
from fedcrm.strategies.secagg import SecAggPlusAggregation


def test_plain_is_the_default() -> None:
    assert wrapper({}, strategy="fedavg", round_timeout=5) is None
    assert wrapper({"aggregation-mode": "plain"}, strategy="fedavg", round_timeout=5) is None


def test_unknown_mode_and_he_without_a_public_context_are_refused() -> None:
    with pytest.raises(ConfigError, match="must be one of"):
        wrapper({"aggregation-mode": "fhe"}, strategy="fedavg", round_timeout=5)
    with pytest.raises(ConfigError, match="needs he-public-context"):
        wrapper({"aggregation-mode": "he"}, strategy="fedavg", round_timeout=5)
    with pytest.raises(CombinationRefused, match="fedadam on HE ciphertexts"):
        wrapper({"aggregation-mode": "he"}, strategy="fedadam", round_timeout=5)


def test_he_loads_the_public_context_and_refuses_a_secret_one(tmp_path: Path) -> None:
    generation = keys.init_keys(tmp_path / "keys")
    run_config = {
        "aggregation-mode": "he",
        "he-public-context": str(generation.public_path),
        "he-checkpoint-dir": str(tmp_path / "ckpt"),
    }
    wrap = wrapper(run_config, strategy="fedavg", round_timeout=5)
    assert wrap is not None
    server = wrap(FedAvg())
    assert isinstance(server, HEAggregation)
    with pytest.raises(FedCrmError):
        run_config["he-public-context"] = str(generation.secret_path)
        wrapper(run_config, strategy="fedavg", round_timeout=5)


def test_secagg_reads_its_settings() -> None:
    run_config = {"aggregation-mode": "secagg", "secagg-clipping-range": 2.0}
    wrap = wrapper(run_config, strategy="fedadam", round_timeout=7)
    assert wrap is not None
    server = wrap(FedAvg())
    assert isinstance(server, SecAggPlusAggregation)
    assert server.config.clipping_range == 2.0 and server.timeout == 7
    with pytest.raises(ConfigError, match="power of two"):
        wrapper(
            {"aggregation-mode": "secagg", "secagg-modulus-range": 1000},
            strategy="fedavg",
            round_timeout=5,
        )
    with pytest.raises(ConfigError, match="not supported yet"):
        wrapper(
            {"aggregation-mode": "secagg", "consent-purpose": "churn-model-training"},
            strategy="fedavg",
            round_timeout=5,
        )
