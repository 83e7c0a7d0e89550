"""The branch's Flower ClientApp, for every task: statistics, local training and evaluation.

The run's task and settings come with every server message (``task`` and the task's keys);
where the branch's data lives comes from its own node config (``data-path``, ``key-path``), or,
in a simulation, from its folder ``branches/NNN/`` of the run (`fedcrm.client.source`).

Every message of a run that declares a purpose (``consent-purpose``) first goes through the
branch's consent gate (`fedcrm.client.consent_gate`): only customers with valid consent for the
purpose are used, a training reply carries the round manifest's root, and a branch whose data or
consent does not cover the purpose refuses the run (a structured refusal, no parameters).

In a DP run (the train message carries ``dp-target-epsilon``) the branch trains with DP-SGD
under its own enforced budget (`fedcrm.client.dp_round`); its accountants live in
``privacy-dir`` (node config; default ``privacy/`` in the branch's folder; a simulation's
shared privacy store). A round over budget
is answered with a refusal report and no parameters. Nothing is raised across the network: a
failure is an error reply whose code is a `fedcrm.exceptions.ErrorCode`.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedcrm import wire as k
from fedcrm.client import dp_round
from fedcrm.client.central_dp_mod import central_clipping_mod
from fedcrm.client.consent_gate import GateResult, apply_gate, commit_round, exclude
from fedcrm.client.he_mod import HEMod
from fedcrm.client.secagg_client import secagg_mod
from fedcrm.client.source import branch_privacy, resolve_consent, resolve_source
from fedcrm.compliance import Purpose
from fedcrm.compliance.manifest import ConsentRefusal, ExclusionReason, RoundManifest
from fedcrm.exceptions import ConfigError, ErrorCode, FedCrmError
from fedcrm.privacy import DPSGDConfig
from fedcrm.tasks import Arrays, BranchSource, RoundContext, Task, get_task
from fedcrm.tasks.registry import DEFAULT_TASK

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunMessage:
    """The run-level part of a server message (everything but the task's own settings).

    Attributes:
        task: The run's task.
        seed: The run's seed.
        server_round: The round (0: the statistics query).
        num_rounds: Planned rounds (DP noise is planned for all of them).
        run_id: The run's id (it names the branch's archived round manifests).
        purpose: The run's declared purpose; ``None``: the run is not consent-gated.
        dp: DP-SGD settings of the run; ``None``: no DP.
    """

    task: Task[Any, Any]
    seed: int
    server_round: int
    num_rounds: int
    run_id: str
    purpose: Purpose | None
    dp: DPSGDConfig | None

    @classmethod
    def from_config(cls, config: ConfigRecord) -> "RunMessage":
        """Parse and type-check the run-level keys.

        Raises:
            ConfigError: A key has the wrong type or names an unknown task or purpose.
        """

        def integer(key: str, default: int) -> int:
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
            return value

        purpose = config.get(k.KEY_CONSENT_PURPOSE)
        if purpose is not None:
            try:
                purpose = Purpose(str(purpose))
            except ValueError as exc:
                raise ConfigError(f"unknown run purpose {purpose!r}") from exc
        return cls(
            task=get_task(str(config.get(k.KEY_TASK, DEFAULT_TASK))),
            seed=integer(k.KEY_SEED, 42),
            server_round=integer(k.KEY_SERVER_ROUND, 0),
            num_rounds=integer(k.KEY_NUM_ROUNDS, 1),
            run_id=str(config.get(k.KEY_RUN_ID, "run")),
            purpose=purpose,
            dp=DPSGDConfig.from_run_config(config),
        )


@dataclass(frozen=True)
class Prepared:
    """A message's settings, the branch and its (consent-gated) data."""

    run: RunMessage
    settings: Any
    source: BranchSource
    data: Any
    ctx: RoundContext
    manifest: RoundManifest | None


def _error(msg: Message, code: ErrorCode, reason: str) -> Message:
    logger.error("%s", reason)
    return Message(Error(code=int(code), reason=reason), reply_to=msg)


def _refusal_reply(msg: Message, refusal: ConsentRefusal, *, train: bool) -> Message:
    """Refuse the run: a structured refusal for training and statistics, else an Error.

    The coordinator records and audits the structured refusal of a training round or of the
    statistics query; an evaluation reply carries an Error.
    """
    logger.warning("consent gate: the branch refuses the run: %s", refusal.reason)
    if train or msg.metadata.message_type.startswith(MessageType.QUERY):
        record = ConfigRecord(refusal.to_record())  # type: ignore[arg-type]
        return Message(RecordDict({k.CONSENT: record}), reply_to=msg)
    reason = f"consent: {refusal.code}: {refusal.reason}"
    return Message(Error(code=int(ErrorCode.CONSENT_REFUSED), reason=reason), reply_to=msg)


def _arrays(msg: Message) -> Arrays:
    record = msg.content.array_records[k.ARRAYS]
    return {name: record[name].numpy() for name in record}


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def make_client_app(
    branches_root: Path | None = None,
    *,
    simulation: object | None = None,
    mods: Sequence[Mod] = (),
    consent_db: str | None = None,
) -> ClientApp:
    """Build the ClientApp (every task: the server's message names the run's task).

    Args:
        branches_root: The simulation's ``branches/`` folder (``None`` in a deployment).
        simulation: The simulated federation's data handle (`fedcrm.tasks.SimulatedFederation`).
        mods: Flower mods wrapped around every handler (e.g. encrypt-before-send).
        consent_db: The simulated branches' consent registry (the run's compliance store);
            a deployed branch names its own with node config ``consent-db``.
    """
    app = ClientApp(mods=list(mods))

    def prepare(msg: Message, context: Context, *, train: bool = False) -> Prepared | Message:
        """Settings and data of a message, consent-gated when the run declares a purpose.

        Returns the prepared round, or instead the reply of a branch that cannot serve the
        message (bad settings or data, a consent refusal, an unreachable registry).
        """
        torch.set_num_threads(1)  # simulated branches share the machine's cores
        config = msg.content.config_records[k.CONFIG]
        try:
            run = RunMessage.from_config(config)
            settings = run.task.settings(config, where="server message", strict=False)
            source = resolve_source(context, branches_root, simulation)
            data = run.task.load(source, settings, seed=run.seed)
        except FedCrmError as exc:
            return _error(msg, ErrorCode.BRANCH_DATA_FAILED, f"branch data not usable: {exc}")
        ctx = RoundContext(
            server_round=run.server_round,
            seed=run.seed + 1000 * run.server_round + source.number % 1000,
            run_seed=run.seed,
            config=dict(config),
            state=context.state,
            folder=source.folder,
        )
        gate: GateResult | None = None
        if run.purpose is not None:
            try:
                consent = resolve_consent(context, source, consent_db)
                decided = apply_gate(
                    data.subjects(),
                    purpose=run.purpose,
                    consent=consent,
                    at=datetime.now(UTC),
                )
            except FedCrmError as exc:
                return _error(msg, ErrorCode.CONSENT_GATE_FAILED, f"consent gate not run: {exc}")
            if isinstance(decided, ConsentRefusal):
                return _refusal_reply(msg, decided, train=train)
            gate = decided
            data = data.keep(gate.kept)
        if train and run.dp is not None and run.dp.customer_budget is not None:
            try:
                over = dp_round.over_customer_budget(
                    run.task,
                    data,
                    settings,
                    ctx,
                    dp=run.dp,
                    rounds=run.num_rounds,
                    where=branch_privacy(context, source),
                )
            except FedCrmError as exc:
                return _error(msg, ErrorCode.DP_ROUND_FAILED, f"privacy filter not run: {exc}")
            if over >= set(data.subjects()["train"]):
                reason = (
                    f"privacy filter: every training customer's own epsilon would pass the "
                    f"customer budget {run.dp.customer_budget:g}; nothing is trained"
                )
                return _error(msg, ErrorCode.DP_ROUND_FAILED, reason)
            if over:
                logger.info("privacy filter: %d customer(s) left out of this round", len(over))
                data = data.keep(set().union(*data.subjects().values()) - over)
                if gate is not None:  # the manifest says so
                    gate = exclude(gate, over, ExclusionReason.PRIVACY_BUDGET)
        manifest = None
        if train and gate is not None:
            manifest = commit_round(
                gate, consent=consent, run_id=run.run_id, server_round=run.server_round
            )
        return Prepared(run, settings, source, data, ctx, manifest)

    def with_manifest(reply: Message, manifest: RoundManifest | None) -> Message:
        """Attach the round manifest (root and counts, never ids) to a training reply."""
        if manifest is not None and not reply.has_error():
            record = ConfigRecord(manifest.to_record())  # type: ignore[arg-type]
            reply.content.config_records[k.CONSENT] = record
        return reply

    @app.query(k.ACTION_STATISTICS)
    def query_statistics(msg: Message, context: Context) -> Message:
        p = prepare(msg, context)
        if isinstance(p, Message):
            return p
        values = {
            **p.run.task.statistics(p.data, p.settings),
            k.KEY_NUM_EXAMPLES: p.data.num_examples,
        }
        content = RecordDict({k.METRICS: MetricRecord(values)})
        if p.run.dp is not None:
            try:
                state = dp_round.privacy_state(
                    p.run.task,
                    p.data,
                    p.settings,
                    p.ctx,
                    dp=p.run.dp,
                    rounds=p.run.num_rounds,
                    where=branch_privacy(context, p.source),
                )
            except FedCrmError as exc:
                return _error(msg, ErrorCode.DP_ROUND_FAILED, f"privacy state unreadable: {exc}")
            content.config_records[k.PRIVACY_STATE] = ConfigRecord(state)  # type: ignore[arg-type]
        return Message(content, reply_to=msg)

    def train_private(msg: Message, context: Context, p: Prepared, dp: DPSGDConfig) -> Message:
        where = branch_privacy(context, p.source)
        try:
            out = dp_round.private_round(
                p.run.task,
                p.data,
                _arrays(msg),
                p.settings,
                p.ctx,
                dp=dp,
                rounds=p.run.num_rounds,
                where=where,
                run_id=p.run.run_id,
            )
        except FedCrmError as exc:
            return _error(msg, ErrorCode.DP_ROUND_FAILED, f"DP round not run: {exc}")
        report = out.report
        privacy = ConfigRecord(report.to_record())  # type: ignore[arg-type]
        if out.update is None:  # refused: nothing trained, nothing but the report leaves
            return Message(RecordDict({k.PRIVACY: privacy}), reply_to=msg)
        metrics = MetricRecord(
            {
                k.KEY_NUM_EXAMPLES: out.update.num_examples,
                k.KEY_DP_EPSILON_ROUND: report.epsilon_round,
                k.KEY_DP_EPSILON: report.epsilon,
                k.KEY_DP_SIGMA: report.noise_multiplier,
                k.KEY_DP_SAMPLE_RATE: report.sample_rate,
                k.KEY_DP_STEPS: report.steps,
                k.KEY_DP_DELTA_USED: report.delta,
            }
        )
        arrays = _record(out.update.arrays)
        content = RecordDict({k.ARRAYS: arrays, k.METRICS: metrics, k.PRIVACY: privacy})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        p = prepare(msg, context, train=True)
        if isinstance(p, Message):
            return p
        if p.run.dp is not None:
            return with_manifest(train_private(msg, context, p, p.run.dp), p.manifest)
        try:
            update = p.run.task.train(p.data, _arrays(msg), p.settings, p.ctx)
        except FedCrmError as exc:
            return _error(msg, ErrorCode.BRANCH_DATA_FAILED, f"training not run: {exc}")
        metrics = MetricRecord({k.KEY_NUM_EXAMPLES: update.num_examples, **update.metrics})
        content = RecordDict({k.ARRAYS: _record(update.arrays), k.METRICS: metrics})
        return with_manifest(Message(content, reply_to=msg), p.manifest)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        p = prepare(msg, context)
        if isinstance(p, Message):
            return p
        try:
            values = p.run.task.evaluate(p.data, _arrays(msg), p.settings, p.ctx)
        except FedCrmError as exc:
            return _error(msg, ErrorCode.BRANCH_DATA_FAILED, f"evaluation not run: {exc}")
        return Message(RecordDict({k.METRICS: MetricRecord(values)}), reply_to=msg)

    return app


app = make_client_app(mods=[central_clipping_mod, secagg_mod, HEMod()])
"""The ClientApp for Flower's deployment engine (``fedcrm.client.app:app``), every task.

Every mod passes through messages of other modes: SecAgg+ rounds need nothing on the branch, HE
rounds need the branch's key directory in node config ``he-key-dir``, and client-side central DP
clips (as the run config's ``central-dp-mode`` says) only train messages that carry a clipping
norm. The clipping mod comes first, so it is the last to touch the parameters."""
