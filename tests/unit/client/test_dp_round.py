"""A branch's budget-checked DP-SGD round, for every task: plan, check, train, account, persist."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TASK_IDS, Federation
from fedcrm.client import dp_round
from fedcrm.client.source import resolve_source
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import BranchAccountant, DPSGDConfig, InsecureRNGWarning
from fedcrm.privacy.dp import AccountantStateError
from fedcrm.tasks import RoundContext, Task, get_task
from fedcrm.tasks.churn.branch import ChurnData

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


@dataclass
class Branch:
    """One branch's task, data, settings and the global model, outside any ClientApp."""

    task: Task[Any, Any]
    data: Any
    settings: Any
    arrays: dict[str, np.ndarray]
    fed: Federation

    def ctx(self, state: RecordDict | None = None) -> RoundContext:
        return RoundContext(
            server_round=1,
            seed=1,
            run_seed=0,
            config=self.fed.grid.contexts[1].run_config,
            state=state if state is not None else RecordDict(),
            folder=self.fed.branches / "000",
        )

    def dp(self, **changes: Any) -> DPSGDConfig:
        values = {
            "target_epsilon": 3.0,
            "model": self.task.model_name,
            "purpose": self.task.purpose,
        }
        return DPSGDConfig(**{**values, **changes})


@pytest.fixture
def branch(federation: Federation) -> Branch:
    task = get_task(federation.federation.task)
    context = federation.grid.contexts[1]
    source = resolve_source(context, federation.branches, federation.simulated.handle)
    data = task.load(source, federation.settings, seed=federation.federation.seed)
    # What every message carries: the statistics combined from this branch alone (the scaler).
    statistics = MetricRecord(task.statistics(data, federation.settings))
    context.run_config = task.combine_statistics(federation.settings, [statistics])
    arrays = task.initial_arrays(federation.settings, seed=0)
    return Branch(task, data, federation.settings, arrays, federation)


def _where(tmp_path: Path, key: bytes | None = None) -> dp_round.BranchPrivacy:
    return dp_round.BranchPrivacy(tmp_path / "privacy", "b1", key)


def _round(
    b: Branch,
    where: dp_round.BranchPrivacy,
    dp: DPSGDConfig,
    *,
    rounds: int = 3,
    state: RecordDict | None = None,
) -> dp_round.DPRoundOutcome:
    with pytest.warns(InsecureRNGWarning):
        return dp_round.private_round(
            b.task,
            b.data,
            b.arrays,
            b.settings,
            b.ctx(state),
            dp=dp,
            rounds=rounds,
            where=where,
            run_id="r1",
        )


@parametrize_tasks
def test_admitted_round_trains_and_persists_the_spend(branch: Branch, tmp_path: Path) -> None:
    dp = branch.dp()
    where = _where(tmp_path)
    out = _round(branch, where, dp)
    report = out.report
    assert report.admitted and out.update is not None
    assert out.update.arrays.keys() == branch.arrays.keys()
    name = next(iter(branch.arrays))
    assert not np.array_equal(out.update.arrays[name], branch.arrays[name])
    rows = branch.task.private_rows(branch.data, branch.settings)
    assert report.delta == pytest.approx(1 / (10 * rows.rows))  # default: 1/(10n), n DP-SGD rows
    assert report.privacy_unit == "customer" == rows.unit
    assert rows.note in report.reason
    assert 0 < report.epsilon_round == report.epsilon <= dp.budget
    assert report.steps == report.planned_steps > 0
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    stored = BranchAccountant.load(path)
    assert stored.total_steps == report.steps
    assert stored.epsilon(report.delta) == pytest.approx(report.epsilon, abs=1e-12)
    (spend,) = stored.spends  # reserved before training, released with the reply
    assert (spend.spend_id, spend.run_id, spend.round, spend.status) == (
        report.spend_id,
        "r1",
        1,
        "released",
    )


def test_repeated_customers_make_the_churn_unit_record(branch: Branch) -> None:
    split = branch.data.split
    train = split.train.copy()
    train[branch.data.schema.id_column] = [f"p_{i // 2}" for i in range(len(train))]
    repeated = ChurnData(type(split)(train, split.val, split.test), branch.data.schema)
    assert branch.task.private_rows(repeated, branch.settings).unit == "record"


@parametrize_tasks
def test_refused_round_changes_nothing(branch: Branch, tmp_path: Path) -> None:
    dp = branch.dp()
    where = _where(tmp_path)
    # Plan for one round, then keep asking: the second round would pass the budget.
    first = _round(branch, where, dp, rounds=1)
    assert first.report.admitted
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    before = path.read_bytes()
    out = dp_round.private_round(  # refused before make_private: no InsecureRNGWarning
        branch.task,
        branch.data,
        branch.arrays,
        branch.settings,
        branch.ctx(),
        dp=dp,
        rounds=1,
        where=where,
        run_id="r1",
    )
    report = out.report
    assert report.decision == "refused" and out.update is None
    assert report.steps == 0 and report.epsilon == report.epsilon_before == first.report.epsilon
    assert report.epsilon_round > 0  # what the round would have cost
    assert "above the budget" in report.reason
    assert path.read_bytes() == before  # accountant untouched


@parametrize_tasks
def test_the_plan_is_made_once_and_cached_in_the_node_state(branch: Branch, tmp_path: Path) -> None:
    state = RecordDict()
    dp = branch.dp(max_epsilon=50.0)
    first = _round(branch, _where(tmp_path), dp, state=state)
    assert "dp-plan" in state.config_records
    cached = dict(state.config_records["dp-plan"])
    second = _round(branch, _where(tmp_path), dp, state=state)
    assert dict(state.config_records["dp-plan"]) == cached
    assert second.report.noise_multiplier == first.report.noise_multiplier


@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rounds=st.integers(min_value=2, max_value=4), restart_at=st.integers(min_value=0, max_value=3)
)
def test_cumulative_epsilon_never_decreases_across_rounds_and_restarts(
    tmp_path_factory: pytest.TempPathFactory, branch: Branch, rounds: int, restart_at: int
) -> None:
    where = _where(tmp_path_factory.mktemp("branch"))
    dp = branch.dp(target_epsilon=4.0, noise_multiplier=1.5, max_epsilon=50.0)
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    seen = [0.0]
    n = branch.task.private_rows(branch.data, branch.settings).rows
    for index in range(rounds):
        if index == restart_at:  # a restart: nothing but the JSON file survives
            reloaded = BranchAccountant.load(path) if path.exists() else BranchAccountant()
            assert reloaded.epsilon(1 / (10 * n)) == pytest.approx(seen[-1], abs=1e-12)
        report = _round(branch, where, dp, rounds=rounds).report
        assert report.admitted
        assert report.epsilon_before == pytest.approx(seen[-1], abs=1e-12)
        assert report.epsilon > seen[-1]
        seen.append(report.epsilon)


@parametrize_tasks
def test_corrupted_accountant_is_an_error_and_is_not_overwritten(
    branch: Branch, tmp_path: Path
) -> None:
    dp = branch.dp()
    where = _where(tmp_path)
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "fedcrm/branch-accountant", "history": []}')
    with pytest.raises(AccountantStateError, match="integrity"):
        dp_round.private_round(
            branch.task,
            branch.data,
            branch.arrays,
            branch.settings,
            branch.ctx(),
            dp=dp,
            rounds=2,
            where=where,
            run_id="r1",
        )
    assert path.read_text() == '{"format": "fedcrm/branch-accountant", "history": []}'


@parametrize_tasks
def test_keyed_accountant_needs_the_branch_key(branch: Branch, tmp_path: Path) -> None:
    key = dp_round.accountant_key(b"k" * 32)
    assert key is not None and key != b"k" * 32  # derived, never the key itself
    dp = branch.dp()
    _round(branch, _where(tmp_path, key), dp)
    path = dp_round.accountant_path(tmp_path / "privacy", model=dp.model, purpose=dp.purpose)
    assert BranchAccountant.load(path, key=key).total_steps > 0
    with pytest.raises(AccountantStateError, match="pass the branch key"):
        BranchAccountant.load(path)


def test_budgets_are_kept_per_model_and_purpose(tmp_path: Path) -> None:
    a = dp_round.accountant_path(tmp_path, model="churn", purpose="churn-model-training")
    b = dp_round.accountant_path(tmp_path, model="churn", purpose="retention/../offers")
    c = dp_round.accountant_path(tmp_path, model="recommender", purpose="recommendation-training")
    assert len({a, b, c}) == 3 and b.parent == tmp_path


def test_the_privacy_filter_leaves_out_the_customers_whose_own_budget_is_spent(
    branch: Branch, tmp_path: Path
) -> None:
    """A third of the customers trained twice, the others once: that third is filtered.

    Churn (120 training customers, batches of 32): without the third the others are sampled
    more often, and still stay within the budget. (The small synthetic recommendation branch
    samples nearly all of its 18 customers at every step, so no one's round costs less.)
    """
    where = _where(tmp_path)
    dp = branch.dp(noise_multiplier=2.0, max_epsilon=50.0)
    customers = list(dict.fromkeys(branch.data.subjects()["train"]))
    twice = set(customers[: len(customers) // 3])
    _round(branch, where, dp)
    half = Branch(branch.task, branch.data.keep(twice), branch.settings, branch.arrays, branch.fed)
    _round(half, where, dp)
    ledger = where.customers()
    spent = {t.customer: t for t in ledger.totals()}
    assert {c for c, t in spent.items() if t.spends == 2} == twice
    # A customer budget just above what the twice-trained customers have spent.
    budget = max(spent[c].cumulative_epsilon for c in twice) * 1.0001
    filtered = branch.dp(noise_multiplier=2.0, max_epsilon=50.0, customer_budget=budget)
    over = dp_round.over_customer_budget(
        branch.task,
        branch.data,
        branch.settings,
        branch.ctx(),
        dp=filtered,
        rounds=3,
        where=where,
    )
    assert over == twice  # the others stay within it, even sampled more often without them
    assert len(ledger.totals()) == len(customers)  # nothing recorded by the filter
    with pytest.raises(ConfigError, match="customer-budget"):
        dp_round.over_customer_budget(
            branch.task, branch.data, branch.settings, branch.ctx(), dp=dp, rounds=3, where=where
        )


@parametrize_tasks
def test_an_accountant_reset_behind_its_customer_ledger_is_refused(
    branch: Branch, tmp_path: Path
) -> None:
    where = _where(tmp_path)
    dp = branch.dp(max_epsilon=50.0)
    _round(branch, where, dp)
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    path.unlink()  # the per-customer ledger still remembers the spend
    with pytest.raises(AccountantStateError, match="reset or rolled back"):
        dp_round.private_round(
            branch.task,
            branch.data,
            branch.arrays,
            branch.settings,
            branch.ctx(),
            dp=dp,
            rounds=3,
            where=where,
            run_id="r2",
        )
