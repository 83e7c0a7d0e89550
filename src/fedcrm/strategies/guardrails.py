"""Which combinations of secure aggregation, robust aggregation, DP and server optimiser are valid.

One table, one function. Each refusal states the rule, why it cannot work and what to use
instead. The simulation config calls :func:`check_combination` before anything runs, so a bad
TOML fails in milliseconds rather than after Ray has started. The refused combinations, and why
central DP under HE is allowed in its distributed form only, are in
docs/privacy-analysis.md#valid-combinations.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fedcrm.exceptions import ConfigError

__all__ = [
    "AggregationMode",
    "CombinationRefused",
    "Refusal",
    "RobustAggregator",
    "ServerClipping",
    "check_combination",
]


class AggregationMode(StrEnum):
    """How branch updates reach the server."""

    PLAIN = "plain"
    """Plaintext updates (Flower's default)."""
    HE = "he"
    """CKKS ciphertexts summed by the server (fedcrm.strategies.he)."""
    SECAGG = "secagg"
    """Flower's SecAgg+ masking (legacy API only in flwr 1.41)."""


class RobustAggregator(StrEnum):
    """Byzantine-robust replacements for FedAvg's weighted mean (Flower built-ins)."""

    NONE = "none"
    KRUM = "krum"
    """Blanchard et al. 2017, "Machine Learning with Adversaries" (NeurIPS)."""
    MULTI_KRUM = "multi-krum"
    """Blanchard et al. 2017: average of the m best-scored updates."""
    MEDIAN = "median"
    """Yin et al. 2018, arXiv:1803.01498 (coordinate-wise median)."""
    TRIMMED_MEAN = "trimmed-mean"
    """Yin et al. 2018, arXiv:1803.01498 (coordinate-wise trimmed mean)."""


class ServerClipping(StrEnum):
    """Server-side clipping / central DP (Flower's ``DifferentialPrivacyServerSide*``)."""

    NONE = "none"
    FIXED = "fixed"
    ADAPTIVE = "adaptive"


_ADAPTIVE_OPTIMISERS = frozenset({"fedadam", "fedyogi", "fedadagrad"})


@dataclass(frozen=True)
class Refusal:
    """One refused combination: the rule, the reason and the alternative."""

    rule: str
    reason: str
    alternative: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.reason} Instead: {self.alternative}"


class CombinationRefused(ConfigError):
    """The configuration combines settings that cannot work together.

    Attributes:
        refusals: Every refused pair, not just the first.
    """

    def __init__(self, refusals: list[Refusal]) -> None:
        self.refusals = refusals
        super().__init__("refused configuration:\n" + "\n".join(f"- {r}" for r in refusals))


def check_combination(
    *,
    mode: AggregationMode,
    robust: RobustAggregator = RobustAggregator.NONE,
    server_clipping: ServerClipping = ServerClipping.NONE,
    strategy: str = "fedavg",
    secagg: bool = False,
    central_dp: bool = False,
    distributed_dp: bool = False,
    strict: bool = True,
) -> list[Refusal]:
    """Check one combination of aggregation settings.

    Args:
        mode: Plaintext, HE or SecAgg+ aggregation.
        robust: Robust aggregator replacing FedAvg's mean.
        server_clipping: Server-side clipping (and the central DP noise that goes with it).
        strategy: The server strategy name (``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``,
            ``fedadagrad``).
        secagg: SecAgg+ requested on top of ``mode`` (for callers with a separate switch).
        central_dp: Branch-level central DP through Flower's DP wrappers (any of the four;
            all add the noise to the plaintext mean on the server), or distributed DP.
        distributed_dp: The central DP is the distributed variant (``[central-dp] mode =
            "distributed"``: branches clip and add noise shares); allowed only under HE.
        strict: Raise instead of returning when anything is refused.

    Returns:
        Every refusal (empty when the combination is valid).

    Raises:
        CombinationRefused: ``strict`` and at least one refusal; it lists them all.
    """
    out: list[Refusal] = []
    masked = {AggregationMode.HE: "HE ciphertexts", AggregationMode.SECAGG: "SecAgg+ masks"}
    if mode is AggregationMode.HE and secagg:
        out.append(
            Refusal(
                "HE + SecAgg+",
                "both hide individual updates from the server; stacking them doubles the cost "
                "and traffic for no added protection, and SecAgg+ runs only on Flower's legacy "
                "API while HE runs on the Message API (one round cannot use both).",
                "choose one: mode = 'he' (branches hold the key, no dropout protocol) or "
                "mode = 'secagg' (no key authority, tolerates dropouts).",
            )
        )
    if mode in masked and robust is not RobustAggregator.NONE:
        out.append(
            Refusal(
                f"{robust} on {masked[mode]}",
                f"{robust} compares individual updates (distances or coordinate order), but the "
                f"server only sees {masked[mode]}, which reveal nothing alone; the server can "
                "only add them.",
                "mode = 'plain' with the robust aggregator, or keep secure aggregation and "
                "bound each branch's influence on the branch (norm clipping inside the HE mod).",
            )
        )
    if mode in masked and server_clipping is not ServerClipping.NONE:
        out.append(
            Refusal(
                f"server-side {server_clipping} clipping on {masked[mode]}",
                "clipping needs each update's norm, which the server cannot compute without "
                "decrypting or unmasking; central DP noise added to the sum would need the "
                "plaintext sum on the server too.",
                "clip on the branches and add distributed noise: [central-dp] mode = "
                "'distributed' with [aggregation] mode = 'he' (each branch clips to C and adds "
                "N(0, (z C)^2 / K_min) before encrypting); see this module's docstring.",
            )
        )
    if mode is AggregationMode.HE and strategy in _ADAPTIVE_OPTIMISERS:
        out.append(
            Refusal(
                f"{strategy} on HE ciphertexts",
                f"{strategy} keeps per-coordinate moments and divides by their square root; "
                "CKKS summation parameters allow additions only, and the server never holds "
                "the plaintext mean.",
                "strategy = 'fedavg' or 'fedprox' under HE, or mode = 'plain' / 'secagg' "
                "(SecAgg+ unmasks the sum, so a server optimiser works there).",
            )
        )
    if robust is not RobustAggregator.NONE and strategy != "fedavg":
        out.append(
            Refusal(
                f"{robust} with {strategy}",
                f"Flower's robust strategies replace FedAvg's aggregation; they cannot also be "
                f"{strategy} (no proximal term is sent, no server optimiser is applied).",
                "strategy = 'fedavg' with the robust aggregator.",
            )
        )
    if distributed_dp and mode is not AggregationMode.HE:
        out.append(
            Refusal(
                f"distributed DP without HE ({mode})",
                "each branch adds only N(0, (z C)^2 / K_min), sized to protect the sum; without "
                "HE the server would see individual updates (plaintext) or the fedcrm branch "
                "mod would not run (SecAgg+), so the noise would not be applied as analysed.",
                "[aggregation] mode = 'he' with distributed DP, or a server-fixed / "
                "server-adaptive / client-fixed / client-adaptive [central-dp] mode in plaintext.",
            )
        )
    if (
        central_dp
        and not distributed_dp
        and mode in masked
        and server_clipping is ServerClipping.NONE
    ):
        out.append(
            Refusal(
                f"central DP on {masked[mode]}",
                "Flower's central-DP wrappers take each update's norm and add noise to the "
                "plaintext mean on the server; the server only holds "
                f"{masked[mode]} until the sum is revealed.",
                "mode = 'plain' with [central-dp], or [central-dp] mode = 'distributed' with "
                "[aggregation] mode = 'he' (branches clip and add noise shares before "
                "encrypting; see this module's docstring).",
            )
        )
    if central_dp and (robust is not RobustAggregator.NONE or strategy in _ADAPTIVE_OPTIMISERS):
        other = str(robust) if robust is not RobustAggregator.NONE else strategy
        out.append(
            Refusal(
                f"central DP with {other}",
                "the branch-level accounting assumes Gaussian noise on the plain mean of clipped "
                f"updates; Flower adds it after the inner strategy, so {other} would change "
                "what is released and the sensitivity.",
                "strategy = 'fedavg' or 'fedprox' without a robust aggregator.",
            )
        )
    if strict and out:
        raise CombinationRefused(out)
    return out
