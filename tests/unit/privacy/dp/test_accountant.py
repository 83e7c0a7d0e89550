"""The branch's persistent accountant: growth only, integrity, atomic saves, old files."""

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.dp import (
    AccountantConflict,
    AccountantStateError,
    AccountingError,
    AccountingEvent,
    BranchAccountant,
    recompute_check,
)

DELTA = 1e-5
KEY = b"k" * 32

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


# Written by fedcrm before privacy/ was split into privacy/dp/ (fedcrm.privacy.accounting):
# the file format (keys, canonical JSON, HMAC) must keep loading unchanged.
OLD_FILE = """{
  "accountant": "rdp",
  "format": "fedcrm/branch-accountant",
  "history": [
    {
      "noise_multiplier": 1.1,
      "sample_rate": 0.0128,
      "steps": 78
    },
    {
      "noise_multiplier": 0.7,
      "sample_rate": 0.05,
      "steps": 20
    }
  ],
  "integrity": {
    "algorithm": "hmac-sha256",
    "digest": "2d8a8fa51870b9dfaa1cc635315c7be2b43b4c029487e729d9810fd2f7ae261a"
  },
  "mechanism": "poisson-subsampled-gaussian",
  "version": 1
}"""
OLD_EPSILON = 5.692815103859297  # its ε at δ = 1e-5, computed by that version


def test_a_version_1_file_loads_and_is_rewritten_as_version_2_with_the_same_epsilon(
    tmp_path: Path,
) -> None:
    accountant = BranchAccountant.from_json(OLD_FILE, key=KEY)
    assert accountant.history == (
        AccountingEvent(1.1, 0.0128, 78),
        AccountingEvent(0.7, 0.05, 20),
    )
    assert accountant.epsilon(DELTA) == OLD_EPSILON
    assert all(s.spend_id is None and s.status == "released" for s in accountant.spends)
    path = tmp_path / "old.json"
    path.write_text(OLD_FILE)
    accountant.reserve(AccountingEvent(1.0, 0.01, 5), run_id="r", server_round=1)
    accountant.save(path, key=KEY)  # the old history is a prefix of the new one
    again = BranchAccountant.load(path, key=KEY)
    assert json.loads(path.read_text())["version"] == 2
    assert again.history[:2] == accountant.history[:2] and len(again.spends) == 3


def test_a_reserved_spend_counts_at_once_and_only_moves_to_released(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    accountant = BranchAccountant()
    spend = accountant.reserve(AccountingEvent(1.0, 0.02, 50), run_id="r1", server_round=3)
    assert (spend.run_id, spend.round, spend.status) == ("r1", 3, "reserved")
    assert accountant.epsilon(DELTA) > 0  # charged before any training
    accountant.save(path)
    reserved = BranchAccountant.load(path)
    accountant.release(spend.spend_id or "")
    accountant.save(path)  # reserved -> released is allowed
    assert BranchAccountant.load(path).spends[0].status == "released"
    with pytest.raises(AccountantConflict):
        reserved.save(path)  # released -> reserved is not (a stale copy)
    with pytest.raises(AccountingError, match="no spend"):
        accountant.release("unknown")


def test_absorb_adds_only_unknown_spends_and_never_lowers_epsilon() -> None:
    source = BranchAccountant()
    spends = [
        source.reserve(AccountingEvent(1.0, 0.02, 50), run_id="r1", server_round=r) for r in (1, 2)
    ]
    target = BranchAccountant(spends=[spends[0]])
    before = target.epsilon(DELTA)
    assert target.absorb(spends) == [spends[1]]
    assert target.absorb(spends) == []
    assert target.epsilon(DELTA) > before
    assert target.epsilon(DELTA) == pytest.approx(source.epsilon(DELTA))
    with pytest.raises(AccountingError, match="unique"):
        BranchAccountant(spends=[spends[0], spends[0]])
