"""DP events as an auditor recomputes them: dp-accounting's event types, serialised as JSON.

Every privacy-ledger row stores its mechanism as ``SelfComposedDpEvent(PoissonSampledDpEvent(
GaussianDpEvent(σ), q), steps)`` in dp-accounting's names; :func:`recompute_history` composes
a branch's rows with Google's dp-accounting RDP and PLD accountants, which share no code with
the Opacus accountants that computed the recorded figures. See
docs/privacy-analysis.md#recomputing-the-ledger.
"""

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import dp_accounting
from dp_accounting import pld, rdp

from fedcrm.privacy.dp._analysis import AccountingEvent, coalesce
from fedcrm.privacy.dp._errors import AccountingError

# dp-accounting logs (through absl) every RDP order whose series does not converge and leaves
# it out, which can only raise ε; the recompute's figures say so in the docs, not in the log.
logging.getLogger("absl").setLevel(logging.ERROR)

DISAGREEMENT: Final = 0.01
"""Relative gap between a recorded ε and dp-accounting's RDP figure that is flagged."""
PLD_SLACK: Final = 1e-3
"""PLD (a tight numerical bound) may exceed RDP by this relative slack before it is flagged."""
_PLD_DISCRETIZATION: Final = 1e-4


def event_json(event: AccountingEvent, *, noise_added_at: str = "branch") -> str:
    """The event of ``steps`` Poisson-subsampled Gaussian steps, as dp-accounting names it.

    Args:
        event: σ, q and steps.
        noise_added_at: Where the noise was added (``branch``: local DP-SGD).
    """
    return json.dumps(
        {
            "name": "SelfComposedDpEvent",
            "count": event.steps,
            "event": {
                "name": "PoissonSampledDpEvent",
                "sampling_probability": event.sample_rate,
                "event": {"name": "GaussianDpEvent", "noise_multiplier": event.noise_multiplier},
            },
            "noise_added_at": noise_added_at,
        },
        sort_keys=True,
    )


def parse_event(text: str) -> AccountingEvent:
    """Read back what :func:`event_json` wrote.

    Raises:
        AccountingError: The text is not such an event (the message says which part).
    """
    try:
        outer: Any = json.loads(text)
        inner = outer["event"]
        gaussian = inner["event"]
        names = (outer["name"], inner["name"], gaussian["name"])
        if names != ("SelfComposedDpEvent", "PoissonSampledDpEvent", "GaussianDpEvent"):
            raise AccountingError(f"unsupported DP event structure {names}")
        return AccountingEvent(
            gaussian["noise_multiplier"], inner["sampling_probability"], outer["count"]
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise AccountingError(f"not a serialised DP-SGD event: {exc!r}") from exc


def _dp_event(event: AccountingEvent) -> dp_accounting.DpEvent:
    sampled = dp_accounting.PoissonSampledDpEvent(
        event.sample_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(sampled, event.steps)


@dataclass(frozen=True, slots=True)
class Recomputed:
    """One history's ε by dp-accounting's RDP (and, when asked, PLD) accountants."""

    rdp: float
    pld: float | None


def recompute_history(
    events: Sequence[AccountingEvent], *, delta: float, with_pld: bool = False
) -> Recomputed:
    """ε at ``delta`` of the composition of ``events`` by dp-accounting.

    Raises:
        AccountingError: No events, or an accountant failed.
    """
    if not events:
        raise AccountingError("an empty history has no epsilon to recompute")
    events = coalesce(events)  # runs of one (σ, q): one self-composed event, same ε
    try:
        rdp_accountant = rdp.RdpAccountant()
        for event in events:
            rdp_accountant.compose(_dp_event(event))
        rdp_eps = float(rdp_accountant.get_epsilon(delta))
        pld_eps = None
        if with_pld:
            pld_accountant = pld.PLDAccountant(value_discretization_interval=_PLD_DISCRETIZATION)
            for event in events:
                pld_accountant.compose(_dp_event(event))
            pld_eps = float(pld_accountant.get_epsilon(delta))
    except (ValueError, OverflowError) as exc:
        raise AccountingError(f"dp-accounting failed: {exc}") from exc
    return Recomputed(rdp_eps, pld_eps)


class IncrementalRdp:
    """dp-accounting's RDP accountant, one event at a time (ε after each, at its own δ)."""

    def __init__(self) -> None:
        self._accountant = rdp.RdpAccountant()

    def add(self, event: AccountingEvent, *, delta: float) -> float:
        """Compose ``event``; return the cumulative ε at ``delta``.

        Raises:
            AccountingError: The accountant failed.
        """
        try:
            self._accountant.compose(_dp_event(event))
            return float(self._accountant.get_epsilon(delta))
        except (ValueError, OverflowError) as exc:
            raise AccountingError(f"dp-accounting failed: {exc}") from exc


def disagrees(recorded: float, recomputed: float) -> bool:
    """Whether a recorded ε and a recomputed one differ by more than :data:`DISAGREEMENT`."""
    if not (math.isfinite(recorded) and math.isfinite(recomputed)):
        return recorded != recomputed
    return abs(recorded - recomputed) > DISAGREEMENT * max(abs(recomputed), 1e-12)
