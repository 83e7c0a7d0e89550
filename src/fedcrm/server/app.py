"""The coordinator's Flower ServerApp."""

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import (
    FederationResult,
    FederationStopped,
    RoundCallback,
    StrategyWrapper,
    run_federation,
)

DEFAULT_LEDGER = Path("fedcrm-ledger.db")
"""The privacy ledger of a deployment when neither the run config nor the caller names one."""

logger = logging.getLogger(__name__)


def make_server_app(
    cfg: FederationConfig | None = None,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    results: list[FederationResult] | None = None,
    wrap_strategy: StrategyWrapper | None = None,
    dp: FederatedDPConfig | None = None,
    ledger_url: str | None = None,
    run_id: str | None = None,
    errors: list[FederationStopped] | None = None,
) -> ServerApp:
    """Build the ServerApp.

    Args:
        cfg: Settings; ``None`` reads them from the run config (``flwr run --run-config``).
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round (progress display, metrics file).
        results: The run's `FederationResult` is appended here when it ends.
        wrap_strategy: Wraps the optimisation strategy (e.g. homomorphic aggregation).
        dp: Record-level DP settings; ``None`` reads ``dp-*`` keys from the run config (no
            ``dp-target-epsilon``: no DP).
        ledger_url: The privacy ledger's URL unless the DP settings name one (default:
            ``fedcrm-ledger.db`` in the working directory).
        run_id: The run's id in the ledger (default: Flower's run id).
        errors: A run stopped by `FederationStopped` is appended here (with its partial
            result) instead of raising inside Flower; ``None`` lets it raise.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg or FederationConfig.from_run_config(context.run_config)
        privacy = dp or FederatedDPConfig.from_run_config(context.run_config)
        ledger = None
        if privacy is not None:
            url = privacy.ledger_url or ledger_url or sqlite_url(DEFAULT_LEDGER)
            ledger = PrivacyLedger(open_store(url))
            logger.info("privacy ledger: %s", url)
        try:
            result = run_federation(
                grid,
                config,
                min_nodes=min_nodes,
                on_round=on_round,
                wrap_strategy=wrap_strategy,
                dp=privacy,
                ledger=ledger,
                run_id=run_id or str(context.run_id),
            )
        except FederationStopped as exc:
            logger.error("%s", exc)
            if errors is None:
                raise
            errors.append(exc)
            return
        if results is not None:
            results.append(result)

    return app


app = make_server_app()
"""The ServerApp for Flower's deployment engine (``fedcrm.server.app:app``)."""
