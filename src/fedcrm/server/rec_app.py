"""The coordinator's Flower ServerApp for federated recommendations."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcrm.compliance import PrivacyLedger
from fedcrm.server.rec_federation import (
    RecDPConfig,
    RecFederationConfig,
    RecFederationResult,
    RecHEConfig,
    RecRoundCallback,
    run_rec_federation,
)


def make_rec_server_app(
    cfg: RecFederationConfig,
    *,
    n_items: int,
    min_nodes: int = 2,
    on_round: RecRoundCallback | None = None,
    results: list[RecFederationResult] | None = None,
    dp: RecDPConfig | None = None,
    ledger: PrivacyLedger | None = None,
    run_id: str = "rec",
    he: RecHEConfig | None = None,
) -> ServerApp:
    """Build the recommendation ServerApp.

    Args:
        cfg: Run settings.
        n_items: Size of the shared item catalogue.
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round (progress display, metrics file).
        results: The run's `RecFederationResult` is appended here when it ends.
        dp: Customer-level DP on every branch (``None``: none).
        ledger: Where every branch's privacy report is recorded (DP runs).
        run_id: The run's id in the ledger.
        he: Encrypted aggregation of the item tower (``None``: plaintext FedAvg); the
            branches' ClientApp must carry `fedcrm.client.he_mod.HEMod`.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_rec_federation(
            grid,
            cfg,
            n_items=n_items,
            min_nodes=min_nodes,
            on_round=on_round,
            dp=dp,
            ledger=ledger,
            run_id=run_id,
            he=he,
        )
        if results is not None:
            results.append(result)

    return app
