"""The deployed ServerApp (``fedcrm.server.app``) builds branch-level DP from the run config.

The apps run in-process (the real ClientApp behind `InProcessGrid`), with the run config that
``flwr run --run-config`` would hand them; no SuperLink.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, MessageType, RecordDict

from fedcrm import constants as k
from fedcrm.client.app import make_client_app
from fedcrm.client.central_dp_mod import central_clipping_mod
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.branch_accounting import CentralDPConfig, CentralDPMode
from fedcrm.server.app import make_server_app
from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import FederationResult

CFG = FederationConfig(
    schema="mlc", num_rounds=2, lr=0.1, batch_size=32, hidden_layers="8", round_timeout=5
)


def _run_config(mode: str, **extra: object) -> dict[str, Any]:
    return {
        **CFG.to_run_config(),
        "central-dp-mode": mode,
        "central-dp-noise-multiplier": 1.0,
        "central-dp-clipping-norm": 0.1,
        **extra,
    }


def _serve(grid: Any, run_config: dict[str, Any], ledger: Path) -> FederationResult:
    results: list[FederationResult] = []
    app = make_server_app(
        results=results, min_nodes=3, ledger_url=sqlite_url(ledger), run_id="deployed"
    )
    app(
        grid,
        Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
    )
    assert len(results) == 1
    return results[0]


FLOWER_MODES = [m for m in CentralDPMode if m is not CentralDPMode.DISTRIBUTED]


@pytest.mark.parametrize("mode", FLOWER_MODES, ids=str)
def test_deployed_server_app_wraps_the_strategy_from_the_run_config(
    federation: Any, tmp_path: Path, mode: CentralDPMode
) -> None:
    run_config = _run_config(str(mode))
    grid = federation.grid
    if mode.client_side:  # the deployed ClientApp's mod, reading the same run config
        app = make_client_app(federation.branches, mods=[central_clipping_mod])
        grid = replace(federation, app=app).subset([0, 1, 2])
        for context in grid.contexts.values():
            context.run_config = run_config
    result = _serve(grid, run_config, tmp_path / "ledger.db")

    assert result.central_dp is not None
    expected = CentralDPConfig.from_run_config(run_config)
    assert expected is not None and result.central_dp["description"] == expected.describe()
    assert result.central_dp["epsilon"] == pytest.approx(expected.plan(2).planned_epsilon)
    assert not result.rejections  # client-side: every branch clipped its own update
    train = [m for m in grid.sent if m.metadata.message_type.startswith(MessageType.TRAIN)]
    assert len(train) == 6
    for msg in train:  # Flower's client-side wrappers send the norm for the branches to clip to
        assert ("clipping_norm" in msg.content.config_records[k.CONFIG]) is mode.client_side
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db"), migrate=False))
    rows = [e for e in ledger.entries(run_id="deployed") if e.privacy_unit is PrivacyUnit.BRANCH]
    assert [e.round for e in rows] == [1, 2]
    assert all(e.branch == "federation" and e.decision is Decision.ADMITTED for e in rows)
    assert rows[-1].cumulative_epsilon == pytest.approx(result.central_dp["epsilon"])


def test_deployed_server_app_without_central_dp_keys_wraps_nothing(
    federation: Any, tmp_path: Path
) -> None:
    result = _serve(federation.grid, CFG.to_run_config(), tmp_path / "ledger.db")
    assert result.central_dp is None
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"aggregation-mode": "he"}, "central DP on HE ciphertexts"),
        ({"central-dp-delta": 0.0}, "0 < delta < 1"),
        (
            {"central-dp-mode": "distributed", "aggregation-mode": "he"},
            "'distributed' is not supported by the deployed ServerApp",
        ),
    ],
    ids=["he", "delta", "distributed"],
)
def test_deployed_server_app_refuses_a_bad_run_config_before_any_round(
    federation: Any, tmp_path: Path, extra: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _serve(federation.grid, _run_config("client-fixed", **extra), tmp_path / "ledger.db")
    assert not federation.grid.sent
