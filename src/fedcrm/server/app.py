"""The coordinator's Flower ServerApp, for every task (``task`` in the run config).

A simulation hands it typed settings and the wiring it built (with the run's keys); on
Flower's deployment engine it reads everything from the run config (``flwr run
--run-config``) and writes its outputs itself (`fedcrm.server.outputs`).
"""

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.privacy import CentralDPConfig, DPSGDConfig
from fedcrm.privacy.keys import load_public_context
from fedcrm.server.checkpoint import RoundCheckpoints
from fedcrm.server.config import FederationConfig
from fedcrm.server.loop import run_federation
from fedcrm.server.outputs import DEFAULT_OUT_DIR, write_outputs
from fedcrm.server.result import FederationResult, FederationStopped, RoundCallback
from fedcrm.server.run_audit import ComplianceConfig, RunAudit
from fedcrm.server.traffic import MeteredGrid, TrafficMeter
from fedcrm.server.wiring import (
    DEFAULT_CHECKPOINT_DIR,
    KEY_HE_CHECKPOINT_DIR,
    KEY_HE_PUBLIC_CONTEXT,
    AggregationConfig,
    Wiring,
    check_plan,
)
from fedcrm.strategies.guardrails import AggregationMode
from fedcrm.tasks import Task, get_task

DEFAULT_LEDGER: Final = Path("fedcrm-ledger.db")
"""The privacy ledger of a deployment when neither the run config nor the caller names one."""
OUT_DIR_KEY: Final = "out-dir"
"""Run-config key: where a deployed run writes its model and round records."""
CHECKPOINT_DIR_KEY: Final = "checkpoint-dir"
"""Run config: where the coordinator saves its state after every round; a run started again
with the same ``run-name`` resumes after its last completed round."""
RUN_NAME_KEY: Final = "run-name"
"""Run config: the run's id in the ledger, audit log, checkpoints and ``out-dir`` (default:
Flower's run id)."""

logger = logging.getLogger(__name__)


def _log_to_console() -> None:
    """Show fedcrm's round log in the ServerApp's output (``flwr run --stream``, ``flwr log``)."""
    package = logging.getLogger("fedcrm")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False


def deployed_wiring(
    run_config: Mapping[str, object],
    cfg: FederationConfig,
    task: Task[Any, Any],
    *,
    run_id: str,
    ledger_url: str,
    dp: bool,
    consent: bool,
) -> Wiring:
    """The wrappers a deployed run's config asks for, checked against the guardrails.

    Raises:
        ConfigError: An invalid or refused combination; HE without a public context (it is
            loaded, and checked to be public, here, before any round).
    """
    aggregation = AggregationConfig.from_run_config(run_config)
    central = CentralDPConfig.from_run_config(
        run_config, model=task.model_name, purpose=task.purpose
    )
    check_plan(aggregation, central, strategy=str(cfg.strategy), dp=dp, consent=consent)
    public, checkpoints = None, None
    if aggregation.mode is AggregationMode.HE:
        path = str(run_config.get(KEY_HE_PUBLIC_CONTEXT, "") or "")
        public = load_public_context(Path(path)) if path else None
        checkpoints = Path(str(run_config.get(KEY_HE_CHECKPOINT_DIR) or DEFAULT_CHECKPOINT_DIR))
    min_honest = cfg.min_train_nodes
    if central is not None and central.min_honest_branches is not None:
        min_honest = central.min_honest_branches
    return Wiring(
        aggregation,
        central,
        rounds=cfg.num_rounds,
        run_id=run_id,
        ledger_url=ledger_url,
        round_timeout=cfg.round_timeout,
        public_context=public,
        checkpoint_dir=checkpoints,
        min_honest=min_honest,
    )


def make_server_app(
    cfg: FederationConfig | None = None,
    settings: object | None = None,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    results: list[FederationResult] | None = None,
    wiring: Wiring | None = None,
    dp: DPSGDConfig | None = None,
    ledger_url: str | None = None,
    run_id: str | None = None,
    errors: list[FederationStopped] | None = None,
    compliance: ComplianceConfig | None = None,
    audit: RunAudit | None = None,
    traffic: TrafficMeter | None = None,
    checkpoint_dir: Path | None = None,
) -> ServerApp:
    """Build the ServerApp.

    Args:
        cfg: Federation settings; ``None`` reads them from the run config.
        settings: The task's settings; ``None`` reads them from the run config.
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round (progress display, metrics file).
        results: The run's `FederationResult` is appended here when it ends.
        wiring: The strategy wrappers; ``None`` builds them from the run config
            (`deployed_wiring`).
        dp: DP-SGD settings; ``None`` reads ``dp-*`` keys from the run config (no
            ``dp-target-epsilon``: no DP).
        ledger_url: The privacy ledger's URL unless the DP settings name one (default:
            ``fedcrm-ledger.db`` in the working directory); record-level and branch-level
            entries go to the same ledger.
        run_id: The run's id in the ledger (default: Flower's run id).
        errors: A run stopped by `FederationStopped` is appended here (with its partial
            result) instead of raising inside Flower; ``None`` lets it raise.
        compliance: The run's purpose and audit store; ``None`` reads ``consent-purpose`` and
            ``audit-url`` from the run config (neither: no consent gate, no audit trail).
        audit: The run's audit trail, if the caller opened it (else one over ``audit-url``).
        traffic: Counts the bytes of every train and evaluate message (read it per round).
        checkpoint_dir: Where the state is saved after every round (a run resumes from it);
            ``None`` reads ``checkpoint-dir`` from the run config (absent: no checkpoints).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if traffic is not None:
            grid = MeteredGrid(grid, traffic)
        if results is None:
            _log_to_console()
        run_config = dict(context.run_config)
        config = cfg or FederationConfig.from_run_config(run_config)
        task = get_task(config.task)
        task_settings = settings or task.settings(run_config, where="run config", strict=False)
        privacy = dp or DPSGDConfig.from_run_config(
            run_config, model=task.model_name, purpose=task.purpose
        )
        url = (privacy.ledger_url if privacy else None) or ledger_url or sqlite_url(DEFAULT_LEDGER)
        declared = compliance or ComplianceConfig.from_run_config(run_config)
        name = run_id or str(run_config.get(RUN_NAME_KEY) or context.run_id)
        folder = checkpoint_dir or run_config.get(CHECKPOINT_DIR_KEY)
        wire = wiring or deployed_wiring(
            run_config,
            config,
            task,
            run_id=name,
            ledger_url=url,
            dp=privacy is not None,
            consent=declared.purpose is not None,
        )
        if privacy is not None or wire.central_dp is not None:
            logger.info("privacy ledger: %s", url)
        trail = audit
        if trail is None and declared.audit_url is not None:
            trail = RunAudit(declared.audit_url, name)
        try:
            result = run_federation(
                grid,
                config,
                task_settings,
                min_nodes=min_nodes,
                on_round=on_round,
                wrap_strategy=wire.wrap if wire.wraps else None,
                check_statistics=wire.check_statistics,
                dp=privacy,
                ledger=None if privacy is None else PrivacyLedger(open_store(url)),
                run_id=name,
                purpose=declared.purpose,
                audit=trail,
                checkpoints=None if not folder else RoundCheckpoints(Path(str(folder)), name),
            )
        except FederationStopped as exc:
            logger.error("%s", exc)
            if errors is None:
                raise
            errors.append(exc)
            return
        result.central_dp = wire.central_summary()
        if results is not None:
            results.append(result)
            return
        # Flower's deployment engine: nobody in-process collects the result.
        out = Path(str(run_config.get(OUT_DIR_KEY) or DEFAULT_OUT_DIR)) / name
        model = write_outputs(task, result, out)
        logger.info("model and round records written to %s", out.resolve())
        if trail is not None and model is not None:  # the release's hash goes to the audit log
            trail.model_release(model, model=task.model_name, last_round=result.best_round)

    return app


app = make_server_app()
"""The ServerApp for Flower's deployment engine (``fedcrm.server.app:app``)."""
