"""`fedcrm ledger recompute`: a DP run's ledger recomputed by dp-accounting agrees; a forged
row does not."""

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import Federation
from fedcrm.cli import app
from fedcrm.compliance import Decision, PrivacyLedger, open_store, sqlite_url
from fedcrm.privacy import DPSGDConfig
from fedcrm.privacy.dp import parse_event
from fedcrm.server import recompute_ledger, run_federation

pytestmark = pytest.mark.filterwarnings("ignore::fedcrm.privacy.InsecureRNGWarning")


@pytest.fixture
def ledger_db(federation: Federation, tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    dp = DPSGDConfig(target_epsilon=3.0)
    ledger = PrivacyLedger(open_store(sqlite_url(path)))
    run_federation(
        federation.grid, federation.federation, federation.settings, dp=dp, ledger=ledger
    )
    return path


def test_every_row_carries_its_dp_event_and_recomputes_within_one_percent(
    ledger_db: Path,
) -> None:
    entries = PrivacyLedger(open_store(sqlite_url(ledger_db))).entries()
    assert len(entries) == 6
    for entry in entries:
        assert entry.spend_id and entry.dp_event
        event = parse_event(entry.dp_event)
        assert (event.noise_multiplier, event.sample_rate, event.steps) == (
            entry.noise_multiplier,
            entry.sampling_rate,
            entry.steps,
        )
    checks = recompute_ledger(entries)
    assert len(checks) == 6 and not [c for c in checks if c.problem]
    for c in checks:  # Opacus's RDP (recorded) and dp-accounting's RDP: two implementations
        assert c.rdp == pytest.approx(c.entry.cumulative_epsilon, rel=1e-2)
    lasts = [c for c in checks if c.pld is not None]
    assert len(lasts) == 3 and all(c.pld is not None and c.pld <= c.rdp for c in lasts)

    result = CliRunner().invoke(app, ["ledger", "recompute", "--db", str(ledger_db)])
    assert result.exit_code == 0, result.output
    assert "no disagreement above 1 %" in result.output


def test_a_row_whose_epsilon_was_understated_is_flagged(ledger_db: Path) -> None:
    ledger = PrivacyLedger(open_store(sqlite_url(ledger_db)))
    last = ledger.entries()[-1]
    # A third round recorded with the cumulative ε of the second: understated.
    forged = dataclasses.replace(
        last, id=None, recorded_at=None, round=3, spend_id="forged", decision=Decision.ADMITTED
    )
    ledger.append(forged)
    checks = recompute_ledger(ledger.entries())
    (flagged,) = [c for c in checks if c.problem]
    assert flagged.entry.spend_id == "forged" and "recomputed" in (flagged.problem or "")
    result = CliRunner().invoke(app, ["ledger", "recompute", "--db", str(ledger_db)])
    assert result.exit_code == 1
    assert "disagreement" in result.output and "round 3" in result.output
