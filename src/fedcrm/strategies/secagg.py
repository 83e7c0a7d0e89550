"""SecAgg+ secure aggregation: the server sees only the sum of masked, quantized updates.

Flower's SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020, doi:10.1145/3372297.3417885) runs in flwr 1.41 only through the legacy
workflow API (``SecAggPlusWorkflow`` on a ``LegacyContext``; ``secaggplus_mod`` on the branch).
:class:`SecAggPlusAggregation` confines that API to one training step: it wraps the same
Message-API strategy as a plaintext run (FedAvg, FedProx, FedAdam), so sampling, the round
loop, evaluation and model selection stay those of :func:`fedcrm.server.federation.run_federation`.

One round ``t``::

    inner.configure_train      which branches train, with which config (plaintext path)
    SecAggPlusWorkflow         setup -> share keys -> collect masked vectors -> unmask
                               (each branch trains in "collect masked vectors": the ClientApp's
                               own train handler, behind fedcrm.client.secagg_client)
    inner.aggregate_train      on one reply holding the unmasked weighted mean and the
                               survivors' summed count (FedAdam's server step works on it)

``configure_train`` therefore runs the whole protocol on the grid and returns no further
message; ``aggregate_train`` hands the unmasked result to the inner strategy. Branches that fail
or drop out during the protocol are left out of the sum (their pairwise masks are reconstructed
from the survivors' Shamir shares) and reported through :meth:`take_rejections`.

Quantization: each branch sends ``round((clip(w * r, -c, c) + c) * Q / 2c)`` with
``r = round(n / max_weight * Q) / Q``; the unmasked sum decodes to the weighted mean within
:func:`quantization_error_bound`. Branches refuse (and so drop out of) a round whose update
would be clipped, rather than let clipping bias the mean silently.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, cast

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.strategies._grid import DelegatingGrid
from fedcrm.strategies.validated import Rejection

__all__ = [
    "RUN_CONFIG_KEYS",
    "SecAggConfig",
    "SecAggPlusAggregation",
    "SecAggRound",
    "quantization_error_bound",
]

logger = logging.getLogger(__name__)


_MAX_MODULUS: Final = 2**32
"""Flower's masks are drawn below 2**32 (``modulus_range`` must not exceed it)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ protocol and quantization settings (``secagg-*`` keys of ``[aggregation]``).

    Attributes:
        num_shares: Shares each branch's secrets are split into (its neighbours, itself
            included): an odd integer >= 3, or a fraction in (0, 1] of the sampled branches.
        reconstruction_threshold: Shares needed to rebuild a secret: an integer >= 2 below
            ``num_shares``, or a fraction in (0, 1] of ``num_shares``. Higher: more privacy
            (more neighbours must collude), fewer dropouts tolerated.
        clipping_range: Each weighted parameter ``w * n / max_weight`` is clipped to
            ``[-c, c]`` before quantization; branches refuse a round that would clip.
        quantization_range: Integer levels ``Q`` over ``[-c, c]``.
        modulus_range: Masks are drawn in ``[0, M)``; a power of two, ``Q < M <= 2**32``.
            ``K`` sampled branches need ``K * Q < M`` (else the sum wraps around).
        max_weight: Largest example count a branch may weigh its update by.
    """

    num_shares: int | float = 5
    reconstruction_threshold: int | float = 3
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: float = 1000.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if _is_int(shares):
            if shares < 3 or shares % 2 == 0:
                problems.append(f"secagg-num-shares must be an odd integer >= 3, got {shares}")
        elif not isinstance(shares, float) or not 0 < shares <= 1:
            problems.append(
                f"secagg-num-shares must be an odd integer >= 3 or a fraction in (0, 1], "
                f"got {shares!r}"
            )
        if _is_int(threshold):
            if threshold < 2:
                problems.append(f"secagg-threshold must be >= 2, got {threshold}")
            elif _is_int(shares) and threshold >= shares:
                problems.append(
                    f"secagg-threshold ({threshold}) must be below secagg-num-shares ({shares})"
                )
        elif not isinstance(threshold, float) or not 0 < threshold <= 1:
            problems.append(
                f"secagg-threshold must be an integer >= 2 or a fraction in (0, 1], "
                f"got {threshold!r}"
            )
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            problems.append(f"secagg-clipping-range must be > 0, got {self.clipping_range}")
        if not _is_int(self.quantization_range) or self.quantization_range < 2:
            problems.append(
                f"secagg-quantization-range must be an integer >= 2, got "
                f"{self.quantization_range!r}"
            )
        modulus = self.modulus_range
        if not _is_int(modulus) or modulus < 2 or modulus & (modulus - 1):
            problems.append(f"secagg-modulus-range must be a power of two, got {modulus!r}")
        elif modulus > _MAX_MODULUS:
            problems.append(f"secagg-modulus-range must be <= 2**32, got {modulus}")
        elif _is_int(self.quantization_range) and modulus <= self.quantization_range:
            problems.append(
                f"secagg-modulus-range ({modulus}) must exceed secagg-quantization-range "
                f"({self.quantization_range})"
            )
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            problems.append(f"secagg-max-weight must be > 0, got {self.max_weight}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def max_branches(self) -> int:
        """Most branches one round can sum without wrapping around the modulus."""
        return (self.modulus_range - 1) // self.quantization_range

    def check_capacity(self, branches: int) -> None:
        """Refuse a round of ``branches`` updates whose quantized sum would overflow.

        Raises:
            ConfigError: ``branches * quantization_range >= modulus_range``.
        """
        if branches > self.max_branches:
            raise ConfigError(
                f"SecAgg+ cannot sum {branches} branches: {branches} x secagg-quantization-range "
                f"({self.quantization_range}) must stay below secagg-modulus-range "
                f"({self.modulus_range}), i.e. at most {self.max_branches} branches; lower "
                "secagg-quantization-range"
            )

    def check_weight(self, num_examples: int) -> None:
        """Refuse a branch whose example count exceeds ``max_weight``.

        Raises:
            ConfigError: ``num_examples > max_weight``.
        """
        if num_examples > self.max_weight:
            raise ConfigError(
                f"a branch trains on {num_examples} examples (its FedAvg weight), more than "
                f"secagg-max-weight ({self.max_weight:g}); raise secagg-max-weight to at least "
                f"{num_examples}"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> SecAggConfig:
        """Build from ``secagg-*`` keys (missing keys keep their defaults).

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = _run_key(f.name)
            if key not in run_config:
                continue
            raw = run_config[key]
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ConfigError(f"{key} must be a number, got {raw!r}")
            if f.name in ("quantization_range", "modulus_range"):
                if not float(raw).is_integer():
                    raise ConfigError(f"{key} must be a whole number, got {raw!r}")
                raw = int(raw)
            elif f.name in ("clipping_range", "max_weight"):
                raw = float(raw)
            values[f.name] = raw
        return cls(**values)

    def to_run_config(self) -> dict[str, int | float]:
        """The ``secagg-*`` keys accepted by `from_run_config`."""
        return {_run_key(f.name): getattr(self, f.name) for f in fields(self)}

    def workflow(self, *, timeout: float | None) -> _RecordingWorkflow:
        """Flower's workflow with these settings."""
        return _RecordingWorkflow(
            self.num_shares,
            self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=timeout,
        )


def _run_key(name: str) -> str:
    if name == "reconstruction_threshold":
        return "secagg-threshold"
    return "secagg-" + name.replace("_", "-")


RUN_CONFIG_KEYS: Final = tuple(_run_key(f.name) for f in fields(SecAggConfig))
"""The ``secagg-*`` keys (TOML ``[aggregation]`` and Flower run config)."""


def quantization_error_bound(config: SecAggConfig, counts: Sequence[int]) -> float:
    """Largest per-coordinate error of the decoded weighted mean of ``counts``' branches.

    Each branch's stochastic rounding is off by less than one level (``2c / Q``) of its
    weighted value; the sum is divided by the summed quantized weights ``sum q_k / Q``, so
    the mean is off by less than ``2c * K / sum q_k`` (``q_k = round(n_k / max_weight * Q)``).
    """
    q = [round(n / config.max_weight * config.quantization_range) for n in counts]
    if not q or sum(q) <= 0:
        raise ValueError("no branch with a positive quantized weight")
    return 2 * config.clipping_range * len(q) / sum(q)


@dataclass
class SecAggRound:
    """What the SecAgg+ protocol did in one round (for reports and benchmarks)."""

    server_round: int
    sampled: list[int]
    survivors: list[int] = field(default_factory=list)
    """Nodes whose masked vector entered the sum."""
    completed: bool = False
    """The unmask stage ran to the end (else the round produced no aggregate)."""
    failures: dict[int, str] = field(default_factory=dict)
    """Node id -> why it left the round (an error reply or no reply), first stage only."""


class _TapGrid(DelegatingGrid):
    """Delegate to ``grid``; note which branches fail or miss each protocol stage."""

    def __init__(self, grid: Grid, record: SecAggRound) -> None:
        super().__init__(grid)
        self.record = record

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send one protocol stage and record who failed it."""
        out = list(messages)
        stage = "?"
        if out and RECORD_KEY_CONFIGS in out[0].content.config_records:
            stage = str(out[0].content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
        replies = list(self.grid.send_and_receive(out, timeout=timeout))
        rec = self.record
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error() and node not in rec.failures:
                rec.failures[node] = f"stage {stage}: {reply.error.reason}"
        for msg in out:
            node = msg.metadata.dst_node_id
            if node not in answered and node not in rec.failures:
                rec.failures[node] = f"stage {stage}: no reply within the round timeout"
        return replies


class _RecordingWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, noting whether the unmask stage completed."""

    completed: bool = False

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage (recording starts here)."""
        self.completed = False
        return bool(super().setup_stage(grid, context, state))

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's unmask stage; ``completed`` tells whether it rebuilt the sum."""
        self.completed = bool(super().unmask_stage(grid, context, state))
        return self.completed


@dataclass
class _Unmasked:
    """What the legacy bridge received from the unmask stage."""

    vector: list[np.ndarray]
    counts: dict[int, int]
    losses: dict[int, float]


class _LegacyBridge(LegacyStrategy):
    """The legacy strategy the workflow calls: hands it the Message-API round, keeps the sum.

    ``configure_fit`` turns the inner strategy's train messages into FitIns (same sampling,
    same config, plus the parameter names and the quantization settings the branch checks);
    ``aggregate_fit`` receives every survivor's FitRes carrying the unmasked weighted mean
    and keeps it. Evaluation stays on the Message API.
    """

    def __init__(self, grid: Grid, messages: list[Message], arrays: ArrayRecord, cfg: SecAggConfig):
        self.grid = grid
        self.messages = messages
        self.names = list(arrays.keys())
        self.parameters = ndarrays_to_parameters([arrays[n].numpy() for n in self.names])
        self.cfg = cfg
        self.result: _Unmasked | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Unused (the Message-API loop owns the model)."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One FitIns per train message of the inner strategy."""
        run_id = self.grid.run.run_id
        out: list[tuple[ClientProxy, FitIns]] = []
        for msg in self.messages:
            config: dict[str, Any] = dict(msg.content.config_records.get(k.CONFIG, {}))
            config[k.KEY_PARAM_NAMES] = json.dumps(self.names)
            config[k.KEY_SECAGG_CLIPPING_RANGE] = float(self.cfg.clipping_range)
            config[k.KEY_SECAGG_MAX_WEIGHT] = float(self.cfg.max_weight)
            node = msg.metadata.dst_node_id
            fitins = FitIns(self.parameters, cast(dict[str, Scalar], config))
            out.append((GridClientProxy(node_id=node, grid=self.grid, run_id=run_id), fitins))
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the unmasked mean (every FitRes carries the same one) and the counts."""
        if not results:
            return None, {}
        nodes = [cast(GridClientProxy, proxy).node_id for proxy, _ in results]
        self.result = _Unmasked(
            vector=parameters_to_ndarrays(results[0][1].parameters),
            counts={n: int(res.num_examples) for n, (_, res) in zip(nodes, results, strict=True)},
            losses={
                n: float(cast(float, res.metrics.get(k.KEY_TRAIN_LOSS, math.nan)))
                for n, (_, res) in zip(nodes, results, strict=True)
            },
        )
        return results[0][1].parameters, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Unused: evaluation runs on the Message API."""
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Unused."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No central evaluation (the server holds no data)."""
        return None


class SecAggPlusAggregation(Strategy):
    """Wrap a Message-API strategy; its branches' updates reach it only through SecAgg+.

    Args:
        inner: The optimisation strategy (FedAvg, FedProx, FedAdam) that samples branches
            and applies the aggregate.
        config: Protocol and quantization settings.
        timeout: Seconds each protocol stage waits for replies (``None``: wait for all).
    """

    def __init__(
        self,
        inner: Strategy,
        config: SecAggConfig,
        *,
        timeout: float | None = None,
    ) -> None:
        self.inner = inner
        self.config = config
        self.timeout = timeout
        self.rounds: list[SecAggRound] = []
        self._reply: Message | None = None
        self._rejections: list[Rejection] = []

    def summary(self) -> None:
        """Log the settings, then the inner strategy's summary."""
        logger.info("SecAgg+ aggregation (%s) wrapping %s", self.config, type(self.inner).__name__)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Run the whole SecAgg+ protocol for this round; no further message to send.

        Raises:
            ConfigError: More branches were sampled than the modulus can sum.
        """
        self._reply = None
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        record = SecAggRound(server_round, sorted(m.metadata.dst_node_id for m in messages))
        self.rounds.append(record)
        if len(messages) < 2:
            logger.error("round %d: SecAgg+ needs at least 2 branches", server_round)
            return []
        self.config.check_capacity(len(messages))
        bridge = _LegacyBridge(grid, messages, arrays, self.config)
        base = Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        )
        context = LegacyContext(
            base,
            config=ServerConfig(num_rounds=server_round),
            strategy=bridge,
            client_manager=SimpleClientManager(),
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            bridge.parameters, keep_input=True
        )
        workflow = self.config.workflow(timeout=self.timeout)
        workflow(_TapGrid(grid, record), context)
        unmasked = bridge.result
        record.completed = workflow.completed and unmasked is not None
        survivors = sorted(unmasked.counts) if unmasked is not None else []
        record.survivors = survivors if record.completed else []
        for node in record.sampled:
            if node in record.survivors:
                continue
            reason = record.failures.get(node, "left the SecAgg+ round")
            if not record.completed:
                reason = f"SecAgg+ round did not complete ({reason})"
            self._rejections.append(Rejection(server_round, node, f"SecAgg+: {reason}"))
        if not record.completed or unmasked is None:
            logger.error(
                "round %d: SecAgg+ did not complete (%d of %d branches left): %s",
                server_round,
                len(record.sampled) - len(record.failures),
                len(record.sampled),
                "; ".join(f"node {n}: {r}" for n, r in sorted(record.failures.items())),
            )
            return []
        self._reply = self._mean_reply(messages[0], arrays, bridge.names, unmasked)
        logger.info(
            "round %d: SecAgg+ summed %d of %d branches",
            server_round,
            len(survivors),
            len(messages),
        )
        return []

    @staticmethod
    def _mean_reply(
        template: Message, arrays: ArrayRecord, names: list[str], unmasked: _Unmasked
    ) -> Message:
        total = sum(unmasked.counts.values())
        losses = [
            (unmasked.counts[n], loss) for n, loss in unmasked.losses.items() if math.isfinite(loss)
        ]
        metrics: dict[str, int | float | list[int] | list[float]] = {k.KEY_NUM_EXAMPLES: total}
        if losses:
            metrics[k.KEY_TRAIN_LOSS] = sum(c * v for c, v in losses) / sum(c for c, _ in losses)
        mean = ArrayRecord(
            {
                name: Array(np.asarray(vec, dtype=arrays[name].numpy().dtype))
                for name, vec in zip(names, unmasked.vector, strict=True)
            }
        )
        content = RecordDict({k.ARRAYS: mean, k.METRICS: MetricRecord(metrics)})
        return Message(
            content, dst_node_id=template.metadata.dst_node_id, message_type=MessageType.TRAIN
        )

    def check_reply(self, server_round: int, reply: Message) -> str | None:
        """No per-branch reply reaches the round loop (the protocol consumed them)."""
        return "unexpected train reply outside the SecAgg+ protocol"

    def take_rejections(self) -> list[Rejection]:
        """Branches left out of the last round's sum, and why (then forgotten)."""
        out, self._rejections = self._rejections, []
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the unmasked weighted mean to the inner strategy as its only reply."""
        if self._reply is None:
            return None, None
        reply, self._reply = self._reply, None
        arrays, metrics = self.inner.aggregate_train(server_round, [reply])
        if metrics is not None and self.rounds:
            metrics[k.KEY_SECAGG_SUMMED] = len(self.rounds[-1].survivors)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate (evaluation sends the plaintext global model, as in every mode)."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round, replies)
