"""The deployed ServerApp (``fedcrm.server.app``) builds branch-level DP from the run config.

The apps run in-process (the real ClientApp behind `InProcessGrid`), with the run config that
``flwr run --run-config`` would hand them; no SuperLink. Either task: the run config names it.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from conftest import TASK_IDS, Federation
from fedcrm import wire as k
from fedcrm.client import HEMod, central_clipping_mod, make_client_app
from fedcrm.compliance import Decision, PrivacyLedger, PrivacyUnit, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import CentralDPConfig, CentralDPMode, DistributedNoise, InsecureRNGWarning
from fedcrm.privacy.keys import init_keys
from fedcrm.server import FederationResult, make_server_app
from fedcrm.settings import to_mapping
from fedcrm.tasks import get_task

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


def _run_config(fed: Federation, mode: str, **extra: object) -> dict[str, Any]:
    return {
        **fed.federation.to_run_config(),
        **to_mapping(fed.settings),
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


@parametrize_tasks
@pytest.mark.parametrize("mode", FLOWER_MODES, ids=str)
def test_deployed_server_app_wraps_the_strategy_from_the_run_config(
    federation: Federation, tmp_path: Path, mode: CentralDPMode
) -> None:
    task = get_task(federation.federation.task)
    run_config = _run_config(federation, str(mode))
    grid = federation.grid
    if mode.client_side:  # the deployed ClientApp's mod, reading the same run config
        app = make_client_app(
            federation.branches, simulation=federation.simulated.handle, mods=[central_clipping_mod]
        )
        grid = replace(federation, app=app).subset([0, 1, 2])
        for context in grid.contexts.values():
            context.run_config = run_config
    result = _serve(grid, run_config, tmp_path / "ledger.db")

    assert result.central_dp is not None
    expected = CentralDPConfig.from_run_config(
        run_config, model=task.model_name, purpose=task.purpose
    )
    assert expected is not None and result.central_dp["description"] == expected.describe()
    assert result.central_dp["epsilon"] == pytest.approx(expected.plan(2).planned_epsilon)
    assert not result.rejections  # client-side: every branch clipped its own update
    train = [m for m in grid.sent if m.metadata.message_type.startswith(MessageType.TRAIN)]
    assert len(train) == 6
    for msg in train:  # Flower's client-side wrappers send the norm for the branches to clip to
        assert (k.KEY_CLIPPING_NORM in msg.content.config_records[k.CONFIG]) is mode.client_side
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db"), migrate=False))
    rows = [e for e in ledger.entries(run_id="deployed") if e.privacy_unit is PrivacyUnit.BRANCH]
    assert [e.round for e in rows] == [1, 2]
    assert all(e.branch == "federation" and e.decision is Decision.ADMITTED for e in rows)
    assert {e.model for e in rows} == {task.model_name}  # the run's task names the budget
    assert rows[-1].cumulative_epsilon == pytest.approx(result.central_dp["epsilon"])


@parametrize_tasks
@pytest.mark.filterwarnings(f"ignore::{InsecureRNGWarning.__module__}.InsecureRNGWarning")
def test_deployed_server_app_runs_distributed_dp_under_he(
    federation: Federation, tmp_path: Path
) -> None:
    """Each branch clips and noises inside its HE mod; the server accounts the released sums."""
    keys = init_keys(tmp_path / "keys")
    run_config = _run_config(
        federation,
        "distributed",
        **{
            "aggregation-mode": "he",
            "he-public-context": str(keys.public_path),
            "he-checkpoint-dir": str(tmp_path / "checkpoints"),
            "central-dp-min-honest-branches": 3,
        },
    )
    announced: list[DistributedNoise | None] = []

    def note(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN:  # what the HE mod will read
            announced.append(DistributedNoise.from_fields(msg.content.config_records[k.HE_RECORD]))
        return call_next(msg, context)

    mods = [note, HEMod(tmp_path / "keys")]
    app = make_client_app(federation.branches, simulation=federation.simulated.handle, mods=mods)
    grid = replace(federation, app=app).subset([0, 1, 2])
    result = _serve(grid, run_config, tmp_path / "ledger.db")

    assert (
        result.central_dp is not None and "distributed under HE" in result.central_dp["description"]
    )
    assert not result.rejections and all(r.train_replies == 3 for r in result.rounds)
    assert len(announced) == 6  # the round's HE record tells each branch z, C and K_min
    assert all(n is not None and (n.noise_multiplier, n.min_honest) == (1.0, 3) for n in announced)
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db"), migrate=False))
    rows = [e for e in ledger.entries(run_id="deployed") if e.privacy_unit is PrivacyUnit.BRANCH]
    assert [e.round for e in rows] == [1, 2]
    assert rows[-1].cumulative_epsilon == pytest.approx(result.central_dp["epsilon"])
    assert sorted((tmp_path / "checkpoints").iterdir())  # the server kept ciphertext only


@parametrize_tasks
def test_deployed_server_app_without_central_dp_keys_wraps_nothing(
    federation: Federation, tmp_path: Path
) -> None:
    run_config = {**federation.federation.to_run_config(), **to_mapping(federation.settings)}
    result = _serve(federation.grid, run_config, tmp_path / "ledger.db")
    assert result.central_dp is None
    assert not (tmp_path / "ledger.db").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"aggregation-mode": "he"}, "central DP on HE ciphertexts"),
        ({"central-dp-delta": 0.0}, "0 < delta < 1"),
        (
            {"central-dp-mode": "distributed", "aggregation-mode": "he"},
            "needs he-public-context",
        ),
        ({"central-dp-mode": "distributed"}, "distributed DP without HE"),
    ],
    ids=["he", "delta", "distributed-without-keys", "distributed-plain"],
)
def test_deployed_server_app_refuses_a_bad_run_config_before_any_round(
    federation: Federation, tmp_path: Path, extra: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        _serve(federation.grid, _run_config(federation, "client-fixed", **extra), tmp_path / "x.db")
    assert not federation.grid.sent
