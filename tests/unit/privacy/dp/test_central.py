"""Branch-level (central) DP: monotone ε, recomputation, planning, adaptive clipping, config."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp import (
    CENTRAL_SAMPLE_RATE,
    AccountingEvent,
    CentralAccountant,
    CentralDPConfig,
    CentralDPMode,
    compute_epsilon,
    effective_noise_multiplier,
    flower_noise_multiplier,
    parse_central_dp,
    recompute_check,
    reseed_global_numpy,
    update_noise_for,
)
from fedcrm.privacy.dp._central_config import RUN_CONFIG_PREFIX, RUN_KEYS, TOML_KEYS

DELTA = 1e-5


@settings(max_examples=10, deadline=None)
@given(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.5, 8.0]), min_size=1, max_size=6))
def test_epsilon_never_decreases_across_rounds(sigmas: list[float]) -> None:
    accountant = CentralAccountant(accountant="rdp", delta=DELTA)
    last = 0.0
    for sigma in sigmas:
        alone, cumulative = accountant.record(sigma)
        assert alone > 0
        assert cumulative >= last
        assert cumulative >= alone - 1e-12
        last = cumulative


def test_recompute_from_stored_events_prv_not_above_rdp() -> None:
    accountant = CentralAccountant(accountant="rdp", delta=DELTA)
    for sigma in (3.0, 3.0, 2.5, 4.0):
        _, cumulative = accountant.record(sigma)
    report = recompute_check(
        accountant.events, delta=DELTA, recorded_epsilon=cumulative, recorded_accountant="rdp"
    )
    assert report.matches
    assert report.prv_le_rdp
    assert report.prv_epsilon < report.rdp_epsilon
    # A second accountant built from the stored σ's only (as the ledger keeps them) agrees.
    again = CentralAccountant(
        accountant="rdp", delta=DELTA, history=[e.noise_multiplier for e in accountant.events]
    )
    assert again.epsilon() == pytest.approx(cumulative, abs=1e-9)


@pytest.mark.parametrize(
    ("target", "accountant"),
    [(1.0, "rdp"), (8.0, "rdp"), (64.0, "rdp")],
    ids=["rdp-eps1", "rdp-eps8", "rdp-eps64"],
)
def test_planned_noise_gives_total_epsilon_at_most_target(target: float, accountant: str) -> None:
    cfg = CentralDPConfig(target_epsilon=target, delta=DELTA, accountant=accountant)  # type: ignore[arg-type]
    plan = cfg.plan(30)
    assert plan.planned_epsilon <= target
    assert plan.planned_epsilon > 0.9 * target  # not wastefully noisy either
    total = compute_epsilon(
        [AccountingEvent(plan.effective_noise_multiplier, CENTRAL_SAMPLE_RATE, 1)] * 30,
        delta=DELTA,
        accountant=accountant,  # type: ignore[arg-type]
    )
    assert total <= target
    # The tighter PRV accountant gives at most the same ε for the planned noise.
    prv = compute_epsilon(
        [AccountingEvent(plan.effective_noise_multiplier, CENTRAL_SAMPLE_RATE, 30)],
        delta=DELTA,
        accountant="prv",
    )
    assert prv <= total


def test_adaptive_accounting_is_worse_than_fixed_at_equal_noise() -> None:
    z = 2.0
    fixed = CentralAccountant(accountant="rdp", delta=DELTA, history=[z] * 10)
    z_eff = effective_noise_multiplier(z, clipped_count_stddev=4.0)
    adaptive = CentralAccountant(accountant="rdp", delta=DELTA, history=[z_eff] * 10)
    assert z_eff < z
    assert adaptive.epsilon() > fixed.epsilon()


def test_flower_centred_count_calibration_understates_noise() -> None:
    # Flower (Andrew et al.'s centred bits) turns z into z_update; with Flower's uncentred bits
    # the round is only as private as z_eff < z.
    z, sigma_b = 1.0, 2.0
    z_update = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert flower_noise_multiplier(z_update, sigma_b) == pytest.approx(z)
    assert effective_noise_multiplier(z_update, sigma_b) < z
    # Our inverse gives back the planned effective multiplier.
    assert effective_noise_multiplier(update_noise_for(z, sigma_b), sigma_b) == pytest.approx(z)


def test_adaptive_plan_defaults_count_noise_and_raises_update_noise() -> None:
    cfg = CentralDPConfig(mode=CentralDPMode.SERVER_ADAPTIVE, noise_multiplier=1.5)
    plan = cfg.plan(5)
    assert plan.clipped_count_stddev == pytest.approx(3.0)
    assert plan.update_noise_multiplier == pytest.approx(1.5 / math.sqrt(0.75))
    assert plan.effective_noise_multiplier == 1.5


def test_reseed_changes_numpy_noise() -> None:
    reseed_global_numpy()
    first = np.random.normal(size=4)
    reseed_global_numpy()
    assert not np.array_equal(first, np.random.normal(size=4))


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"mode": "server-fixed", "target-epsilon": 0}, "target-epsilon must be a finite"),
        ({"mode": "server-fixed", "target-epsilon": -1.0}, "target-epsilon must be a finite"),
        ({"mode": "server-fixed", "target-epsilon": 3, "delta": 0}, "0 < delta < 1"),
        ({"mode": "server-fixed", "target-epsilon": 3, "delta": 1.0}, "0 < delta < 1"),
        ({"mode": "server-fixed", "target-epsilon": 3, "clipping-norm": 0}, "clipping-norm"),
        ({"mode": "server-fixed", "target-epsilon": 3, "noise-multiplier": 1}, "exactly one"),
        ({"mode": "server-fixed"}, "exactly one"),
        ({"mode": "server-sideways", "target-epsilon": 3}, "mode must be one of"),
        ({"target-epsilon": 3}, "needs mode"),
        ({"mode": "server-fixed", "target-epsilon": 3, "epsilon": 3}, "unknown key"),
        ({"mode": "client-adaptive", "noise-multiplier": 2, "target-quantile": 1.0}, "quantile"),
        ({"mode": "client-adaptive", "noise-multiplier": 2, "clip-norm-lr": 0}, "clip-norm-lr"),
        (
            {"mode": "server-adaptive", "noise-multiplier": 2, "clipped-count-stddev": 1.5},
            "must exceed",
        ),
        ({"mode": "server-fixed", "target-epsilon": 3, "accountant": "gdp"}, "accountant"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, str) else None,
)
def test_bad_config_is_a_clear_config_error(table: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_central_dp(table)


def test_accountant_rejects_bad_delta() -> None:
    with pytest.raises(Exception, match="0 < delta < 1"):
        CentralAccountant(accountant="rdp", delta=0.0)


# -- run config (the deployed ServerApp) ---------------------------------------------------------

GOOD_RUN = {"central-dp-mode": "client-adaptive", "central-dp-noise-multiplier": 1.5}


def test_run_config_keys_are_the_toml_keys_prefixed() -> None:
    assert {key.removeprefix(RUN_CONFIG_PREFIX) for key in RUN_KEYS} == set(TOML_KEYS)
    assert k.KEY_CENTRAL_DP_MODE in RUN_KEYS


@pytest.mark.parametrize(
    "run_config",
    [
        {},
        {"central-dp-mode": ""},
        {"central-dp-mode": "none", "central-dp-clipping-norm": 0.5},
        {"central-dp-mode": "", "central-dp-target-epsilon": 0.0, "aggregation-mode": "he"},
    ],
    ids=["absent", "empty", "none", "zero-target-he"],
)
def test_run_config_without_mode_is_off(run_config: dict[str, object]) -> None:
    assert CentralDPConfig.from_run_config(run_config) is None


def test_run_config_builds_the_same_settings_as_the_table() -> None:
    run = {
        "central-dp-mode": "server-adaptive",
        "central-dp-target-epsilon": 8,  # an int from --run-config
        "central-dp-delta": 1e-6,
        "central-dp-clipping-norm": 0.5,
        "central-dp-target-quantile": 0.7,
        "central-dp-clip-norm-lr": 0.1,
        "central-dp-clipped-count-stddev": 0.0,  # 0: not set (2 x the multiplier)
        "central-dp-accountant": "prv",
        "central-dp-max-epsilon": 10.0,
        "central-dp-model": "churn-v2",
        "central-dp-purpose": "retention",
        "aggregation-mode": "plain",
        "strategy": "fedprox",
        "num-rounds": 3,  # other keys are not central DP's
    }
    cfg = CentralDPConfig.from_run_config(run)
    table = {
        key.removeprefix(RUN_CONFIG_PREFIX): value
        for key, value in run.items()
        if key.startswith(RUN_CONFIG_PREFIX) and key != "central-dp-clipped-count-stddev"
    }
    assert cfg == parse_central_dp(table)
    assert cfg is not None and isinstance(cfg.target_epsilon, float)
    assert cfg.clipped_count_stddev is None and cfg.max_epsilon == 10.0
    fixed = CentralDPConfig.from_run_config(GOOD_RUN)
    assert fixed == CentralDPConfig(mode=CentralDPMode.CLIENT_ADAPTIVE, noise_multiplier=1.5)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"central-dp-mode": "server-sideways"}, "mode must be one of"),
        ({"central-dp-mode": 1}, "mode must be one of"),
        ({"central-dp-noise-multiplier": 0.0}, "exactly one"),
        ({"central-dp-target-epsilon": 3.0}, "exactly one"),
        ({"central-dp-noise-multiplier": -1.0}, "noise-multiplier must be a finite"),
        ({"central-dp-noise-multiplier": "1.5"}, "noise-multiplier must be a finite"),
        ({"central-dp-delta": 0.0}, "0 < delta < 1"),
        ({"central-dp-delta": 1.0}, "0 < delta < 1"),
        ({"central-dp-clipping-norm": 0.0}, "clipping-norm must be"),
        ({"central-dp-clipping-norm": True}, "clipping-norm must be"),
        ({"central-dp-target-quantile": 1.0}, "target-quantile"),
        ({"central-dp-clip-norm-lr": -0.2}, "clip-norm-lr"),
        ({"central-dp-clipped-count-stddev": 1.0}, "must exceed"),
        ({"central-dp-clipped-count-stddev": -3.0}, "clipped-count-stddev must be"),
        ({"central-dp-accountant": "gdp"}, "accountant must be one of"),
        ({"central-dp-max-epsilon": -1.0}, "max-epsilon must be"),
        ({"central-dp-model": " "}, "model must be a non-empty string"),  # "": the task's
        ({"central-dp-purpose": 7}, "purpose must be a non-empty string"),
        ({"central-dp-epsilon": 3.0}, "unknown run-config key"),
        ({"central-dp-min-honest-branches": 3}, "applies to mode 'distributed' only"),
    ],
    ids=lambda v: str(v)[:48] if isinstance(v, str) else None,
)
def test_bad_run_config_is_a_clear_config_error(extra: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CentralDPConfig.from_run_config({**GOOD_RUN, **extra})


def test_run_config_error_names_the_prefixed_keys() -> None:
    with pytest.raises(ConfigError, match=r"central-dp-<key>"):
        CentralDPConfig.from_run_config({**GOOD_RUN, "central-dp-delta": 2.0})


@pytest.mark.parametrize(
    "other",
    [
        {"aggregation-mode": "he"},
        {"aggregation-mode": "secagg"},
        {"aggregation-mode": "mpc"},
        {"strategy": "fedadam"},
    ],
    ids=["he", "secagg", "unknown-mode", "fedadam"],
)
def test_run_config_reads_central_dp_keys_only(other: dict[str, object]) -> None:
    """The combination with the run's aggregation and strategy is the wiring's to check.

    See ``tests/unit/server/test_wiring.py`` (`fedcrm.server.wiring.check_plan`).
    """
    assert CentralDPConfig.from_run_config(
        {**GOOD_RUN, **other}
    ) == CentralDPConfig.from_run_config(GOOD_RUN)


def test_run_config_takes_the_tasks_model_and_purpose() -> None:
    cfg = CentralDPConfig.from_run_config(GOOD_RUN, model="recommender", purpose="recs")
    assert cfg is not None and (cfg.model, cfg.purpose) == ("recommender", "recs")
    named = {**GOOD_RUN, "central-dp-model": "churn-v2", "central-dp-purpose": ""}
    cfg = CentralDPConfig.from_run_config(named, model="recommender", purpose="recs")
    assert cfg is not None and (cfg.model, cfg.purpose) == ("churn-v2", "recs")


@pytest.mark.parametrize(
    "stray",
    [{"central-dp-target-epsilon": 3.0}, {"central-dp-noise-multiplier": 1.0}],
    ids=["target", "noise"],
)
def test_run_config_target_without_mode_is_refused(stray: dict[str, object]) -> None:
    """A target without a mode would silently train without central DP."""
    with pytest.raises(ConfigError, match="central-dp-mode is off"):
        CentralDPConfig.from_run_config({"central-dp-mode": "", **stray})


def test_run_config_distributed_mode_under_he() -> None:
    run = {
        "central-dp-mode": "distributed",
        "central-dp-target-epsilon": 8.0,
        "central-dp-min-honest-branches": 3,
        "aggregation-mode": "he",
    }
    cfg = CentralDPConfig.from_run_config(run)
    assert cfg is not None and cfg.mode is CentralDPMode.DISTRIBUTED
    assert cfg.min_honest_branches == 3
    unset = CentralDPConfig.from_run_config({**run, "central-dp-min-honest-branches": 0})
    assert unset is not None and unset.min_honest_branches is None
