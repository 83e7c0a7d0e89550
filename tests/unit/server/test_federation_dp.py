"""Record-level DP in the federated loop: ledger, refusals, stopping (in-process grid)."""

from pathlib import Path
from typing import Any

import pytest

from fedcrm import constants as k
from fedcrm.client.app import DP_ERROR_CODE
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.dp_sgd import InsecureRNGWarning
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import FederationResult, FederationStopped, run_federation
from fedcrm.strategies.factory import StrategyName

CFG = FederationConfig(
    schema="mlc", num_rounds=2, lr=0.1, batch_size=32, hidden_layers="8", round_timeout=5
)
DP = FederatedDPConfig(target_epsilon=3.0)


def _ledger(path: Path) -> PrivacyLedger:
    return PrivacyLedger(open_store(sqlite_url(path / "ledger.db")))


def _run(
    grid: Any,
    ledger: PrivacyLedger,
    run_id: str,
    *,
    cfg: FederationConfig = CFG,
    min_nodes: int = 3,
) -> FederationResult:
    with pytest.warns(InsecureRNGWarning):
        return run_federation(grid, cfg, min_nodes=min_nodes, dp=DP, ledger=ledger, run_id=run_id)


def _accountants(branches: Path) -> dict[str, bytes]:
    return {
        p.parent.parent.name: p.read_bytes()
        for p in sorted(branches.glob("*/privacy/*.accountant.json"))
    }


def test_dp_run_fills_the_ledger_and_the_replies(federation: Any, tmp_path: Path) -> None:
    grid, branches = federation.grid, federation.branches
    ledger = _ledger(tmp_path)
    result = _run(grid, ledger, "r1")
    entries = ledger.entries(run_id="r1")
    assert len(entries) == 6 and all(e.decision == Decision.ADMITTED for e in entries)
    assert {e.privacy_unit for e in entries} == {PrivacyUnit.CUSTOMER}
    for name in ("000", "001", "002"):
        mine = [e for e in entries if e.branch == name]
        assert [e.round for e in mine] == [1, 2]
        assert 0 < mine[0].cumulative_epsilon < mine[1].cumulative_epsilon <= DP.budget
        assert mine[1].noise_multiplier == mine[0].noise_multiplier  # planned once
        assert mine[1].delta == mine[0].delta < 1 / 100  # 1/n, n = the branch's training rows
        assert ledger.cumulative_epsilon(name, DP.model, DP.purpose) == mine[1].cumulative_epsilon
    assert all("dp-epsilon" in r.train and "dp-epsilon-round" in r.train for r in result.rounds)
    assert all(r.privacy["admitted"] == 3 and not r.refused for r in result.rounds)
    assert len(result.privacy) == 6
    # The ledger URL never reaches a branch; the DP settings and the round count do.
    config = grid.sent[-1].content.config_records[k.CONFIG]
    assert k.KEY_LEDGER_URL not in config and config[k.KEY_DP_TARGET_EPSILON] == 3.0
    assert len(_accountants(branches)) == 3
    # Each node planned its noise once and kept the plan in its context state.
    assert all("dp-plan" in c.state.config_records for c in grid.contexts.values())


def test_a_branch_that_cannot_run_dp_answers_with_an_error_reply(federation: Any) -> None:
    grid = federation.grid
    cfg = FederationConfig(**{**CFG.__dict__, "batch_size": 1000})  # more than any branch holds
    with pytest.raises(FederationStopped, match=r"only 0 of 3 branches were admitted \(0 refused"):
        run_federation(grid, cfg, min_nodes=3, dp=DP)
    errors = [r for r in grid.replies if r.has_error()]
    assert len(errors) == 3
    assert all(e.error.code == DP_ERROR_CODE for e in errors)
    assert all("must not exceed the branch's rows" in str(e.error.reason) for e in errors)


def test_over_budget_branch_is_refused_and_the_others_continue(
    federation: Any, tmp_path: Path
) -> None:
    grid, branches = federation.grid, federation.branches
    ledger = _ledger(tmp_path)
    # Branch 000 alone spends most of its budget in an earlier run (same ledger, same files).
    solo = federation.subset([0])
    _run(
        solo,
        ledger,
        "r0",
        cfg=FederationConfig(**{**CFG.__dict__, "min_train_nodes": 1}),
        min_nodes=1,
    )
    spent = _accountants(branches)["000"]
    result = _run(grid, ledger, "r1")
    refusals = ledger.entries(run_id="r1", decision=Decision.REFUSED)
    assert [(e.branch, e.round) for e in refusals] == [("000", 1), ("000", 2)]
    assert all(e.steps == 0 and e.reason and "above the budget" in e.reason for e in refusals)
    assert refusals[0].cumulative_epsilon == ledger.entries(run_id="r0")[-1].cumulative_epsilon
    assert _accountants(branches)["000"] == spent  # the refused branch trained nothing
    assert [len(r.refused) for r in result.rounds] == [1, 1]
    assert all(r.train_replies == 3 and r.privacy["admitted"] == 2 for r in result.rounds)
    admitted = ledger.entries(run_id="r1", decision=Decision.ADMITTED)
    assert sorted({e.branch for e in admitted}) == ["001", "002"]


def test_all_branches_refused_stops_the_run(federation: Any, tmp_path: Path) -> None:
    grid, branches = federation.grid, federation.branches
    ledger = _ledger(tmp_path)
    _run(grid, ledger, "r1")  # spends the whole budget of every branch
    spent = _accountants(branches)
    with pytest.raises(
        FederationStopped,
        match=r"round 1: only 0 of 3 branches were admitted \(3 refused by their privacy budget",
    ):
        run_federation(grid, CFG, min_nodes=3, dp=DP, ledger=ledger, run_id="r2")
    refused = ledger.entries(run_id="r2")
    assert len(refused) == 3 and all(e.decision == Decision.REFUSED for e in refused)
    assert _accountants(branches) == spent
    for name in ("000", "001", "002"):  # nothing lowered, nothing added
        assert ledger.cumulative_epsilon(name, DP.model, DP.purpose) == max(
            e.cumulative_epsilon for e in ledger.entries(run_id="r1", branch=name)
        )


def test_a_reset_accountant_cannot_lower_the_ledger(federation: Any, tmp_path: Path) -> None:
    grid, branches = federation.grid, federation.branches
    ledger = _ledger(tmp_path)
    _run(grid, ledger, "r1")
    next(branches.glob("001/privacy/*.accountant.json")).unlink()  # a branch "forgets"
    with pytest.raises(FederationStopped, match="ledger refused"), pytest.warns(InsecureRNGWarning):
        run_federation(grid, CFG, min_nodes=3, dp=DP, ledger=ledger, run_id="r2")
    assert ledger.cumulative_epsilon("001", DP.model, DP.purpose) == max(
        e.cumulative_epsilon for e in ledger.entries(run_id="r1", branch="001")
    )


def test_dp_with_fedprox_is_refused(federation: Any) -> None:
    grid = federation.grid
    cfg = FederationConfig(schema="mlc", strategy=StrategyName.FEDPROX)
    with pytest.raises(ConfigError, match="fedprox"):
        run_federation(grid, cfg, dp=DP)
