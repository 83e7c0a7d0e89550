"""A budget that holds across runs and crashes: ledger and branch accountants in step.

The scenarios of issue 12: two runs into one ledger with fresh branch folders (as two
``fedcrm simulate`` runs make), and a run stopped at each point between a branch's training and
the end of the round, then resumed by a new run. Either way no spend is lost, none is counted
twice, and no branch trains past its budget.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import TASK_IDS, Federation, build_federation, small_experiment
from fedcrm.client import accountant_key
from fedcrm.compliance import Decision, PrivacyLedger, open_store, sqlite_url
from fedcrm.privacy import BranchAccountant, DPSGDConfig
from fedcrm.server import FederationStopped, run_federation
from fedcrm.tasks import get_task

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)
pytestmark = pytest.mark.filterwarnings("ignore::fedcrm.privacy.InsecureRNGWarning")


class Crash(BaseException):
    """Stands for the process dying (SIGKILL): nothing catches it."""


def _dp(fed: Federation, **overrides: Any) -> DPSGDConfig:
    task = get_task(fed.federation.task)
    return DPSGDConfig(target_epsilon=3.0, model=task.model_name, purpose=task.purpose, **overrides)


def _ledger(path: Path) -> PrivacyLedger:
    return PrivacyLedger(open_store(sqlite_url(path / "ledger.db")))


def _run(fed: Federation, ledger: PrivacyLedger, run_id: str, dp: DPSGDConfig) -> Any:
    return run_federation(
        fed.grid, fed.federation, fed.settings, min_nodes=3, dp=dp, ledger=ledger, run_id=run_id
    )


def _accountants(fed: Federation, dp: DPSGDConfig) -> dict[str, BranchAccountant]:
    out = {}
    for branch in fed.simulated.branches:
        key = accountant_key((branch.folder / "hmac.key").read_bytes())
        for path in (branch.folder / "privacy").glob("*.accountant.json"):
            out[branch.name] = BranchAccountant.load(path, key=key)
    return out


def _check_in_step(fed: Federation, ledger: PrivacyLedger, dp: DPSGDConfig) -> None:
    """Every spend of every accountant is in the ledger once, and the totals agree."""
    for name, accountant in _accountants(fed, dp).items():
        rows = ledger.entries(branch=name, decision=Decision.ADMITTED)
        ids = [r.spend_id for r in rows]
        assert len(ids) == len(set(ids)), "a spend was counted twice"
        assert {s.spend_id for s in accountant.spends} == set(ids), "a spend is missing"
        delta = rows[-1].delta
        total = ledger.cumulative_epsilon(name, dp.model, dp.purpose)
        assert total == pytest.approx(accountant.epsilon(delta), rel=1e-6)


@parametrize_tasks
def test_a_second_run_with_fresh_branches_into_the_same_ledger_trains_nothing(
    task_name: str, tmp_path: Path, task_identity: None, one_thread: None
) -> None:
    """Two `fedcrm simulate` runs into one ledger: the second run's branches start at ε = 0."""
    ledger = _ledger(tmp_path)
    first = build_federation(tmp_path / "run1", small_experiment(task_name))
    dp = _dp(first)
    _run(first, ledger, "r1", dp)
    totals = {t.branch: t.cumulative_epsilon for t in ledger.totals()}
    assert all(0 < eps <= dp.budget for eps in totals.values())
    second = build_federation(tmp_path / "run2", small_experiment(task_name))  # new folders
    with pytest.raises(FederationStopped, match=r"only 0 of 3 branches were admitted \(3 refused"):
        _run(second, ledger, "r2", dp)
    assert all(e.decision == Decision.REFUSED for e in ledger.entries(run_id="r2"))
    assert {t.branch: t.cumulative_epsilon for t in ledger.totals()} == totals
    # The fresh accountants now hold the ledger's spends: the branches refused by themselves.
    for name, accountant in _accountants(second, dp).items():
        delta = ledger.entries(run_id="r1", branch=name)[-1].delta
        assert accountant.epsilon(delta) == pytest.approx(totals[name], rel=1e-9)
        assert all(s.run_id == "r1" for s in accountant.spends)
    assert not [m for m in second.grid.replies if "arrays" in m.content.array_records]


def _crash_after_training(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    task = type(get_task(fed.federation.task))
    original = task.train_private

    def train_then_die(self: Any, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        raise Crash("killed after training, before the reply left")

    monkeypatch.setattr(task, "train_private", train_then_die)


def _crash_before_the_ledger_write(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    def die(self: Any, entry: Any) -> Any:
        raise Crash("killed with the reply received, before the ledger write")

    monkeypatch.setattr(PrivacyLedger, "append", die)


def _crash_after_the_ledger_write(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcrm.strategies.validated import ValidatedStrategy

    def die(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise Crash("killed after the ledger write, before aggregation")

    monkeypatch.setattr(ValidatedStrategy, "aggregate_train", die)


def _crash_after_aggregation(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcrm.strategies.validated import ValidatedStrategy

    def die(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise Crash("killed after aggregation, before evaluation")

    monkeypatch.setattr(ValidatedStrategy, "aggregate_evaluate", die)


CRASHES: dict[str, Callable[[Federation, pytest.MonkeyPatch], None]] = {
    "after-training": _crash_after_training,
    "after-reply": _crash_before_the_ledger_write,
    "after-ledger-write": _crash_after_the_ledger_write,
    "after-aggregation": _crash_after_aggregation,
}


@parametrize_tasks
@pytest.mark.parametrize("point", list(CRASHES))
def test_a_run_killed_mid_round_loses_no_spend_and_counts_none_twice(
    point: str, federation: Federation, tmp_path: Path
) -> None:
    ledger = _ledger(tmp_path)
    dp = _dp(federation, max_epsilon=20.0)
    with pytest.MonkeyPatch.context() as patch:
        CRASHES[point](federation, patch)
        with pytest.raises(Crash):
            _run(federation, ledger, "r1", dp)
    accountants = _accountants(federation, dp)
    assert all(len(a.spends) == 1 for a in accountants.values())  # each trained round 1 once
    if point == "after-training":
        # Killed inside the first branch's round: its spend stayed reserved, never released.
        (only,) = accountants.values()
        assert only.spends[0].status == "reserved"
    else:
        assert len(accountants) == 3
    # The next run (the restart) starts by reconciling: the spends are in the ledger once.
    _run(federation, ledger, "r2", dp)
    _check_in_step(federation, ledger, dp)
    reconciled = [e for e in ledger.entries(run_id="r1") if "reconciled" in (e.reason or "")]
    expected = {"after-training": 1, "after-reply": 3}.get(point, 0)
    assert len(reconciled) == expected
    assert all(e.round == 1 and e.decision == Decision.ADMITTED for e in reconciled)


def test_a_branch_whose_update_the_ledger_puts_over_budget_is_not_aggregated(
    federation: Federation, tmp_path: Path
) -> None:
    """A branch that ignores the ledger's spends (or lies): its update is recorded, not used."""
    ledger = _ledger(tmp_path)
    dp = _dp(federation)
    _run(federation, ledger, "r1", dp)
    for accountant_file in federation.branches.glob("000/privacy/*"):
        accountant_file.unlink()  # accountant and per-customer ledger: a branch reset entirely
    import fedcrm.client.dp_round as dp_round

    dp_round._customer_ledger.cache_clear()  # as a restarted branch process would

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dp_round, "parse_spends", lambda text: [])  # it ignores what it is told
        with pytest.raises(FederationStopped, match="only 0 of 3"):
            _run(federation, ledger, "r2", dp)
    name = federation.simulated.branches[0].name
    (row,) = ledger.entries(run_id="r2", branch=name, decision=Decision.ADMITTED)
    assert row.cumulative_epsilon > dp.budget and "not aggregated" in (row.reason or "")


@parametrize_tasks
@pytest.mark.parametrize("point", ["after-training", "after-ledger-write"])
def test_a_restarted_coordinator_resumes_with_a_round_offset(
    point: str, federation: Federation, tmp_path: Path
) -> None:
    """Killed in round 2, started again with the same run id: rounds 2.. run, ε goes on."""
    from fedcrm.server import RoundCheckpoints
    from fedcrm.server.config import FederationConfig

    ledger = _ledger(tmp_path)
    dp = _dp(federation, max_epsilon=20.0)
    cfg = FederationConfig(**{**federation.federation.__dict__, "num_rounds": 3})
    checkpoints = RoundCheckpoints(tmp_path / "rounds", "r1")

    def run(on_round: Any = None) -> Any:
        return run_federation(
            federation.grid,
            cfg,
            federation.settings,
            min_nodes=3,
            dp=dp,
            ledger=ledger,
            run_id="r1",
            checkpoints=checkpoints,
            on_round=on_round,
        )

    def in_round_two(record: Any) -> None:
        if record.round == 1:
            CRASHES[point](federation, patch)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(Crash):
        run(in_round_two)
    saved = checkpoints.load()
    assert saved is not None and saved.last_round == 1
    before = {t.branch: t.cumulative_epsilon for t in ledger.totals()}
    sent = len(federation.grid.sent)
    result = run()
    assert [r.round for r in result.rounds] == [1, 2, 3]
    # The restart trained from the saved round-1 model, not from the initial one.
    first_train = next(m for m in federation.grid.sent[sent:] if m.metadata.message_type == "train")
    record = first_train.content.array_records["arrays"]
    for name in record:
        assert (record[name].numpy() == saved.arrays[name].numpy()).all()
    _check_in_step(federation, ledger, dp)
    after = {t.branch: t.cumulative_epsilon for t in ledger.totals()}
    assert all(after[b] > before[b] for b in before)  # ε went on, never lower
    for branch in federation.simulated.branches:
        rounds = [e.round for e in ledger.entries(run_id="r1", branch=branch.name)]
        # Round 2's first attempt spent (its rows were used) and is recorded once, beside the
        # retry; every other round once.
        assert sorted(rounds).count(1) == 1 and sorted(rounds).count(3) == 1
    with pytest.raises(Exception, match="complete"):
        run()
