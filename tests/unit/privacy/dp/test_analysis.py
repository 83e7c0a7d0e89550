"""Pure DP-SGD analysis: ε of a history, noise planning, the branch's plan, recomputation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp import (
    AccountingError,
    AccountingEvent,
    BranchAccountant,
    DPSGDConfig,
    compute_epsilon,
    plan_for_config,
    plan_noise_multiplier,
    poisson_sample_rate,
    steps_per_epoch,
)

DELTA = 1e-5


@settings(max_examples=8, deadline=None)
@given(
    target_epsilon=st.floats(min_value=0.3, max_value=20.0),
    delta=st.sampled_from([1e-3, 1e-5, 1e-7]),
    sample_rate=st.floats(min_value=1e-3, max_value=0.2),
    steps_per_round=st.integers(min_value=1, max_value=200),
    rounds=st.integers(min_value=1, max_value=40),
)
def test_planned_noise_never_overshoots_the_target(
    target_epsilon: float, delta: float, sample_rate: float, steps_per_round: int, rounds: int
) -> None:
    sigma = plan_noise_multiplier(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        accountant="rdp",
    )
    # The branch records round by round; the composed epsilon must still be within the target.
    accountant = BranchAccountant(accountant="rdp")
    for _ in range(rounds):
        accountant.record(AccountingEvent(sigma, sample_rate, steps_per_round))
    assert accountant.epsilon(delta) <= target_epsilon
    # ...and the plan is not needlessly noisy: 1 % less noise would overshoot.
    if sigma > 1 / 64:
        tighter = AccountingEvent(sigma * 0.99, sample_rate, steps_per_round * rounds)
        assert compute_epsilon([tighter], delta=delta, accountant="rdp") > target_epsilon


def test_planned_noise_with_prv_never_overshoots() -> None:
    q = poisson_sample_rate(batch_size=64, num_rows=5000)
    steps = steps_per_epoch(q)
    sigma = plan_noise_multiplier(
        target_epsilon=3.0,
        delta=DELTA,
        sample_rate=q,
        steps_per_round=steps,
        rounds=5,
        accountant="prv",
    )
    eps = compute_epsilon([AccountingEvent(sigma, q, steps * 5)], delta=DELTA, accountant="prv")
    assert eps <= 3.0
    rdp_sigma = plan_noise_multiplier(
        target_epsilon=3.0, delta=DELTA, sample_rate=q, steps_per_round=steps, rounds=5
    )
    assert sigma <= rdp_sigma  # PRV is the tighter accountant: it needs less noise


def test_planning_bad_input_is_a_clear_error() -> None:
    with pytest.raises(AccountingError, match="target_epsilon must be a finite number > 0"):
        plan_noise_multiplier(
            target_epsilon=0.0, delta=DELTA, sample_rate=0.01, steps_per_round=10, rounds=1
        )
    with pytest.raises(AccountingError, match="0 < delta < 1"):
        plan_noise_multiplier(
            target_epsilon=1.0, delta=1.0, sample_rate=0.01, steps_per_round=10, rounds=1
        )
    with pytest.raises(AccountingError, match="0 < sample_rate <= 1"):
        plan_noise_multiplier(
            target_epsilon=1.0, delta=DELTA, sample_rate=0.0, steps_per_round=10, rounds=1
        )
    with pytest.raises(AccountingError, match="batch_size"):
        poisson_sample_rate(batch_size=100, num_rows=50)


def test_round_by_round_history_equals_the_plan() -> None:
    plan = [AccountingEvent(1.1, 0.0128, 78 * 10)]
    rounds = [AccountingEvent(1.1, 0.0128, 78)] * 10
    for name in ("rdp", "prv"):
        assert compute_epsilon(rounds, delta=DELTA, accountant=name) == compute_epsilon(
            plan, delta=DELTA, accountant=name
        )
    assert compute_epsilon([], delta=DELTA, accountant="rdp") == 0.0


def test_rdp_figure_is_reproduced_bit_for_bit_by_stock_opacus() -> None:
    from opacus.accountants import RDPAccountant  # noqa: TID251 - independent reference

    events = [AccountingEvent(1.1, 0.0128, 78)] * 3 + [AccountingEvent(0.7, 0.05, 20)]
    stock = RDPAccountant()
    stock.history = [e.as_tuple() for e in [AccountingEvent(1.1, 0.0128, 234), events[-1]]]
    assert compute_epsilon(events, delta=DELTA, accountant="rdp") == stock.get_epsilon(DELTA)


@pytest.mark.parametrize(
    "events",
    [
        [AccountingEvent(1.0, 0.0128, 780)],
        [AccountingEvent(0.8, 0.0512, 190), AccountingEvent(1.5, 0.0512, 190)],
        [AccountingEvent(2.0, 0.01, 100)] * 3,
    ],
    ids=["churn-10-epochs", "two-sigmas", "three-rounds"],
)
def test_prv_le_rdp_for_the_same_events(events: list[AccountingEvent]) -> None:
    prv = compute_epsilon(events, delta=DELTA, accountant="prv")
    rdp = compute_epsilon(events, delta=DELTA, accountant="rdp")
    assert 0 < prv <= rdp


def test_plan_for_config_fixes_the_noise_for_all_rounds() -> None:
    config = DPSGDConfig(target_epsilon=3.0, delta=DELTA, max_grad_norm=1.0)
    plan = plan_for_config(config, num_rows=5000, batch_size=64, local_epochs=2, rounds=10)
    assert plan.sample_rate == 64 / 5000
    assert (plan.batch_size, plan.local_epochs, plan.rounds) == (64, 2, 10)
    assert plan.steps_per_round == 2 * 78
    assert plan.planned_epsilon <= 3.0
    assert (plan.delta, plan.accountant) == (DELTA, "rdp")
    fixed = plan_for_config(
        DPSGDConfig(target_epsilon=3.0, delta=DELTA, max_grad_norm=1.0, noise_multiplier=0.5),
        num_rows=5000,
        batch_size=64,
        local_epochs=1,
        rounds=1,
    )
    assert fixed.noise_multiplier == 0.5
    assert fixed.planned_epsilon > 3.0  # reported, and would_exceed will refuse the rounds


def test_the_plan_takes_delta_one_over_ten_n_unless_the_run_sets_it() -> None:
    plan = plan_for_config(
        DPSGDConfig(target_epsilon=1.0), num_rows=400, batch_size=32, local_epochs=2, rounds=5
    )
    assert plan.delta == pytest.approx(1 / 4000)
    fixed = plan_for_config(
        DPSGDConfig(target_epsilon=1.0, delta=1e-6),
        num_rows=400,
        batch_size=32,
        local_epochs=2,
        rounds=5,
    )
    assert fixed.delta == 1e-6
    with pytest.raises(ConfigError, match="not below 1/n"):
        plan_for_config(
            DPSGDConfig(target_epsilon=1.0, delta=0.01),
            num_rows=100,
            batch_size=10,
            local_epochs=1,
            rounds=1,
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"batch_size": 500}, "must not exceed the branch's rows"),
        ({"local_epochs": 0}, "local_epochs must be an integer >= 1"),
        ({"rounds": 2.5}, "rounds must be an integer >= 1"),
    ],
    ids=["batch", "batch-too-large", "epochs", "rounds"],
)
def test_the_branch_figures_of_a_plan_are_checked(changes: dict[str, object], message: str) -> None:
    figures: dict[str, object] = {"num_rows": 400, "batch_size": 32, "local_epochs": 1, "rounds": 1}
    figures.update(changes)
    with pytest.raises(AccountingError, match=message):
        plan_for_config(DPSGDConfig(target_epsilon=1.0), **figures)  # type: ignore[arg-type]
