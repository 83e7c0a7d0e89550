"""DP-SGD in the round loop, for every task: ledger, refusals, stopping (in-process grid).

Churn rows are records (one per customer); a recommendation row is one customer with all of
their interactions. Either way the branch plans σ once, checks its persistent accountant
before it trains, and the coordinator records every decision.
"""

from pathlib import Path
from typing import Any

import pytest

from conftest import TASK_IDS, Federation
from fedcrm import wire as k
from fedcrm.client import accountant_key
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.exceptions import ConfigError, ErrorCode
from fedcrm.privacy import BranchAccountant, DPSGDConfig, InsecureRNGWarning
from fedcrm.privacy.dp import AccountantStateError
from fedcrm.server import FederationConfig, FederationResult, FederationStopped, run_federation
from fedcrm.strategies import StrategyName
from fedcrm.tasks import get_task

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


def _dp(fed: Federation) -> DPSGDConfig:
    task = get_task(fed.federation.task)
    return DPSGDConfig(target_epsilon=3.0, model=task.model_name, purpose=task.purpose)


def _ledger(path: Path) -> PrivacyLedger:
    return PrivacyLedger(open_store(sqlite_url(path / "ledger.db")))


def _run(
    fed: Federation,
    ledger: PrivacyLedger | None,
    run_id: str,
    *,
    grid: Any = None,
    cfg: FederationConfig | None = None,
    min_nodes: int = 3,
) -> FederationResult:
    with pytest.warns(InsecureRNGWarning):
        return run_federation(
            grid or fed.grid,
            cfg or fed.federation,
            fed.settings,
            min_nodes=min_nodes,
            dp=_dp(fed),
            ledger=ledger,
            run_id=run_id,
        )


def _key(fed: Federation, folder: str) -> bytes | None:
    return accountant_key((fed.branches / folder / "hmac.key").read_bytes())


def _accountants(branches: Path) -> dict[str, bytes]:
    return {
        p.parent.parent.name: p.read_bytes()
        for p in sorted(branches.glob("*/privacy/*.accountant.json"))
    }


@parametrize_tasks
def test_dp_run_fills_the_ledger_and_the_replies(federation: Federation, tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    dp = _dp(federation)
    result = _run(federation, ledger, "r1")
    entries = ledger.entries(run_id="r1")
    assert len(entries) == 6 and all(e.decision == Decision.ADMITTED for e in entries)
    assert {e.privacy_unit for e in entries} == {PrivacyUnit.CUSTOMER}
    assert {e.model for e in entries} == {get_task(federation.federation.task).model_name}
    for branch in federation.simulated.branches:
        mine = [e for e in entries if e.branch == branch.name]
        assert [e.round for e in mine] == [1, 2]
        assert 0 < mine[0].cumulative_epsilon < mine[1].cumulative_epsilon <= dp.budget
        assert mine[1].noise_multiplier == mine[0].noise_multiplier  # planned once
        assert mine[1].delta == mine[0].delta  # 1/n, n = the branch's DP-SGD rows
        assert ledger.cumulative_epsilon(branch.name, dp.model, dp.purpose) == pytest.approx(
            mine[1].cumulative_epsilon
        )
    assert all("dp-epsilon" in r.train and "dp-epsilon-round" in r.train for r in result.rounds)
    assert all(r.privacy["admitted"] == 3 and not r.refused for r in result.rounds)
    assert len(result.privacy) == 6
    # The ledger URL never reaches a branch; the DP settings and the round count do.
    config = federation.grid.sent[-1].content.config_records[k.CONFIG]
    assert k.KEY_LEDGER_URL not in config and config[k.KEY_DP_TARGET_EPSILON] == 3.0
    assert len(_accountants(federation.branches)) == 3
    # Each node planned its noise once and kept the plan in its context state.
    assert all("dp-plan" in c.state.config_records for c in federation.grid.contexts.values())


@parametrize_tasks
def test_accountants_are_hmac_protected_with_the_branch_key(
    federation: Federation, tmp_path: Path
) -> None:
    """The drift fix: the recommendation accountant is saved under the branch key too."""
    _run(federation, _ledger(tmp_path), "r1")
    path = next(federation.branches.glob("000/privacy/*.accountant.json"))
    assert '"hmac-sha256"' in path.read_text()
    with pytest.raises(AccountantStateError):  # without the branch's key it does not verify
        BranchAccountant.open(path, key=b"k" * 32)


def test_a_branch_that_cannot_run_dp_answers_with_an_error_reply(federation: Federation) -> None:
    settings = federation.settings.__class__(
        **{**federation.settings.__dict__, "batch_size": 1000}  # more than any branch holds
    )
    with pytest.raises(FederationStopped, match=r"only 0 of 3 branches were admitted \(0 refused"):
        run_federation(
            federation.grid, federation.federation, settings, min_nodes=3, dp=_dp(federation)
        )
    errors = [r for r in federation.grid.replies if r.has_error()]
    assert len(errors) == 3
    assert all(e.error.code == ErrorCode.DP_ROUND_FAILED for e in errors)
    assert all("must not exceed the branch's rows" in str(e.error.reason) for e in errors)


@parametrize_tasks
def test_over_budget_branch_is_refused_and_the_others_continue(
    federation: Federation, tmp_path: Path
) -> None:
    ledger = _ledger(tmp_path)
    first = federation.simulated.branches[0].name
    # Branch 0 alone spends its budget in an earlier run (same ledger, same files).
    solo = federation.subset([0])
    cfg = FederationConfig(**{**federation.federation.__dict__, "min_train_nodes": 1})
    _run(federation, ledger, "r0", grid=solo, cfg=cfg, min_nodes=1)
    spent = _accountants(federation.branches)["000"]
    result = _run(federation, ledger, "r1")
    refusals = ledger.entries(run_id="r1", decision=Decision.REFUSED)
    assert [(e.branch, e.round) for e in refusals] == [(first, 1), (first, 2)]
    assert all(e.steps == 0 and e.reason and "above the budget" in e.reason for e in refusals)
    assert refusals[0].cumulative_epsilon == ledger.entries(run_id="r0")[-1].cumulative_epsilon
    assert _accountants(federation.branches)["000"] == spent  # the refused branch trained nothing
    assert [len(r.refused) for r in result.rounds] == [1, 1]
    assert all(r.train_replies == 3 and r.privacy["admitted"] == 2 for r in result.rounds)
    admitted = ledger.entries(run_id="r1", decision=Decision.ADMITTED)
    assert {e.branch for e in admitted} == {b.name for b in federation.simulated.branches[1:]}


@parametrize_tasks
def test_all_branches_refused_stops_the_run(federation: Federation, tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    dp = _dp(federation)
    _run(federation, ledger, "r1")  # spends the whole budget of every branch
    spent = _accountants(federation.branches)
    with pytest.raises(
        FederationStopped,
        match=r"round 1: only 0 of 3 branches were admitted \(3 refused by their privacy budget",
    ):
        run_federation(
            federation.grid,
            federation.federation,
            federation.settings,
            min_nodes=3,
            dp=dp,
            ledger=ledger,
            run_id="r2",
        )
    refused = ledger.entries(run_id="r2")
    assert len(refused) == 3 and all(e.decision == Decision.REFUSED for e in refused)
    assert _accountants(federation.branches) == spent
    for branch in federation.simulated.branches:  # nothing lowered, nothing added
        assert ledger.cumulative_epsilon(branch.name, dp.model, dp.purpose) == pytest.approx(
            max(e.cumulative_epsilon for e in ledger.entries(run_id="r1", branch=branch.name))
        )


@parametrize_tasks
def test_a_reset_accountant_learns_the_ledger_spends_and_trains_nothing(
    federation: Federation, tmp_path: Path
) -> None:
    """A branch that "forgets" its accountant gets the ledger's spends back before round 1."""
    ledger = _ledger(tmp_path)
    dp = _dp(federation)
    second = federation.simulated.branches[1].name
    _run(federation, ledger, "r1")
    path = next(federation.branches.glob("001/privacy/*.accountant.json"))
    path.unlink()  # it "forgets"
    spent = ledger.cumulative_epsilon(second, dp.model, dp.purpose)
    with pytest.raises(FederationStopped, match=r"only 0 of 3 branches were admitted \(3 refused"):
        run_federation(
            federation.grid,
            federation.federation,
            federation.settings,
            min_nodes=3,
            dp=dp,
            ledger=ledger,
            run_id="r2",
        )
    assert ledger.cumulative_epsilon(second, dp.model, dp.purpose) == spent  # nothing lowered
    assert all(e.decision == Decision.REFUSED for e in ledger.entries(run_id="r2"))
    restored = BranchAccountant.load(path, key=_key(federation, "001"))
    r1_ids = {e.spend_id for e in ledger.entries(run_id="r1", branch=second)}
    assert {s.spend_id for s in restored.spends} == r1_ids  # the ledger's, and nothing new
    delta = ledger.entries(run_id="r1", branch=second)[-1].delta
    assert restored.epsilon(delta) == pytest.approx(spent, rel=1e-9)


@parametrize_tasks
def test_dp_with_fedprox_is_refused(federation: Federation, task_name: str) -> None:
    if task_name != "churn":
        with pytest.raises(ConfigError, match="supports strategy"):
            FederationConfig(task=task_name, strategy=StrategyName.FEDPROX)
        return
    cfg = FederationConfig(strategy=StrategyName.FEDPROX)
    with pytest.raises(ConfigError, match="fedprox"):
        run_federation(federation.grid, cfg, federation.settings, dp=_dp(federation))


def test_a_customer_budget_below_one_round_trains_no_one(
    federation: Federation, tmp_path: Path
) -> None:
    """The privacy filter leaves out every customer: each branch says so, nothing is spent."""
    dp = DPSGDConfig(target_epsilon=3.0, customer_budget=0.01)
    with pytest.raises(FederationStopped, match="only 0 of 3"):
        run_federation(
            federation.grid, federation.federation, federation.settings, min_nodes=3, dp=dp
        )
    errors = [r for r in federation.grid.replies if r.has_error()]
    assert len(errors) == 3
    assert all("customer budget 0.01; nothing is trained" in str(e.error.reason) for e in errors)
    assert _accountants(federation.branches) == {}
