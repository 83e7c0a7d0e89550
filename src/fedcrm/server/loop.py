"""The one federated round loop the ServerApp runs on a Flower Grid, for every task.

One federated-statistics query, then ``num_rounds`` rounds of train → screen → aggregate →
evaluate on every branch. The loop is Flower's ``Strategy.start`` written out (configure_train
→ send_and_receive → aggregate_train → evaluate), so that each round is screened, recorded and
reported as soon as it ends; the task (`fedcrm.tasks.Task`) supplies the initial model, the
statistics it combines, the pooling of evaluation replies and the selection metric.

A run that declares a purpose (``purpose``) sends it with every message; each branch trains
only on customers with valid consent for it and answers with a round manifest, or refuses the
run. With record-level DP (``dp``) every branch answers with a privacy report, admitted or
refused, written to the privacy ledger, which is first reconciled with the branches'
accountants (`fedcrm.server.budget`). Refusals are recorded and left out; the run stops with
`FederationStopped` below ``min-train-nodes``. With a `RunAudit`, the configuration, manifests,
refusals and ledger entries also go to the run's audit log.
"""

import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrm import wire as k
from fedcrm.compliance import PrivacyLedger, Purpose
from fedcrm.exceptions import ConfigError, FedCrmError
from fedcrm.privacy import DPSGDConfig
from fedcrm.server.budget import BudgetGuard
from fedcrm.server.checkpoint import Resumed, RoundCheckpoints
from fedcrm.server.config import FederationConfig
from fedcrm.server.result import FederationResult, FederationStopped, RoundCallback, RoundRecord
from fedcrm.server.run_audit import RunAudit
from fedcrm.server.screening import (
    query_statistics,
    screen_consent,
    screen_privacy,
    screen_statistics,
)
from fedcrm.settings import to_mapping
from fedcrm.strategies.central_dp import CentralBudgetExhausted
from fedcrm.strategies.factory import StrategyName, build_strategy
from fedcrm.strategies.he import parse_checkpoint
from fedcrm.strategies.validated import ValidatedStrategy
from fedcrm.tasks import Arrays, get_task

logger = logging.getLogger(__name__)

StrategyWrapper = Callable[[Strategy], Strategy]
"""Wraps the inner strategy (HE, SecAgg+, central DP, robust) inside the reply validation."""
StatisticsCheck = Callable[[list[MetricRecord]], None]
"""Refuses, before round 1, what the branches' statistics make impossible (raises)."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are there.

    Raises:
        FedCrmError: Fewer than ``minimum`` branches connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise FedCrmError(
                f"only {len(nodes)} of {minimum} branches connected in {timeout:.0f} s"
            )
        time.sleep(0.5)
    return nodes


def _plain(record: Any) -> dict[str, Any]:
    return {} if record is None else {key: record[key] for key in record}


def _released(arrays: ArrayRecord) -> Arrays:
    """The plaintext model, or nothing when the server holds a ciphertext checkpoint (HE)."""
    if parse_checkpoint(arrays) is not None:
        return {}
    return {name: arrays[name].numpy() for name in arrays}


def _check_resumable(resumed: Resumed, cfg: FederationConfig) -> None:
    """Refuse a saved state the loop cannot continue exactly."""
    if parse_checkpoint(resumed.arrays) is not None:
        raise ConfigError(
            "an HE run cannot resume from a round checkpoint yet (the server's chain of "
            "ciphertext checkpoints is not restored); start the run afresh"
        )
    if cfg.strategy is StrategyName.FEDADAM:
        raise ConfigError(
            "a fedadam run cannot resume: the server optimiser's moments are not saved; "
            "start it afresh or use fedavg"
        )
    if resumed.last_round >= cfg.num_rounds:
        raise ConfigError(
            f"the saved state is after round {resumed.last_round}: the run of "
            f"{cfg.num_rounds} rounds is complete"
        )


def run_federation(
    grid: Grid,
    cfg: FederationConfig,
    settings: object,
    *,
    min_nodes: int = 2,
    on_round: RoundCallback | None = None,
    wrap_strategy: StrategyWrapper | None = None,
    check_statistics: StatisticsCheck | None = None,
    dp: DPSGDConfig | None = None,
    ledger: PrivacyLedger | None = None,
    run_id: str = "run",
    purpose: Purpose | None = None,
    audit: RunAudit | None = None,
    checkpoints: RoundCheckpoints | None = None,
) -> FederationResult:
    """Run federated training of ``cfg.task`` on the branches connected to ``grid``.

    Args:
        grid: Flower's grid of connected branches (simulation or deployment).
        cfg: Federation settings.
        settings: The task's settings (sent to every branch).
        min_nodes: Branches that must be connected before the first round.
        on_round: Called after every round.
        wrap_strategy: Wraps the optimisation strategy (inside the reply validation).
        check_statistics: Checks the branches' statistics before round 1 (e.g. SecAgg+'s
            largest weight: `fedcrm.server.wiring.Wiring.check_statistics`).
        dp: DP-SGD settings sent to every branch (``None``: no DP).
        ledger: Where every branch's privacy decision is recorded (DP runs).
        run_id: The run's id in the ledger, the audit log and the branches' manifests.
        purpose: The run's declared purpose: every branch gates its customers on consent for
            it (``None``: no consent gate).
        audit: The run's audit trail (configuration, manifests, refusals, ledger entries).
        checkpoints: Where the run's state is saved after every round; a run with a saved
            state resumes after its last completed round (`fedcrm.server.checkpoint`).

    Raises:
        ConfigError: DP was asked for with FedProx (its proximal term is not clipped),
            ``check_statistics`` refused the branches' statistics, or a saved state cannot be
            resumed (HE, FedAdam).
        FederationStopped: Privacy budgets or consent refusals left fewer than
            ``min-train-nodes`` admitted branches, or the ledger refused a branch's report.
        FedCrmError: A round produced no usable update.
    """
    task = get_task(cfg.task)
    if dp is not None and cfg.strategy is StrategyName.FEDPROX:
        raise ConfigError("DP-SGD cannot run with fedprox: use fedavg or fedadam")
    if dp is not None:
        logger.info("privacy: %s", dp.describe())
    run: dict[str, Any] = {
        k.KEY_TASK: task.name,
        k.KEY_SEED: cfg.seed,
        k.KEY_NUM_ROUNDS: cfg.num_rounds,
        k.KEY_RUN_ID: run_id,
        **to_mapping(settings),
        **({} if dp is None else dp.to_run_config(include_ledger=False)),
    }
    if purpose is not None:
        run[k.KEY_CONSENT_PURPOSE] = purpose.value
    if audit is not None:
        audit.configuration({**cfg.to_run_config(), **run})
    nodes = wait_for_nodes(grid, min_nodes, cfg.round_timeout)
    result = FederationResult(task.name, {}, {}, len(nodes), dp=dp)
    stats = query_statistics(
        grid, nodes, ConfigRecord(run), timeout=cfg.round_timeout, gated=purpose is not None
    )
    records = screen_statistics(stats, result=result, audit=audit)
    guard = None
    if dp is not None and ledger is not None:
        guard = BudgetGuard(dp, ledger, run_id)
        try:
            for entry in guard.reconcile(stats.privacy):
                if audit is not None:
                    audit.ledger_entry(entry)
        except FedCrmError as exc:
            raise FederationStopped(
                f"federated statistics: the branches' spends could not be reconciled with the "
                f"privacy ledger, stopping before round 1: {exc}",
                result,
            ) from exc
    if check_statistics is not None:
        check_statistics(records)
    result.statistics = task.combine_statistics(settings, records)
    arrays = ArrayRecord(
        {n: Array(a) for n, a in task.initial_arrays(settings, seed=cfg.seed).items()}
    )
    best_score, best, first = -math.inf, arrays, 1
    resumed = None if checkpoints is None else checkpoints.load()
    if resumed is not None:
        _check_resumable(resumed, cfg)
        # The model was trained with the statistics of the first start (the churn scaler).
        result.statistics = resumed.statistics
        arrays, best, best_score = resumed.arrays, resumed.best, resumed.best_score
        result.rounds, result.best_round = resumed.rounds, resumed.best_round
        first = resumed.last_round + 1
        logger.info("resuming run %s after round %d", run_id, resumed.last_round)
    inner = build_strategy(
        cfg.strategy,
        num_nodes=len(nodes),
        evaluate_metrics=partial(task.aggregate_evaluation, settings),
        fraction_train=cfg.fraction_train,
        proximal_mu=cfg.proximal_mu,
        server_lr=cfg.server_lr,
    )
    strategy = ValidatedStrategy(wrap_strategy(inner) if wrap_strategy else inner)
    config = ConfigRecord({**run, **result.statistics})
    selection = task.selection_metric(settings)
    label, headline = task.headline(settings)
    try:
        for rnd in range(first, cfg.num_rounds + 1):
            start = time.perf_counter()
            before = len(strategy.rejections)
            try:
                messages = list(
                    strategy.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid)
                )
            except CentralBudgetExhausted as exc:
                raise FederationStopped(
                    f"{exc}; stopping the run (the refusal is in the privacy ledger)", result
                ) from exc
            if guard is not None:
                messages = guard.send_ledger_spends(messages)
            replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
            received = len(replies)
            needed = min(cfg.min_train_nodes, len(messages))
            refused: list[str] = []
            privacy: dict[str, float] = {}
            consent: dict[str, float] = {}
            if purpose is not None:
                replies, refused, consent = screen_consent(
                    rnd,
                    replies,
                    needed=needed,
                    audit=audit,
                    result=result,
                    rejections=strategy.rejections,
                )
            if dp is not None:
                replies, budget_refused, privacy = screen_privacy(
                    rnd,
                    replies,
                    needed=needed,
                    ledger=ledger,
                    run_id=run_id,
                    audit=audit,
                    result=result,
                    rejections=strategy.rejections,
                    guard=guard,
                )
                refused += budget_refused
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is None:
                raise FedCrmError(f"round {rnd}: no usable branch update; stopping the run")
            arrays = new_arrays
            eval_metrics = strategy.aggregate_evaluate(
                rnd,
                grid.send_and_receive(
                    strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid),
                    timeout=cfg.round_timeout,
                ),
            )
            record = RoundRecord(
                round=rnd,
                seconds=time.perf_counter() - start,
                train_replies=received,
                train=_plain(train_metrics),
                evaluate=_plain(eval_metrics),
                rejected=[r.reason for r in strategy.rejections[before:]],
                refused=refused,
                privacy=privacy,
                consent=consent,
            )
            result.rounds.append(record)
            # Model selection on the branches' validation rows only (never on test rows).
            score = float(record.evaluate.get(selection, math.nan)) if selection else math.nan
            if math.isfinite(score) and score > best_score:
                best_score, best, result.best_round = score, arrays, rnd
            logger.info(
                "round %d: %s %.4f (%d updates, %.2f s)",
                rnd,
                label,
                float(record.evaluate.get(headline, math.nan)),
                len(replies),
                record.seconds,
            )
            if checkpoints is not None:
                checkpoints.save(
                    last_round=rnd,
                    arrays=arrays,
                    best=best,
                    best_round=result.best_round,
                    best_score=best_score,
                    statistics=result.statistics,
                    rounds=result.rounds,
                )
            if on_round is not None:
                on_round(record)
    finally:
        result.rejections = list(strategy.rejections)
    if result.best_round == 0:  # no selection metric, or it is undefined: the last round
        best, result.best_round = arrays, cfg.num_rounds
    result.arrays = _released(best)
    return result
