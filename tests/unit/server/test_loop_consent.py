"""The consent gate in the round loop, for every task: manifests, refusals, withdrawal, audit.

An in-process federation (no Ray) over three small simulated branches whose consent registry
is one compliance store, as in a simulation. Branch 0 has 5 customers who refused and 5 never
asked; branch 2's data is collected for the other task's purpose only, so it refuses the run.
"""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import TASK_IDS, Federation, build_federation, small_experiment
from fedcrm import wire as k
from fedcrm.client import accountant_key
from fedcrm.compliance import (
    ConsentRegistry,
    EventType,
    Notice,
    PrivacyLedger,
    Purpose,
    open_store,
    sqlite_url,
)
from fedcrm.compliance.audit import AuditLog
from fedcrm.compliance.consent import CSV_REQUIRED_COLUMNS
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import ManifestArchive, RefusalCode
from fedcrm.privacy import DPSGDConfig, InsecureRNGWarning
from fedcrm.server import FederationConfig, FederationStopped, RoundRecord, RunAudit, run_federation
from fedcrm.tasks import get_task

NOTICE = Notice.from_text("crm-notice", "2026-01", "notice text")
GIVEN_AT = datetime.now(UTC) - timedelta(days=10)
pytestmark = pytest.mark.parametrize("task_name", TASK_IDS)


def _purposes(task_name: str) -> tuple[Purpose, Purpose]:
    """The task's purpose and the other task's (what branch 2 collects for)."""
    mine = Purpose(get_task(task_name).purpose)
    others = (Purpose.CHURN_MODEL_TRAINING, Purpose.RECOMMENDATION_TRAINING)
    return mine, next(p for p in others if p != mine)


@pytest.fixture
def gated(task_name: str, tmp_path: Path, task_identity: None, one_thread: None) -> dict[str, Any]:
    """Three branches gated on one consent store; branch 2 collects for the other purpose."""
    url = sqlite_url(tmp_path / "compliance.db")
    raw = small_experiment(task_name, federation={"num-rounds": 3})
    fed = build_federation(tmp_path, raw, consent_db=url)
    registry = ConsentRegistry(open_store(url))
    mine, other = _purposes(task_name)
    experiment = get_task(task_name).experiment
    customers = {}
    for branch in fed.simulated.branches:
        ids = experiment.customers(fed.simulated, branch, fed.settings, seed=fed.federation.seed)
        customers[branch.partition_id] = ids
        purpose = other if branch.partition_id == 2 else mine
        lines = [",".join(CSV_REQUIRED_COLUMNS)]
        for i, customer in enumerate(ids):
            status = "refused" if branch.partition_id == 0 and i < 5 else "given"
            if not (branch.partition_id == 0 and 5 <= i < 10):
                lines.append(
                    f"{customer},{purpose.value},{status},consent,{GIVEN_AT.isoformat()},"
                    f"{NOTICE.notice_id},{NOTICE.version},{NOTICE.sha256},in-branch"
                )
        registry.import_csv(branch=branch.name, source="\n".join(lines) + "\n", actor="t")
    fed.grid.contexts[3].node_config[k.NODE_PURPOSES] = other.value
    return {
        "url": url,
        "registry": registry,
        "fed": fed,
        "customers": customers,
        "names": [b.name for b in fed.simulated.branches],
        "purpose": mine,
    }


def test_withdrawal_between_rounds_and_purpose_refusal(gated: dict[str, Any]) -> None:
    registry, fed, names = gated["registry"], gated["fed"], gated["names"]
    trained = get_task(fed.federation.task).experiment.subjects(
        fed.simulated, fed.simulated.branches[0], fed.settings, seed=fed.federation.seed
    )["train"]
    leaver = next(c for c in trained if c not in gated["customers"][0][:10])
    audit = RunAudit(gated["url"], "run-1")

    def withdraw_after_first(record: RoundRecord) -> None:
        if record.round == 1:
            registry.withdraw(branch=names[0], subject=leaver, channel="web", actor="customer")

    result = run_federation(
        fed.grid,
        fed.federation,
        fed.settings,
        min_nodes=3,
        run_id="run-1",
        purpose=gated["purpose"],
        audit=audit,
        on_round=withdraw_after_first,
    )
    assert len(result.rounds) == 3
    # Branch 2 refused the statistics query (round 0) and every round with the structured
    # reason, and the run went on.
    assert [(e.round, e.refusal.branch, e.refusal.code) for e in result.consent_refusals] == [
        (r, names[2], RefusalCode.PURPOSE_NOT_COLLECTED) for r in (0, 1, 2, 3)
    ]
    assert all(
        r.refused == [r.refused[0]] and f"{names[2]}: consent" in r.refused[0]
        for r in result.rounds
    )
    assert [r.consent["admitted"] for r in result.rounds] == [2.0, 2.0, 2.0]

    ours = {(e.round, e.manifest.branch): e.manifest for e in result.manifests}
    assert set(ours) == {(r, b) for r in (1, 2, 3) for b in names[:2]}
    first, second = ours[(1, names[0])], ours[(2, names[0])]
    assert first.rows_before - first.rows_after == sum(first.excluded.values()) > 0
    assert set(first.excluded) <= {"refused", "no-consent"}
    assert second.rows_after == first.rows_after - 1 and first.root != second.root
    assert second.excluded.get("withdrawn") == 1
    assert second.snapshot_version > first.snapshot_version
    assert ours[(1, names[1])].root == ours[(3, names[1])].root  # same customers, same root

    # The branch proves the leaver was in round 1 and not in rounds 2 and 3.
    store = LineageStore(open_store(gated["url"], migrate=False))
    archive = ManifestArchive(fed.branches / "000" / "consent")
    lineage = customer_lineage(leaver, archive, branch=names[0], store=store, run_id="run-1")
    assert [(c.membership.round, c.membership.included) for c in lineage] == [
        (1, True),
        (2, False),
        (3, False),
    ]
    assert all(c.root_matches for c in lineage)
    assert lineage[0].membership.proof and lineage[0].membership.tree_size == first.leaves

    # Audit trail: configuration, 6 manifests, 4 refusals; it verifies; history kept.
    log = AuditLog(open_store(gated["url"], migrate=False))
    run_events = [e for e in log.entries() if e.subject is None]
    types = [e.event_type for e in run_events]
    assert types.count(EventType.CONFIGURATION_CHANGE) == 1
    assert types.count(EventType.ROUND_MANIFEST) == 6
    assert types.count(EventType.REFUSAL) == 4
    refusal = next(e for e in run_events if e.event_type == EventType.REFUSAL)
    body = log.read_body(refusal.index)
    assert (body["round"], body["code"]) == (0, "purpose-not-collected")
    folder = fed.branches.parent
    report = audit.seal(folder / "audit-key.pem", folder / "audit-log.jsonl")
    assert report.ok and report.keys_trusted, report.issues
    events = [h.event.value for h in registry.record(branch=names[0], subject=leaver).history]
    assert events == ["given", "withdrawn"]
    # Salts stay on the branch, readable by its owner only.
    assert (archive.folder / "salts.json").stat().st_mode & 0o777 == 0o600


def test_refusals_below_min_train_nodes_stop_the_run(gated: dict[str, Any]) -> None:
    fed: Federation = gated["fed"]
    cfg = FederationConfig(**{**fed.federation.__dict__, "min_train_nodes": 3, "num_rounds": 1})
    with pytest.raises(FederationStopped, match="refused the run's purpose") as stopped:
        run_federation(
            fed.grid, cfg, fed.settings, min_nodes=3, run_id="run-2", purpose=gated["purpose"]
        )
    assert stopped.value.result.consent_refusals[0].refusal.branch == gated["names"][2]


def test_every_branch_refusing_the_statistics_query_stops_the_run(gated: dict[str, Any]) -> None:
    """Marketing profiling: nobody consented, so every branch refuses with no-valid-consent.

    The refusals come at the statistics query, before round 1: recorded and audit-logged like
    a round's, and the run stops naming every branch's reason.
    """
    fed: Federation = gated["fed"]
    cfg = FederationConfig(**{**fed.federation.__dict__, "num_rounds": 1, "min_train_nodes": 1})
    for context in fed.grid.contexts.values():
        context.node_config.pop(k.NODE_PURPOSES, None)
    audit = RunAudit(gated["url"], "run-3")
    with pytest.raises(FederationStopped, match="no branch returned statistics") as stopped:
        run_federation(
            fed.grid,
            cfg,
            fed.settings,
            min_nodes=3,
            run_id="run-3",
            purpose=Purpose.MARKETING_PROFILING,
            audit=audit,
        )
    message = str(stopped.value)
    assert "3 of 3 refused the run's purpose" in message
    for branch in gated["names"]:
        assert f"{branch}: consent: no training row of this branch has valid consent" in message
    refusals = stopped.value.result.consent_refusals
    assert [(e.round, e.refusal.code) for e in refusals] == [(0, RefusalCode.NO_VALID_CONSENT)] * 3
    assert stopped.value.result.rounds == []
    log = AuditLog(open_store(gated["url"], migrate=False))
    logged = [e for e in log.entries() if e.event_type == EventType.REFUSAL]
    assert sorted(log.read_body(e.index)["branch"] for e in logged) == sorted(gated["names"])
    assert {log.read_body(e.index)["round"] for e in logged} == {0}


def test_dp_run_with_gate_logs_ledger_entries(gated: dict[str, Any], tmp_path: Path) -> None:
    """Consent first, then the privacy budget: both decisions end up in the audit log."""
    fed: Federation = gated["fed"]
    task = get_task(fed.federation.task)
    cfg = FederationConfig(**{**fed.federation.__dict__, "num_rounds": 1})
    ledger = PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db")))
    audit = RunAudit(gated["url"], "run-dp")
    dp = DPSGDConfig(
        target_epsilon=3.0, noise_multiplier=2.0, model=task.model_name, purpose=task.purpose
    )
    with pytest.warns(InsecureRNGWarning):
        result = run_federation(
            fed.grid,
            cfg,
            fed.settings,
            min_nodes=3,
            run_id="run-dp",
            purpose=gated["purpose"],
            audit=audit,
            dp=dp,
            ledger=ledger,
        )
    names = gated["names"]
    assert sorted(e.report.branch for e in result.privacy) == sorted(names[:2])
    assert [e.round for e in result.consent_refusals] == [0, 1]
    log = AuditLog(open_store(gated["url"], migrate=False))
    mine = [e for e in log.entries() if e.subject is None]
    ledger_events = [e for e in mine if e.event_type == EventType.LEDGER_ENTRY]
    assert {log.read_body(e.index)["branch"] for e in ledger_events} == set(names[:2])
    # The DP plan used the gated count: delta is 1/(10n) of the consented training customers.
    manifests = {e.manifest.branch: e.manifest for e in result.manifests}
    entries = {e.branch: e for e in ledger.entries(run_id="run-dp")}
    assert entries[names[0]].delta == pytest.approx(1 / (10 * manifests[names[0]].rows_after))


def test_a_customer_who_withdraws_stops_spending_their_own_epsilon(
    gated: dict[str, Any], tmp_path: Path
) -> None:
    """Individual accounting: a customer's ε counts only the rounds that included them."""
    from typer.testing import CliRunner

    from fedcrm.cli import app
    from fedcrm.client import CUSTOMER_LEDGER
    from fedcrm.compliance import CustomerLedger
    from fedcrm.privacy import BranchAccountant

    registry, fed, names = gated["registry"], gated["fed"], gated["names"]
    task = get_task(fed.federation.task)
    trained = task.experiment.subjects(
        fed.simulated, fed.simulated.branches[0], fed.settings, seed=fed.federation.seed
    )["train"]
    leaver = next(c for c in trained if c not in gated["customers"][0][:10])
    stayer = next(c for c in trained if c not in gated["customers"][0][:10] and c != leaver)
    dp = DPSGDConfig(
        target_epsilon=3.0,
        noise_multiplier=2.0,
        max_epsilon=50.0,
        model=task.model_name,
        purpose=task.purpose,
    )

    def withdraw_after_first(record: RoundRecord) -> None:
        if record.round == 1:
            registry.withdraw(branch=names[0], subject=leaver, channel="web", actor="customer")

    with pytest.warns(InsecureRNGWarning):
        run_federation(
            fed.grid,
            fed.federation,
            fed.settings,
            min_nodes=3,
            run_id="run-c",
            purpose=gated["purpose"],
            dp=dp,
            ledger=PrivacyLedger(open_store(sqlite_url(tmp_path / "ledger.db"))),
            on_round=withdraw_after_first,
        )
    privacy = fed.branches / "000" / "privacy"
    customers = CustomerLedger(open_store(sqlite_url(privacy / CUSTOMER_LEDGER)))
    (left,) = customers.customer(leaver)
    (stayed,) = customers.customer(stayer)
    assert (left.spends, stayed.spends) == (1, 3)
    assert 0 < left.cumulative_epsilon < stayed.cumulative_epsilon
    accountant = BranchAccountant.load(
        next(privacy.glob("*.accountant.json")),
        key=accountant_key((fed.branches / "000" / "hmac.key").read_bytes()),
    )
    assert stayed.cumulative_epsilon == pytest.approx(accountant.epsilon(stayed.delta))
    assert left.cumulative_epsilon == pytest.approx(
        BranchAccountant(history=accountant.history[:1]).epsilon(left.delta)
    )
    assert customers.customer("p_unknown") == []
    shown = CliRunner().invoke(
        app,
        ["ledger", "show", "--customer", leaver, "--db", str(fed.branches)],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    assert f"{left.cumulative_epsilon:.4f}" in shown.output and names[0] in shown.output
