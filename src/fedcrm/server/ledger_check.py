"""Recompute a privacy ledger with independent accountants: what an auditor runs.

Every admitted row's cumulative ε is recomposed from the ledger's own rows of its (branch,
model, purpose), in the order they were recorded, with Google's dp-accounting: RDP for every
row (the recorded figures come from Opacus's RDP or PRV), PLD for the last row of each scope
and for every PRV row.
A row is flagged when its recorded ε and the recomputed one differ by more than 1 %, or when
PLD exceeds RDP. See docs/privacy-analysis.md#recomputing-the-ledger.
"""

from dataclasses import dataclass

from fedcrm.compliance import Decision, LedgerEntry
from fedcrm.privacy import (
    PLD_SLACK,
    AccountingEvent,
    IncrementalRdp,
    disagrees,
    parse_event,
    recompute_history,
)


@dataclass(frozen=True, slots=True)
class RowCheck:
    """One admitted ledger row, recomputed.

    Attributes:
        entry: The row.
        rdp: Its cumulative ε by dp-accounting's RDP accountant.
        pld: By dp-accounting's PLD accountant (last row of each scope only).
        problem: Why the row is flagged; ``None``: it agrees.
    """

    entry: LedgerEntry
    rdp: float
    pld: float | None
    problem: str | None


def _event(entry: LedgerEntry) -> AccountingEvent:
    if entry.dp_event is not None:
        return parse_event(entry.dp_event)
    return AccountingEvent(entry.noise_multiplier, entry.sampling_rate, entry.steps)


def recompute_ledger(entries: list[LedgerEntry]) -> list[RowCheck]:
    """Recompute every admitted row of ``entries`` (refusals spend nothing and are skipped).

    Raises:
        fedcrm.privacy.dp.AccountingError: A row's event cannot be read or recomputed.
    """
    scopes: dict[tuple[str, str, str], list[LedgerEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.id or 0):
        if entry.decision == Decision.ADMITTED and entry.steps > 0:
            scopes.setdefault((entry.branch, entry.model, entry.purpose), []).append(entry)
    checks: list[RowCheck] = []
    for rows in scopes.values():
        events: list[AccountingEvent] = []
        incremental = IncrementalRdp()
        for index, entry in enumerate(rows):
            events.append(_event(entry))
            rdp = incremental.add(events[-1], delta=entry.delta)
            # A PRV row is checked against PLD (both tight numerical bounds), others against RDP.
            prv = entry.accountant == "prv"
            pld = None
            if prv or index == len(rows) - 1:
                pld = recompute_history(events, delta=entry.delta, with_pld=True).pld
            reference = pld if prv and pld is not None else rdp
            problem = None
            if disagrees(entry.cumulative_epsilon, reference):
                problem = (
                    f"recorded cumulative epsilon {entry.cumulative_epsilon:.6g} vs "
                    f"{reference:.6g} recomputed ({entry.accountant} row)"
                )
            if pld is not None and pld > rdp * (1 + PLD_SLACK):
                problem = f"PLD epsilon {pld:.6g} above RDP {rdp:.6g}"
            checks.append(RowCheck(entry, rdp, pld, problem))
    return checks
