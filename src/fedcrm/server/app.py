"""The coordinator's Flower ServerApp."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.server.config import FederationConfig
from fedcrm.server.federation import (
    FederationResult,
    RoundCallback,
    StrategyWrapper,
    run_federation,
)

logger = logging.getLogger(__name__)


def make_server_app(
    cfg: FederationConfig | None = None,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    results: list[FederationResult] | None = None,
    wrap_strategy: StrategyWrapper | None = None,
) -> ServerApp:
    """Build the ServerApp.

    Args:
        cfg: Settings; ``None`` reads them from the run config (``flwr run --run-config``).
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round (progress display, metrics file).
        results: The run's `FederationResult` is appended here when it ends.
        wrap_strategy: Wraps the optimisation strategy (e.g. homomorphic aggregation).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg or FederationConfig.from_run_config(context.run_config)
        result = run_federation(
            grid, config, min_nodes=min_nodes, on_round=on_round, wrap_strategy=wrap_strategy
        )
        if results is not None:
            results.append(result)

    return app


app = make_server_app()
"""The ServerApp for Flower's deployment engine (``fedcrm.server.app:app``)."""
