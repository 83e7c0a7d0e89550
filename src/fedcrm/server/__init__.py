"""fedcrm.server: the public API of the subpackage.

The coordinator: Flower ServerApps, the round loops, run audit, outputs and traffic metering.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "app": ("make_server_app",),
    "config": ("FederationConfig",),
    "federation": (
        "FederationResult",
        "FederationStopped",
        "RoundRecord",
        "StrategyWrapper",
        "run_federation",
    ),
    "rec_app": ("make_rec_server_app",),
    "rec_federation": (
        "RecDPConfig",
        "RecFederationConfig",
        "RecFederationResult",
        "RecHEConfig",
        "RecRoundRecord",
        "run_rec_federation",
    ),
    "run_audit": (
        "ComplianceConfig",
        "RunAudit",
    ),
    "traffic": (
        "RoundTraffic",
        "TrafficMeter",
        "wire_size",
    ),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
