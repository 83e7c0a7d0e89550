"""fedcrm.client: the public API of the subpackage.

The branch side: Flower ClientApps and mods (consent gate, HE, SecAgg+, clipping) and local DP
rounds.

The names below are this subpackage's public API (what other subpackages, benchmarks and
users import); they load on first use. Every other name is internal.
"""

from fedcrm._exports import lazy_exports

_EXPORTS: dict[str, tuple[str, ...]] = {
    "app": (
        "branch_dir",
        "make_client_app",
    ),
    "branch": (
        "BranchData",
        "write_export",
    ),
    "central_dp_mod": (
        "adaptive_clipping_mod",
        "fixed_clipping_mod",
    ),
    "consent_gate": (
        "BranchConsent",
        "apply_gate",
    ),
    "he_mod": ("HEMod",),
    "rec_app": (
        "load_user_factors",
        "make_rec_client_app",
        "user_factors_path",
    ),
    "secagg_client": ("secagg_mod",),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
