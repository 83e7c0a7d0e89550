"""The strategy wiring: aggregation settings, the guardrails over the whole plan, the wrappers.

The deployed ServerApp reads ``aggregation-mode``, ``he-*``, ``secagg-*`` and ``central-dp-*``
run-config keys (`deployed_wiring`); a simulation builds the same `Wiring` from its TOML. Either
way `check_plan` refuses a combination before any round.
"""

from pathlib import Path
from typing import Any

import pytest
from flwr.serverapp.strategy import FedAvg, FedProx, Krum

from fedcrm.compliance import sqlite_url
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy import CentralDPConfig, CentralDPMode, keys
from fedcrm.server import (
    AggregationConfig,
    FederationConfig,
    Wiring,
    check_plan,
    deployed_wiring,
)
from fedcrm.strategies import (
    AggregationMode,
    CentralDPStrategy,
    CombinationRefused,
    DistributedDPStrategy,
    HEAggregation,
    RobustAggregator,
    RobustConfig,
    SecAggConfig,
    SecAggPlusAggregation,
)
from fedcrm.tasks import get_task

CLIENT_ADAPTIVE = {"central-dp-mode": "client-adaptive", "central-dp-noise-multiplier": 1.5}
SERVER_FIXED = {"central-dp-mode": "server-fixed", "central-dp-target-epsilon": 8.0}


def _wiring(
    run_config: dict[str, Any],
    tmp_path: Path | None = None,
    *,
    dp: bool = False,
    consent: bool = False,
) -> Wiring:
    """What the deployed ServerApp builds from ``run_config`` (federation keys included)."""
    ledger = sqlite_url((tmp_path or Path("/nonexistent")) / "ledger.db")
    return deployed_wiring(
        run_config,
        FederationConfig.from_run_config(run_config),
        get_task(str(run_config.get("task", "churn"))),
        run_id="run-1",
        ledger_url=ledger,
        dp=dp,
        consent=consent,
    )


# -- AggregationConfig from a run config ----------------------------------------------------------


def test_plain_is_the_default() -> None:
    assert AggregationConfig.from_run_config({}) == AggregationConfig()
    for run_config in ({}, {"aggregation-mode": "plain"}, {"aggregation-mode": ""}):
        wiring = _wiring(run_config)
        assert wiring.aggregation.mode is AggregationMode.PLAIN
        assert not wiring.wraps
        inner = FedAvg()
        assert wiring.wrap(inner) is inner


@pytest.mark.parametrize("mode", ["fhe", "mpc"])
def test_unknown_mode_is_refused_with_the_allowed_modes(mode: str) -> None:
    with pytest.raises(ConfigError, match="aggregation-mode must be one of") as info:
        AggregationConfig.from_run_config({"aggregation-mode": mode})
    assert all(m in str(info.value) for m in ("plain", "he", "secagg"))
    with pytest.raises(ConfigError, match="aggregation-mode must be one of"):
        _wiring({"aggregation-mode": mode})


def test_run_config_secagg_settings_are_read() -> None:
    cfg = AggregationConfig.from_run_config(
        {"aggregation-mode": "secagg", "secagg-clipping-range": 2.0}
    )
    assert cfg.mode is AggregationMode.SECAGG and cfg.secagg.clipping_range == 2.0
    with pytest.raises(ConfigError, match="power of two"):
        AggregationConfig.from_run_config(
            {"aggregation-mode": "secagg", "secagg-modulus-range": 1000}
        )


# -- HE -------------------------------------------------------------------------------------------


def test_he_without_a_public_context_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs he-public-context"):
        _wiring({"aggregation-mode": "he"})
    with pytest.raises(ConfigError, match="needs he-public-context"):
        Wiring(
            AggregationConfig(mode=AggregationMode.HE),
            None,
            rounds=2,
            run_id="r",
            ledger_url="sqlite://",
            round_timeout=5,
        )


def test_he_with_fedadam_is_refused_before_the_context_is_read() -> None:
    with pytest.raises(CombinationRefused, match="fedadam on HE ciphertexts"):
        _wiring({"aggregation-mode": "he", "strategy": "fedadam"})


def test_he_loads_the_public_context_and_refuses_a_secret_one(tmp_path: Path) -> None:
    generation = keys.init_keys(tmp_path / "keys")
    run_config = {
        "aggregation-mode": "he",
        "he-public-context": str(generation.public_path),
        "he-checkpoint-dir": str(tmp_path / "ckpt"),
    }
    wiring = _wiring(run_config)
    assert wiring.wraps and wiring.checkpoint_dir == tmp_path / "ckpt"
    server = wiring.wrap(FedAvg())
    assert isinstance(server, HEAggregation) and wiring.he is server
    assert server.context.is_public()
    assert wiring.central_summary() is None
    with pytest.raises(FedCrmError):
        _wiring({**run_config, "he-public-context": str(generation.secret_path)})


def test_he_with_distributed_dp_wraps_the_he_server(tmp_path: Path) -> None:
    generation = keys.init_keys(tmp_path / "keys")
    run_config = {
        "aggregation-mode": "he",
        "he-public-context": str(generation.public_path),
        "central-dp-mode": "distributed",
        "central-dp-noise-multiplier": 1.0,
        "central-dp-min-honest-branches": 3,
        "num-rounds": 2,
    }
    wiring = _wiring(run_config, tmp_path)
    assert wiring.min_honest == 3 and wiring.rounds == 2
    server = wiring.wrap(FedAvg(min_available_nodes=3, min_train_nodes=3))
    assert isinstance(server, DistributedDPStrategy) and wiring.distributed is server
    assert wiring.he is not None and server.he is wiring.he
    assert wiring.central_summary() is not None
    # K_min defaults to min-train-nodes.
    defaulted = {**run_config, "central-dp-min-honest-branches": 0, "min-train-nodes": 4}
    assert _wiring(defaulted, tmp_path).min_honest == 4


# -- SecAgg+ --------------------------------------------------------------------------------------


def test_secagg_reads_its_settings() -> None:
    run_config = {
        "aggregation-mode": "secagg",
        "secagg-clipping-range": 2.0,
        "strategy": "fedadam",
        "round-timeout": 7,
    }
    wiring = _wiring(run_config)
    server = wiring.wrap(FedAvg())
    assert isinstance(server, SecAggPlusAggregation)
    assert server.config.clipping_range == 2.0 and server.timeout == 7
    with pytest.raises(ConfigError, match="power of two"):
        _wiring({"aggregation-mode": "secagg", "secagg-modulus-range": 1000})


@pytest.mark.parametrize(
    ("dp", "consent"), [(True, False), (False, True)], ids=["dp-sgd", "consent"]
)
def test_secagg_refuses_dp_sgd_and_consent_until_reports_travel_with_it(
    dp: bool, consent: bool
) -> None:
    with pytest.raises(ConfigError, match="not supported yet"):
        _wiring({"aggregation-mode": "secagg"}, dp=dp, consent=consent)
    with pytest.raises(ConfigError, match="not supported yet"):
        check_plan(
            AggregationConfig(mode=AggregationMode.SECAGG),
            None,
            strategy="fedavg",
            dp=dp,
            consent=consent,
        )


def test_secagg_toml_keys_need_secagg_mode() -> None:
    with pytest.raises(ConfigError, match="need mode = 'secagg'"):
        AggregationConfig.from_table({"secagg-max-weight": 10})
    table = AggregationConfig(
        mode=AggregationMode.SECAGG, secagg=SecAggConfig(clipping_range=4.0)
    ).to_table()
    assert AggregationConfig.from_table(table).secagg.clipping_range == 4.0


# -- central DP against the aggregation and the strategy (the guardrails) -------------------------

REFUSED_RUNS = [
    ({**CLIENT_ADAPTIVE, "aggregation-mode": "he"}, "central DP on HE ciphertexts"),
    ({**CLIENT_ADAPTIVE, "aggregation-mode": "secagg"}, "central DP on SecAgg"),
    ({**CLIENT_ADAPTIVE, "strategy": "fedadam"}, "central DP with fedadam"),
    ({**CLIENT_ADAPTIVE, "central-dp-mode": "distributed"}, "distributed DP without HE"),
    ({**SERVER_FIXED, "aggregation-mode": "he"}, "server-side fixed clipping on HE"),
]


@pytest.mark.parametrize(("run_config", "match"), REFUSED_RUNS, ids=[m for _, m in REFUSED_RUNS])
def test_deployed_central_dp_combination_is_refused(run_config: dict[str, Any], match: str) -> None:
    with pytest.raises(CombinationRefused, match=match) as info:
        _wiring(run_config)
    assert "Instead:" in str(info.value)


@pytest.mark.parametrize(("run_config", "match"), REFUSED_RUNS, ids=[m for _, m in REFUSED_RUNS])
def test_check_plan_refuses_the_same_combination(run_config: dict[str, Any], match: str) -> None:
    aggregation = AggregationConfig.from_run_config(run_config)
    central = CentralDPConfig.from_run_config(run_config)
    assert central is not None  # the settings alone are valid: only the plan is refused
    strategy = str(run_config.get("strategy", "fedavg"))
    with pytest.raises(CombinationRefused, match=match):
        check_plan(aggregation, central, strategy=strategy, dp=False, consent=False)


@pytest.mark.parametrize(
    ("central", "mode"),
    [
        (CentralDPConfig(mode=CentralDPMode.SERVER_FIXED, noise_multiplier=1.0), "plain"),
        (CentralDPConfig(mode=CentralDPMode.SERVER_ADAPTIVE, noise_multiplier=1.0), "plain"),
        (CentralDPConfig(mode=CentralDPMode.CLIENT_FIXED, noise_multiplier=1.0), "plain"),
        (CentralDPConfig(mode=CentralDPMode.CLIENT_ADAPTIVE, noise_multiplier=1.0), "plain"),
        (CentralDPConfig(mode=CentralDPMode.DISTRIBUTED, noise_multiplier=1.0), "he"),
        (None, "he"),
        (None, "secagg"),
    ],
    ids=[
        "server-fixed",
        "server-adaptive",
        "client-fixed",
        "client-adaptive",
        "ddp-he",
        "he",
        "sa",
    ],
)
def test_check_plan_allows_the_valid_plans(central: CentralDPConfig | None, mode: str) -> None:
    aggregation = AggregationConfig(mode=AggregationMode(mode))
    check_plan(aggregation, central, strategy="fedprox", dp=False, consent=False)


def test_central_dp_wraps_the_inner_strategy_and_keeps_its_summary(tmp_path: Path) -> None:
    wiring = _wiring({**CLIENT_ADAPTIVE, "num-rounds": 3}, tmp_path)
    assert wiring.wraps and wiring.central_dp is not None
    assert wiring.central_dp.model == "churn" and wiring.central_dp.purpose == (
        "churn-model-training"
    )
    server = wiring.wrap(FedAvg())
    assert isinstance(server, CentralDPStrategy) and wiring.central is server
    assert wiring.central_summary() is not None


def test_central_dp_takes_the_tasks_model_and_purpose(tmp_path: Path) -> None:
    wiring = _wiring({**CLIENT_ADAPTIVE, "task": "recommendation"}, tmp_path)
    task = get_task("recommendation")
    assert wiring.central_dp is not None
    assert (wiring.central_dp.model, wiring.central_dp.purpose) == (task.model_name, task.purpose)


# -- robust aggregators ---------------------------------------------------------------------------


def test_robust_aggregator_replaces_fedavg_only() -> None:
    aggregation = AggregationConfig(robust=RobustConfig(RobustAggregator.KRUM, num_malicious=1))
    wiring = Wiring(
        aggregation, None, rounds=2, run_id="r", ledger_url="sqlite://", round_timeout=5
    )
    assert wiring.wraps
    assert isinstance(wiring.wrap(FedAvg()), Krum)
    with pytest.raises(ConfigError, match="replaces FedAvg"):
        wiring.wrap(FedProx(proximal_mu=0.1))


def test_secagg_refuses_a_branch_heavier_than_max_weight_before_round_1() -> None:
    """The branches' statistics (round 0) name their counts: too large a weight stops the run."""
    from flwr.app import MetricRecord

    from fedcrm.server import AggregationConfig, Wiring
    from fedcrm.strategies import AggregationMode, SecAggConfig

    wiring = Wiring(
        AggregationConfig(mode=AggregationMode.SECAGG, secagg=SecAggConfig(max_weight=100.0)),
        None,
        rounds=1,
        run_id="r",
        ledger_url="sqlite://",
        round_timeout=5,
    )
    fits = [MetricRecord({"num-examples": 80}), MetricRecord({"num-examples": 100})]
    wiring.check_statistics(fits)
    with pytest.raises(ConfigError, match="raise secagg-max-weight to at least 150"):
        wiring.check_statistics([*fits, MetricRecord({"num-examples": 150})])
    plain = Wiring(AggregationConfig(), None, rounds=1, run_id="r", ledger_url="", round_timeout=5)
    plain.check_statistics([MetricRecord({"num-examples": 10**9})])  # nothing to weigh
