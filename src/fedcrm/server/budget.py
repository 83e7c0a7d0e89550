"""The coordinator's side of the privacy budget: ledger and branch accountants kept in step.

Before round 1 every branch of a DP run reports its accountant's spends and its noise plan
(`fedcrm.client.dp_round.privacy_state`). The coordinator then

* records in the ledger every spend the ledger lacks (a crash between the branch's training and
  the ledger write, or a run recorded elsewhere): a ``reconciled`` row, never lost;
* sends each branch, with its train message, the spends the ledger holds and its accountant
  lacks (a fresh or restored accountant), which the branch adds before its own budget check;
* computes every ledger row's cumulative ε from the ledger's own history of the branch, not only
  from the branch's figure: the larger wins, and an update whose spend the ledger puts above
  the budget is recorded but not aggregated.

One spend (its accountant's id) is one ledger row. See docs/privacy-analysis.md#the-ledger.
"""

import json
import logging
import math
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict

from fedcrm import wire as k
from fedcrm.compliance import (
    Accountant,
    Decision,
    LedgerEntry,
    Mechanism,
    NeighbouringRelation,
    PrivacyLedger,
    PrivacyUnit,
    SamplingMethod,
)
from fedcrm.exceptions import FedCrmError
from fedcrm.privacy import (
    OPACUS_VERSION,
    AccountingEvent,
    DPSGDConfig,
    PrivacyReport,
    Spend,
    compute_epsilon,
    event_json,
    parse_spends,
)

logger = logging.getLogger(__name__)

_TOLERANCE = 1e-9


@dataclass
class BranchBudget:
    """What the coordinator knows of one branch's accountant in this run."""

    branch: str
    unit: str
    delta: float | None
    spend_ids: set[str] = field(default_factory=set)


def _ledger_id(entry: LedgerEntry) -> str:
    return entry.spend_id or f"ledger-{entry.id}"


class BudgetGuard:
    """Keeps the privacy ledger and the branches' accountants in step for one DP run.

    Args:
        dp: The run's DP-SGD settings (model, purpose, budget, accountant).
        ledger: The coordinator's privacy ledger.
        run_id: The run's id.
    """

    def __init__(self, dp: DPSGDConfig, ledger: PrivacyLedger, run_id: str) -> None:
        self.dp = dp
        self.ledger = ledger
        self.run_id = run_id
        self.branches: dict[int, BranchBudget] = {}

    def _history(self, branch: str) -> list[LedgerEntry]:
        return [
            e
            for e in self.ledger.entries(
                branch=branch,
                model=self.dp.model,
                purpose=self.dp.purpose,
                decision=Decision.ADMITTED,
            )
            if e.steps > 0
        ]

    def _epsilon(
        self, rows: list[LedgerEntry], extra: list[AccountingEvent], delta: float
    ) -> float:
        events = [AccountingEvent(e.noise_multiplier, e.sampling_rate, e.steps) for e in rows]
        if not events and not extra:
            return 0.0
        return compute_epsilon([*events, *extra], delta=delta, accountant=self.dp.accountant)

    def reconcile(self, states: dict[int, ConfigRecord]) -> list[LedgerEntry]:
        """Read the branches' privacy states; record the spends the ledger lacks.

        Args:
            states: Per node, the ``privacy-state`` record of its statistics reply.

        Returns:
            The reconciled ledger rows (also the run's audit material).

        Raises:
            fedcrm.compliance.LedgerError: The ledger refused a row.
        """
        added: list[LedgerEntry] = []
        for node, record in sorted(states.items()):
            try:
                spends = parse_spends(str(record["spends"]))
                branch = str(record["branch"])
                delta = record.get("delta")
            except (KeyError, ValueError, FedCrmError) as exc:
                logger.warning("node %d: unusable privacy state: %s", node, exc)
                continue
            budget = BranchBudget(
                branch,
                str(record.get("unit", "record")),
                float(delta) if isinstance(delta, int | float) else None,
                {s.spend_id for s in spends if s.spend_id},
            )
            self.branches[node] = budget
            if budget.delta is None:
                logger.warning("%s: no noise plan (%s)", branch, record.get("plan-error"))
                continue
            known = {_ledger_id(e) for e in self._history(branch)}
            for spend in spends:
                if spend.spend_id not in known:
                    added.append(self._reconcile_one(budget, spend))
        if added:
            logger.warning(
                "privacy ledger: %d spend(s) found in branch accountants and missing from the "
                "ledger were recorded (reconciled)",
                len(added),
            )
        return added

    def _reconcile_one(self, budget: BranchBudget, spend: Spend) -> LedgerEntry:
        assert budget.delta is not None
        rows = self._history(budget.branch)
        before = max(
            self._epsilon(rows, [], budget.delta),
            self.ledger.cumulative_epsilon(budget.branch, self.dp.model, self.dp.purpose),
        )
        after = max(before, self._epsilon(rows, [spend.event], budget.delta))
        reason = (
            f"reconciled at the start of run {self.run_id}: the branch accountant holds this "
            f"{spend.status} spend of run {spend.run_id} round {spend.round} and the ledger did "
            "not (the branch trained, then the run stopped before the ledger write, or the run "
            "was recorded in another ledger)"
        )
        return self.ledger.append(
            self._entry(
                budget,
                spend.event,
                run_id=spend.run_id or self.run_id,
                server_round=spend.round or 0,
                epsilon=after - before,
                cumulative=after,
                reason=reason,
                spend_id=spend.spend_id,
            )
        )

    def _entry(
        self,
        budget: BranchBudget,
        event: AccountingEvent,
        *,
        run_id: str,
        server_round: int,
        epsilon: float,
        cumulative: float,
        reason: str,
        spend_id: str | None,
        decision: Decision = Decision.ADMITTED,
        steps: int | None = None,
        library_version: str = f"opacus {OPACUS_VERSION}",
        clipping_norm: float | None = None,
    ) -> LedgerEntry:
        assert budget.delta is not None
        return LedgerEntry(
            run_id=run_id,
            round=server_round,
            branch=budget.branch,
            model=self.dp.model,
            purpose=self.dp.purpose,
            privacy_unit=PrivacyUnit(budget.unit),
            neighbouring_relation=NeighbouringRelation.ADD_REMOVE,
            mechanism=Mechanism.SUBSAMPLED_GAUSSIAN,
            noise_multiplier=event.noise_multiplier,
            clipping_norm=clipping_norm or self.dp.max_grad_norm,
            sampling_rate=event.sample_rate,
            sampling_method=SamplingMethod.POISSON,
            steps=event.steps if steps is None else steps,
            delta=budget.delta,
            accountant=Accountant(self.dp.accountant),
            library_version=library_version,
            epsilon=epsilon,
            cumulative_epsilon=cumulative,
            decision=decision,
            reason=reason,
            epsilon_budget=self.dp.budget,
            spend_id=spend_id,
            dp_event=event_json(event) if decision == Decision.ADMITTED else None,
        )

    def send_ledger_spends(self, messages: list[Message]) -> list[Message]:
        """Give each train message the ledger's spends its branch's accountant lacks.

        Messages to branches the ledger knows nothing more about are left as they are (they
        may share one content record); the others get a content record of their own.
        """
        out: list[Message] = []
        for msg in messages:
            budget = self.branches.get(msg.metadata.dst_node_id)
            if budget is None:
                out.append(msg)
                continue
            missing = [
                e for e in self._history(budget.branch) if _ledger_id(e) not in budget.spend_ids
            ]
            if not missing:
                out.append(msg)
                continue
            spends = [
                Spend(
                    AccountingEvent(e.noise_multiplier, e.sampling_rate, e.steps),
                    _ledger_id(e),
                    e.run_id,
                    e.round,
                    "released",
                ).to_json()
                for e in missing
            ]
            config = ConfigRecord(dict(msg.content.config_records[k.CONFIG]))
            config[k.KEY_LEDGER_SPENDS] = json.dumps(spends)
            msg.content = RecordDict({**dict(msg.content), k.CONFIG: config})
            budget.spend_ids.update(_ledger_id(e) for e in missing)
            out.append(msg)
            logger.info(
                "%s: sending %d ledger spend(s) its accountant lacks", budget.branch, len(spends)
            )
        return out

    def entry(self, report: PrivacyReport, node: int, *, server_round: int) -> LedgerEntry:
        """The ledger row of a branch's report, its cumulative ε the larger of two figures.

        The branch's own cumulative ε, and the ledger's history of the branch composed with
        this spend. A refusal's cumulative is the ledger's current total.
        """
        budget = self.branches.get(node)
        if budget is None or budget.branch != report.branch:
            budget = BranchBudget(report.branch, report.privacy_unit, report.delta)
            self.branches[node] = budget
        budget.delta = report.delta
        total = self.ledger.cumulative_epsilon(report.branch, self.dp.model, self.dp.purpose)
        event = AccountingEvent(report.noise_multiplier, report.sample_rate, max(report.steps, 1))
        common = {
            "run_id": self.run_id,
            "server_round": server_round,
            "library_version": report.library_version,
            "clipping_norm": report.max_grad_norm,
        }
        if not report.admitted:
            return self._entry(
                budget,
                event,
                epsilon=report.epsilon_round,
                cumulative=total,  # a refusal spends nothing: the ledger's total stands
                reason=report.reason,
                spend_id=None,
                decision=Decision.REFUSED,
                steps=0,
                **common,  # type: ignore[arg-type]
            )
        rows = self._history(report.branch)
        after = max(report.epsilon, total, self._epsilon(rows, [event], report.delta))
        if report.spend_id:
            budget.spend_ids.add(report.spend_id)
        reason = report.reason
        if after > self.dp.budget * (1 + _TOLERANCE):
            reason = (
                f"{reason}; the ledger puts this spend at cumulative epsilon {after:.4f}, above "
                f"the budget {self.dp.budget:g}: recorded, and the update is not aggregated"
            )
        return self._entry(
            budget,
            event,
            epsilon=after - max(total, report.epsilon_before),
            cumulative=after,
            reason=reason,
            spend_id=report.spend_id or None,
            **common,  # type: ignore[arg-type]
        )

    def over_budget(self, entry: LedgerEntry) -> bool:
        """Whether an admitted row's cumulative ε is above the budget (drop its update)."""
        return (
            entry.decision == Decision.ADMITTED
            and entry.cumulative_epsilon > self.dp.budget * (1 + _TOLERANCE)
            and math.isfinite(entry.cumulative_epsilon)
        )
