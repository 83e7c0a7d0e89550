"""SecAgg+ settings: validation, run-config round trip, capacity and the error bound."""

import pytest

from fedcrm.exceptions import ConfigError
from fedcrm.strategies.secagg import RUN_CONFIG_KEYS, SecAggConfig, quantization_error_bound


def test_run_config_round_trip_keeps_every_setting() -> None:
    cfg = SecAggConfig(
        num_shares=0.5,
        reconstruction_threshold=0.6,
        clipping_range=2.0,
        quantization_range=2**20,
        modulus_range=2**30,
        max_weight=800.0,
    )
    assert set(cfg.to_run_config()) == set(RUN_CONFIG_KEYS)
    assert SecAggConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"secagg-num-shares": 2}, "odd integer >= 3"),
        ({"secagg-num-shares": 1.5}, "fraction in"),
        ({"secagg-threshold": 1}, ">= 2"),
        ({"secagg-clipping-range": -1.0}, "clipping-range must be > 0"),
        ({"secagg-clipping-range": float("inf")}, "clipping-range must be > 0"),
        ({"secagg-quantization-range": 1}, "integer >= 2"),
        ({"secagg-modulus-range": 2**33}, "<= 2\\*\\*32"),
        ({"secagg-modulus-range": 2**20}, "must exceed secagg-quantization-range"),
        ({"secagg-max-weight": 0}, "max-weight must be > 0"),
        ({"secagg-max-weight": "big"}, "must be a number"),
        ({"secagg-num-shares": True}, "must be a number"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_settings_are_refused_with_the_rule(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecAggConfig.from_run_config(values)


def test_capacity_follows_modulus_over_quantization() -> None:
    cfg = SecAggConfig(quantization_range=2**22, modulus_range=2**32)
    assert cfg.max_branches == 1023
    cfg.check_capacity(1023)
    with pytest.raises(ConfigError, match="at most 1023 branches"):
        cfg.check_capacity(1024)


def test_weight_above_max_weight_is_refused() -> None:
    cfg = SecAggConfig(max_weight=100.0)
    cfg.check_weight(100)
    with pytest.raises(ConfigError, match="at least 101"):
        cfg.check_weight(101)


def test_error_bound_shrinks_with_weight_and_levels() -> None:
    cfg = SecAggConfig(clipping_range=8.0, quantization_range=2**22, max_weight=1000.0)
    # q_k = 2**22 / 2 for n = 500: bound = 2 * 8 * 2 / 2**22
    assert quantization_error_bound(cfg, [500, 500]) == pytest.approx(32 / 2**22)
    finer = SecAggConfig(clipping_range=8.0, quantization_range=2**24, max_weight=1000.0)
    assert quantization_error_bound(finer, [500, 500]) < quantization_error_bound(cfg, [500, 500])
    with pytest.raises(ValueError, match="positive"):
        quantization_error_bound(cfg, [])
