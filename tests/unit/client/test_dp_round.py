"""A branch's budget-checked DP-SGD round: plan, check, train, account, persist."""

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcrm.client import dp_round
from fedcrm.data.check import coerce_frame
from fedcrm.data.preprocess import Scaler, local_moments
from fedcrm.data.schema import MLC
from fedcrm.data.split import Split, split_frame
from fedcrm.data.synthetic import synthetic_export
from fedcrm.models.churn import TrainSettings, build_model
from fedcrm.privacy.accounting import AccountantStateError, BranchAccountant
from fedcrm.privacy.dp_sgd import InsecureRNGWarning
from fedcrm.privacy.federated import FederatedDPConfig

SETTINGS = TrainSettings(epochs=1, batch_size=32, lr=0.1, optimizer="sgd", momentum=0.9)


def _split(rows: int = 300, *, repeat_ids: bool = False) -> Split:
    frame = coerce_frame(synthetic_export(MLC, rows, seed=3), MLC)
    frame[MLC.id_column] = [f"p_{i // 2 if repeat_ids else i}" for i in range(len(frame))]
    return split_frame(frame, label=MLC.label, seed=3)


@pytest.fixture(scope="module")
def split() -> Split:
    return _split()


@pytest.fixture(scope="module")
def scaler(split: Split) -> Scaler:
    return Scaler.from_moments(local_moments(split.train, MLC))


def _state() -> dict[str, torch.Tensor]:
    return build_model(MLC.input_dim, seed=0, hidden=(8,)).state_dict()


def _round(
    split: Split,
    scaler: Scaler,
    where: dp_round.BranchDPContext,
    dp: FederatedDPConfig,
    *,
    rounds: int = 3,
) -> dp_round.DPRoundOutcome:
    config, plan = dp_round.plan_branch(
        dp, num_rows=len(split.train), settings=SETTINGS, rounds=rounds
    )
    with pytest.warns(InsecureRNGWarning):
        return dp_round.private_round(
            split,
            MLC,
            scaler,
            _state(),
            SETTINGS,
            dp=dp,
            config=config,
            plan=plan,
            where=where,
            seed=0,
        )


def _where(tmp_path: Path, key: bytes | None = None) -> dp_round.BranchDPContext:
    return dp_round.BranchDPContext(tmp_path / "privacy", "b1", key)


def test_admitted_round_trains_and_persists_the_spend(
    tmp_path: Path, split: Split, scaler: Scaler
) -> None:
    dp = FederatedDPConfig(target_epsilon=3.0)
    where = _where(tmp_path)
    out = _round(split, scaler, where, dp)
    report = out.report
    assert report.admitted and out.state_dict is not None
    assert out.state_dict.keys() == _state().keys()
    assert not torch.equal(out.state_dict["net.0.weight"], _state()["net.0.weight"])
    assert report.delta == pytest.approx(1 / len(split.train))  # record-level default: 1/n
    assert report.privacy_unit == "customer"
    assert "record-level DP-SGD is customer-level" in report.reason
    assert 0 < report.epsilon_round == report.epsilon <= dp.budget
    assert report.steps == report.planned_steps > 0
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    stored = BranchAccountant.load(path)
    assert stored.total_steps == report.steps
    assert stored.epsilon(report.delta) == pytest.approx(report.epsilon, abs=1e-12)


def test_repeated_customers_make_the_unit_record(tmp_path: Path, scaler: Scaler) -> None:
    split = _split(repeat_ids=True)
    assert dp_round.privacy_unit_of(split, MLC) == "record"


def test_refused_round_changes_nothing(tmp_path: Path, split: Split, scaler: Scaler) -> None:
    dp = FederatedDPConfig(target_epsilon=3.0)
    where = _where(tmp_path)
    # Plan for one round, then keep asking: the second round would pass the budget.
    first = _round(split, scaler, where, dp, rounds=1)
    assert first.report.admitted
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    before = path.read_bytes()
    config, plan = dp_round.plan_branch(dp, num_rows=len(split.train), settings=SETTINGS, rounds=1)
    out = dp_round.private_round(  # refused before make_private: no InsecureRNGWarning
        split, MLC, scaler, _state(), SETTINGS, dp=dp, config=config, plan=plan, where=where
    )
    report = out.report
    assert report.decision == "refused" and out.state_dict is None
    assert report.steps == 0 and report.epsilon == report.epsilon_before == first.report.epsilon
    assert report.epsilon_round > 0  # what the round would have cost
    assert "above the budget" in report.reason
    assert path.read_bytes() == before  # accountant untouched


@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rounds=st.integers(min_value=2, max_value=4), restart_at=st.integers(min_value=0, max_value=3)
)
def test_cumulative_epsilon_never_decreases_across_rounds_and_restarts(
    tmp_path_factory: pytest.TempPathFactory,
    split: Split,
    scaler: Scaler,
    rounds: int,
    restart_at: int,
) -> None:
    where = _where(tmp_path_factory.mktemp("branch"))
    dp = FederatedDPConfig(target_epsilon=4.0, noise_multiplier=1.5, max_epsilon=50.0)
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    seen = [0.0]
    for index in range(rounds):
        if index == restart_at:  # a restart: nothing but the JSON file survives
            reloaded = BranchAccountant.load(path) if path.exists() else BranchAccountant()
            assert reloaded.epsilon(1 / len(split.train)) == pytest.approx(seen[-1], abs=1e-12)
        report = _round(split, scaler, where, dp, rounds=rounds).report
        assert report.admitted
        assert report.epsilon_before == pytest.approx(seen[-1], abs=1e-12)
        assert report.epsilon > seen[-1]
        seen.append(report.epsilon)


def test_corrupted_accountant_is_an_error_and_is_not_overwritten(
    tmp_path: Path, split: Split, scaler: Scaler
) -> None:
    dp = FederatedDPConfig(target_epsilon=3.0)
    where = _where(tmp_path)
    path = dp_round.accountant_path(where.privacy_dir, model=dp.model, purpose=dp.purpose)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": "fedcrm/branch-accountant", "history": []}')
    config, plan = dp_round.plan_branch(dp, num_rows=len(split.train), settings=SETTINGS, rounds=2)
    with pytest.raises(AccountantStateError, match="integrity"):
        dp_round.private_round(
            split, MLC, scaler, _state(), SETTINGS, dp=dp, config=config, plan=plan, where=where
        )
    assert path.read_text() == '{"format": "fedcrm/branch-accountant", "history": []}'


def test_keyed_accountant_needs_the_branch_key(
    tmp_path: Path, split: Split, scaler: Scaler
) -> None:
    key = dp_round.accountant_key(b"k" * 32)
    assert key is not None and key != b"k" * 32  # derived, never the key itself
    dp = FederatedDPConfig(target_epsilon=3.0)
    _round(split, scaler, _where(tmp_path, key), dp)
    path = dp_round.accountant_path(tmp_path / "privacy", model=dp.model, purpose=dp.purpose)
    assert BranchAccountant.load(path, key=key).total_steps > 0
    with pytest.raises(AccountantStateError, match="pass the branch key"):
        BranchAccountant.load(path)


def test_budgets_are_kept_per_model_and_purpose(tmp_path: Path) -> None:
    a = dp_round.accountant_path(tmp_path, model="churn", purpose="churn-model-training")
    b = dp_round.accountant_path(tmp_path, model="churn", purpose="retention/../offers")
    assert a != b and b.parent == tmp_path
