"""fedcrm.client: the branch side of every task.

One Flower ClientApp for every task (`make_client_app`), the consent gate, the budget-checked
DP-SGD round, and the mods a round can pass through (HE, SecAgg+, client-side clipping).
"""

from fedcrm.client.app import RunMessage, make_client_app
from fedcrm.client.central_dp_mod import (
    adaptive_clipping_mod,
    central_clipping_mod,
    fixed_clipping_mod,
)
from fedcrm.client.consent_gate import BranchConsent, GateResult, apply_gate, commit_round
from fedcrm.client.dp_round import (
    CUSTOMER_LEDGER,
    BranchPrivacy,
    accountant_key,
    accountant_path,
    private_round,
)
from fedcrm.client.he_mod import HEMod
from fedcrm.client.secagg_client import SecAggUpdateRefused, secagg_mod
from fedcrm.client.source import branch_dir, resolve_source

__all__ = [
    "CUSTOMER_LEDGER",
    "BranchConsent",
    "BranchPrivacy",
    "GateResult",
    "HEMod",
    "RunMessage",
    "SecAggUpdateRefused",
    "accountant_key",
    "accountant_path",
    "adaptive_clipping_mod",
    "apply_gate",
    "branch_dir",
    "central_clipping_mod",
    "commit_round",
    "fixed_clipping_mod",
    "make_client_app",
    "private_round",
    "resolve_source",
    "secagg_mod",
]
