"""Noise planning and the branch's persistent accountant."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.accounting import (
    AccountantConflict,
    AccountantStateError,
    AccountingError,
    AccountingEvent,
    BranchAccountant,
    compute_epsilon,
    plan_for_config,
    plan_noise_multiplier,
    poisson_sample_rate,
    recompute_check,
    steps_per_epoch,
)
from fedcrm.privacy.config import DPConfig

DELTA = 1e-5
KEY = b"k" * 32


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


events_strategy = st.lists(
    st.builds(
        AccountingEvent,
        st.floats(min_value=0.5, max_value=5.0),
        st.floats(min_value=1e-3, max_value=0.3),
        st.integers(min_value=1, max_value=100),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=events_strategy)
def test_cumulative_epsilon_never_decreases_across_rounds_and_restarts(
    events: list[AccountingEvent], tmp_path: Path
) -> None:
    path = tmp_path / "accountant.json"
    path.unlink(missing_ok=True)
    previous = 0.0
    for event in events:
        accountant = BranchAccountant.open(path, accountant="rdp", key=KEY)  # a "restart"
        assert accountant.epsilon(DELTA) == pytest.approx(previous, abs=1e-12)
        accountant.record(event)
        current = accountant.epsilon(DELTA)
        assert current >= previous
        accountant.save(path, key=KEY)
        previous = current
    reloaded = BranchAccountant.load(path, key=KEY)
    assert reloaded.history == tuple(events)
    assert reloaded.epsilon(DELTA) == previous


def test_round_by_round_history_equals_the_plan() -> None:
    plan = [AccountingEvent(1.1, 0.0128, 78 * 10)]
    rounds = [AccountingEvent(1.1, 0.0128, 78)] * 10
    for name in ("rdp", "prv"):
        assert compute_epsilon(rounds, delta=DELTA, accountant=name) == compute_epsilon(
            plan, delta=DELTA, accountant=name
        )
    assert compute_epsilon([], delta=DELTA, accountant="rdp") == 0.0


def test_would_exceed_refuses_and_leaves_history_untouched(tmp_path: Path) -> None:
    accountant = BranchAccountant()
    accountant.record(AccountingEvent(1.0, 0.02, 50))
    before = accountant.history
    spent = accountant.epsilon(DELTA)
    admitted = accountant.would_exceed(
        noise_multiplier=1.0, sample_rate=0.02, steps=50, delta=DELTA, budget=spent * 3
    )
    assert admitted.admitted and admitted.projected_epsilon > spent
    refused = accountant.would_exceed(
        noise_multiplier=1.0, sample_rate=0.02, steps=5000, delta=DELTA, budget=spent * 3
    )
    assert not refused.admitted
    assert refused.current_epsilon == spent
    assert refused.projected_epsilon > refused.budget
    assert "above the budget" in refused.reason
    assert accountant.history == before
    assert accountant.epsilon(DELTA) == spent


def test_recording_needs_a_valid_event() -> None:
    accountant = BranchAccountant()
    for bad in [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, 0), (math.nan, 0.1, 1)]:
        with pytest.raises(AccountingError):
            AccountingEvent(*bad)
    with pytest.raises(AccountingError):
        accountant.record((1.0, 0.1, 1))  # type: ignore[arg-type]
    with pytest.raises(AccountingError, match="0 < delta < 1"):
        accountant.epsilon(0.0)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "branch-7" / "accountant.json"
    accountant = BranchAccountant(accountant="rdp")
    accountant.record(AccountingEvent(1.2, 0.0128, 78))
    accountant.record(AccountingEvent(1.2, 0.0128, 78))
    accountant.save(path)
    return path


def _tamper_steps(text: str) -> str:
    data = json.loads(text)
    data["history"][1]["steps"] = 1
    return json.dumps(data)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: t[: len(t) // 2], "not valid JSON"),
        (lambda t: "", "not valid JSON"),
        (lambda t: "\x00\xff" + t, "not valid JSON"),
        (_tamper_steps, "failed its integrity check"),
        (lambda t: t.replace('"rdp"', '"prv"'), "failed its integrity check"),
        (lambda t: t.replace("1.2", "NaN", 1), "not valid JSON"),
        (lambda t: "[]", "no integrity field"),
    ],
    ids=["truncated", "empty", "binary", "steps-lowered", "accountant-swapped", "nan", "list"],
)
def test_corrupted_file_is_a_clear_error_and_is_never_overwritten(
    saved: Path, corrupt: object, message: str
) -> None:
    saved.write_text(corrupt(saved.read_text()))  # type: ignore[operator]
    damaged = saved.read_bytes()
    with pytest.raises(AccountantStateError, match=message) as info:
        BranchAccountant.load(saved)
    assert str(saved) in str(info.value)
    with pytest.raises(AccountantStateError):
        BranchAccountant.open(saved, accountant="rdp")
    fresh = BranchAccountant(accountant="rdp")
    fresh.record(AccountingEvent(1.0, 0.01, 1))
    with pytest.raises(AccountantStateError):
        fresh.save(saved)
    assert saved.read_bytes() == damaged
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temp file left


def test_hmac_detects_tampering_even_with_a_recomputed_digest(tmp_path: Path) -> None:
    path = tmp_path / "accountant.json"
    accountant = BranchAccountant()
    accountant.record(AccountingEvent(1.0, 0.05, 40))
    accountant.save(path, key=KEY)
    assert BranchAccountant.load(path, key=KEY).history == accountant.history
    # An attacker without the key lowers the steps and re-signs with plain SHA-256.
    forged = BranchAccountant(history=[AccountingEvent(1.0, 0.05, 1)])
    path.write_text(forged.to_json())
    with pytest.raises(AccountantStateError, match="integrity algorithm"):
        BranchAccountant.load(path, key=KEY)
    path.write_text(forged.to_json(key=b"x" * 32))
    with pytest.raises(AccountantStateError, match="integrity check"):
        BranchAccountant.load(path, key=KEY)
    accountant.save(tmp_path / "other.json", key=KEY)
    with pytest.raises(AccountantStateError, match="pass the branch key"):
        BranchAccountant.load(tmp_path / "other.json")


def test_stale_copy_cannot_overwrite_a_longer_history(saved: Path) -> None:
    stale = BranchAccountant.load(saved)
    current = BranchAccountant.load(saved)
    current.record(AccountingEvent(1.2, 0.0128, 78))
    current.save(saved)
    newest = saved.read_bytes()
    stale.record(AccountingEvent(3.0, 0.0128, 1))  # diverges from what is on disk
    with pytest.raises(AccountantConflict, match="not a prefix"):
        stale.save(saved)
    assert saved.read_bytes() == newest
    assert isinstance(AccountantConflict("x"), FedCrmError)


def test_open_refuses_to_switch_accountant(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(AccountantStateError, match="holds a rdp accountant but prv"):
        BranchAccountant.open(saved, accountant="prv")
    assert BranchAccountant.open(tmp_path / "new.json", accountant="prv").history == ()
    assert not (tmp_path / "new.json").exists()


def test_prv_is_at_most_rdp_and_the_stored_figure_recomputes(saved: Path) -> None:
    accountant = BranchAccountant.load(saved)
    accountant.record(AccountingEvent(0.9, 0.05, 120))
    recorded = accountant.epsilon(DELTA)  # what a ledger entry stores
    report = accountant.recompute_check(delta=DELTA, recorded_epsilon=recorded)
    assert report.matches
    assert report.prv_le_rdp
    assert report.prv_epsilon < report.rdp_epsilon == recorded
    assert not recompute_check(
        accountant.history,
        delta=DELTA,
        recorded_epsilon=recorded + 1e-3,
        recorded_accountant="rdp",
    ).matches


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
    config = DPConfig(
        target_epsilon=3.0,
        delta=DELTA,
        max_grad_norm=1.0,
        batch_size=64,
        local_epochs=2,
        rounds=10,
    )
    plan = plan_for_config(config, num_rows=5000)
    assert plan.sample_rate == 64 / 5000
    assert plan.steps_per_round == 2 * 78
    assert plan.planned_epsilon <= 3.0
    fixed = plan_for_config(
        DPConfig(target_epsilon=3.0, delta=DELTA, max_grad_norm=1.0, noise_multiplier=0.5),
        num_rows=5000,
    )
    assert fixed.noise_multiplier == 0.5
    assert fixed.planned_epsilon > 3.0  # reported, and would_exceed will refuse the rounds
