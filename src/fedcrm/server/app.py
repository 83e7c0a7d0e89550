"""The coordinator's Flower ServerApp."""

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.branch_accounting import CentralDPConfig, CentralDPMode
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.server import aggregation
from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import (
    FederationResult,
    FederationStopped,
    RoundCallback,
    StrategyWrapper,
    run_federation,
)
from fedcrm.server.outputs import DEFAULT_OUT_DIR, write_outputs
from fedcrm.server.run_audit import ComplianceConfig, RunAudit
from fedcrm.server.traffic import MeteredGrid, TrafficMeter
from fedcrm.strategies.central_dp import CentralDPStrategy, central_dp_wrapper

DEFAULT_LEDGER = Path("fedcrm-ledger.db")
"""The privacy ledger of a deployment when neither the run config nor the caller names one."""

OUT_DIR_KEY = "out-dir"
"""Run-config key: where a deployed run writes its model and round records."""

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


def make_server_app(
    cfg: FederationConfig | None = None,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    results: list[FederationResult] | None = None,
    wrap_strategy: StrategyWrapper | None = None,
    dp: FederatedDPConfig | None = None,
    central_dp: CentralDPConfig | None = None,
    ledger_url: str | None = None,
    run_id: str | None = None,
    errors: list[FederationStopped] | None = None,
    compliance: ComplianceConfig | None = None,
    audit: RunAudit | None = None,
    traffic: TrafficMeter | None = None,
) -> ServerApp:
    """Build the ServerApp.

    Args:
        cfg: Settings; ``None`` reads them from the run config (``flwr run --run-config``).
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round (progress display, metrics file).
        results: The run's `FederationResult` is appended here when it ends.
        wrap_strategy: Wraps the optimisation strategy (e.g. homomorphic aggregation);
            ``None`` reads ``aggregation-mode`` from the run config (`fedcrm.server.aggregation`).
        dp: Record-level DP settings; ``None`` reads ``dp-*`` keys from the run config (no
            ``dp-target-epsilon``: no DP).
        central_dp: Branch-level (central) DP settings; ``None`` reads ``central-dp-*`` keys
            from the run config (no ``central-dp-mode``: none). It wraps the strategy itself,
            so it is not combined with ``wrap_strategy`` or an ``aggregation-mode`` wrapper.
        ledger_url: The privacy ledger's URL unless the record-level DP settings name one
            (default: ``fedcrm-ledger.db`` in the working directory); record-level and
            branch-level entries go to the same ledger.
        run_id: The run's id in the ledger (default: Flower's run id).
        errors: A run stopped by `FederationStopped` is appended here (with its partial
            result) instead of raising inside Flower; ``None`` lets it raise.
        compliance: The run's purpose and audit store; ``None`` reads ``consent-purpose`` and
            ``audit-url`` from the run config (neither: no consent gate, no audit trail).
        audit: The run's audit trail, if the caller opened it (else one over ``audit-url``).
        traffic: Counts the bytes of every train and evaluate message (read it per round).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if traffic is not None:
            grid = MeteredGrid(grid, traffic)
        if results is None:
            _log_to_console()
        config = cfg or FederationConfig.from_run_config(context.run_config)
        central = central_dp or CentralDPConfig.from_run_config(context.run_config)
        if central is not None and central.mode is CentralDPMode.DISTRIBUTED:
            raise ConfigError(
                "central-dp-mode 'distributed' is not supported by the deployed ServerApp yet; "
                "use server-fixed, server-adaptive, client-fixed or client-adaptive"
            )
        wrap = wrap_strategy or aggregation.wrapper(
            context.run_config, strategy=str(config.strategy), round_timeout=config.round_timeout
        )
        privacy = dp or FederatedDPConfig.from_run_config(context.run_config)
        url = (privacy.ledger_url if privacy else None) or ledger_url or sqlite_url(DEFAULT_LEDGER)
        ledger = None
        if privacy is not None:
            ledger = PrivacyLedger(open_store(url))
        if privacy is not None or central is not None:
            logger.info("privacy ledger: %s", url)
        declared = compliance or ComplianceConfig.from_run_config(context.run_config)
        name = run_id or str(context.run_id)
        central_built: list[CentralDPStrategy] = []
        if central is not None:
            if wrap is not None:  # the guardrails refuse it; never stack two wrappers silently
                raise ConfigError("central DP wraps the strategy itself: no other wrapper with it")
            wrap = central_dp_wrapper(
                central,
                rounds=config.num_rounds,
                ledger_url=url,
                run_id=name,
                built=central_built,
            )
        trail = audit
        if trail is None and declared.audit_url is not None:
            trail = RunAudit(declared.audit_url, name)
        try:
            result = run_federation(
                grid,
                config,
                min_nodes=min_nodes,
                on_round=on_round,
                wrap_strategy=wrap,
                dp=privacy,
                ledger=ledger,
                run_id=name,
                purpose=declared.purpose,
                audit=trail,
            )
        except FederationStopped as exc:
            logger.error("%s", exc)
            if errors is None:
                raise
            errors.append(exc)
            return
        if central_built:
            result.central_dp = central_built[0].summary_data.as_dict()
        if results is not None:
            results.append(result)
        else:  # Flower's deployment engine: nobody in-process collects the result
            out = Path(str(context.run_config.get(OUT_DIR_KEY) or DEFAULT_OUT_DIR))
            folder = write_outputs(result, out / str(context.run_id))
            logger.info("model and round records written to %s", folder.resolve())
            if trail is not None:  # the release's hash goes to the run's audit log
                model = folder / "model.safetensors"
                trail.model_release(model, model="churn", last_round=result.best_round)

    return app


app = make_server_app()
"""The ServerApp for Flower's deployment engine (``fedcrm.server.app:app``)."""
