"""Homomorphically encrypted FedAvg: the server adds CKKS ciphertexts and never decrypts.

Protocol (one round ``t``; the branch side is :class:`fedcrm.client.he_mod.HEMod`)::

    server -> branch   round 1: the initial model in plaintext (public: seeded initialisation)
                       round t > 1: the encrypted aggregate A_{t-1} and its count N_{t-1}
    branch             w_{t-1} = w_{t-2} + decrypt(A_{t-1}) / N_{t-1}      (kept in Context.state)
                       trains w_k from w_{t-1}; sends enc(n_k * (w_k - w_{t-1})) and n_k
    server             A_t = sum_k enc(n_k * delta_k),  N_t = sum_k n_k   (public context only)
    server -> branch   evaluate: A_t, N_t; the branch applies it and evaluates w_t locally

So ``decrypt(A_t) / N_t`` is FedAvg's weighted mean of the deltas, and
``w_t = w_{t-1} + that`` is FedAvg's weighted mean of the branch models. The server's
"model" (what it stores and hands to ``configure_*``) is a *ciphertext checkpoint*: an
``ArrayRecord`` holding the serialized aggregate, its count and its round
(:func:`checkpoint_record`). Whoever holds the secret key and the initial model can replay the
chain of checkpoints into the plaintext model (:func:`replay_global_model`): the branches do it
round by round; in a simulation the researcher does it once at the end.

Implementation based on McMahan et al., "Communication-Efficient Learning of Deep Networks
from Decentralized Data" (arXiv:1602.05629) for the weighted mean, and on NVIDIA FLARE's
TenSEAL filters for the key custody (branches hold the secret key, the server only adds).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedcrm.exceptions import ConfigError
from fedcrm.privacy.he import (
    ContextKindError,
    EncryptedUpdate,
    HEContext,
    HEError,
    SumEngine,
    check_update,
    decrypt,
    sum_encrypted,
)
from fedcrm.wire import (
    HE_AGGREGATE,
    HE_COUNT,
    HE_KEY_ID,
    HE_RECORD,
    HE_ROUND,
    HE_UPDATE,
    FloatArrays,
    apply_aggregate,
)

__all__ = [
    "Checkpoint",
    "HEAggregation",
    "HERejection",
    "checkpoint_record",
    "parse_checkpoint",
    "replay_global_model",
]

logger = logging.getLogger(__name__)

# Names inside a ciphertext checkpoint ArrayRecord.
_CKPT_CIPHERTEXT: Final = "he-ciphertext"
_CKPT_COUNT: Final = "he-count"
_CKPT_ROUND: Final = "he-round"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A ciphertext checkpoint: the encrypted delta sum of one round and its example count."""

    server_round: int
    count: int
    ciphertext: bytes


def checkpoint_record(checkpoint: Checkpoint) -> ArrayRecord:
    """The ``ArrayRecord`` form the server keeps and hands to ``configure_*`` (no plaintext)."""
    return ArrayRecord(
        {
            _CKPT_CIPHERTEXT: Array(np.frombuffer(checkpoint.ciphertext, dtype=np.uint8)),
            _CKPT_COUNT: Array(np.array([checkpoint.count], dtype=np.int64)),
            _CKPT_ROUND: Array(np.array([checkpoint.server_round], dtype=np.int64)),
        }
    )


def parse_checkpoint(record: ArrayRecord) -> Checkpoint | None:
    """The checkpoint in ``record``, or ``None`` when it is a plaintext model (round 1)."""
    if _CKPT_CIPHERTEXT not in record:
        return None
    return Checkpoint(
        server_round=int(record[_CKPT_ROUND].numpy()[0]),
        count=int(record[_CKPT_COUNT].numpy()[0]),
        ciphertext=record[_CKPT_CIPHERTEXT].numpy().tobytes(),
    )


def replay_global_model(
    initial: FloatArrays, checkpoints: Sequence[Checkpoint], secret: HEContext
) -> dict[str, npt.NDArray[np.floating]]:
    """Rebuild the plaintext global model from the initial model and the chain of checkpoints.

    Args:
        initial: The round-0 model (public: seeded initialisation).
        checkpoints: Rounds 1..t in order.
        secret: A secret context (a branch's, or the key authority's in a simulation).

    Raises:
        ValueError: The checkpoints are not consecutive rounds from 1.
        HEError: A checkpoint does not decrypt under ``secret``.
    """
    model = {name: np.asarray(a) for name, a in initial.items()}
    for expected, ckpt in enumerate(checkpoints, start=1):
        if ckpt.server_round != expected:
            raise ValueError(f"checkpoint of round {ckpt.server_round} where {expected} is due")
        total = decrypt(secret, EncryptedUpdate.from_bytes(ckpt.ciphertext))
        model = apply_aggregate(model, total, ckpt.count)
    return model


# --------------------------------------------------------------------------------------------
# The server-side wrapper
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HERejection:
    """An encrypted update left out of the sum, and why."""

    server_round: int
    node_id: int
    reason: str


class HEAggregation(Strategy):
    """Wrap FedAvg (or FedProx) so that the server only adds CKKS ciphertexts.

    The inner strategy keeps node sampling, the round config (FedProx's ``proximal-mu``), the
    training-metric and evaluation-metric aggregation; this wrapper replaces the model by a
    ciphertext checkpoint and the weighted mean by a ciphertext sum, as Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` wraps a strategy.

    Args:
        strategy: A plain ``FedAvg`` or ``FedProx``. Anything that reads plaintext updates on
            the server (FedAdam/FedYogi/FedAdagrad, Krum, median, trimmed mean, server-side DP
            wrappers) is refused: see :mod:`fedcrm.strategies.guardrails`.
        public_context: The server's context; it must be public-only.
        engine: How ciphertexts are added (``fedcrm.privacy.he.sum_encrypted``).
        checkpoint_dir: If given, every round's ciphertext checkpoint is written there
            (``round-NNNN.fche`` plus its count): the server's only stored model.
        min_summands: The fewest updates a released sum may hold; with fewer valid updates
            the round's sum is neither stored nor released (distributed DP's ``K_min``, see
            :mod:`fedcrm.strategies.distributed_dp`).

    Raises:
        ContextKindError: ``public_context`` holds a secret key.
        ConfigError: ``strategy`` is not FedAvg or FedProx.

    Notes:
        Validation: the outer :class:`fedcrm.strategies.validated.ValidatedStrategy` cannot
        compare ciphertext replies with the model's plaintext shapes, so it defers to
        :meth:`check_reply`, which checks the envelope (key id and generation, CKKS parameter
        fingerprint, length and chunk count, CRCs) and the example count. Ciphertexts whose
        coefficients are out of range are found while summing; that update is left out and
        the rest summed again (the inputs are never modified). NaN or magnitude checks on the
        values themselves cannot be done on ciphertexts: the branch mod refuses to encrypt
        non-finite or out-of-range values, and CKKS gives no integrity against a malicious
        branch (a robust aggregator would need plaintext; see the guardrails).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        public_context: HEContext,
        engine: SumEngine = "numpy",
        checkpoint_dir: Path | None = None,
        min_summands: int = 1,
    ) -> None:
        if not isinstance(strategy, FedAvg) or type(strategy) not in (FedAvg, FedProx):
            raise ConfigError(
                f"HE aggregation wraps FedAvg or FedProx only, got {type(strategy).__name__}: "
                "the server holds ciphertexts and can only add them (see "
                "fedcrm.strategies.guardrails for the alternatives)"
            )
        if not public_context.is_public():
            raise ContextKindError(
                "the HE aggregation server was given a context holding the secret key; load "
                "the public context (fedcrm.privacy.keys.load_public_context) instead"
            )
        self.inner: FedAvg = strategy
        self.context = public_context
        self.engine: SumEngine = engine
        self.checkpoint_dir = checkpoint_dir
        self.min_summands = min_summands
        self.checkpoints: list[Checkpoint] = []
        self.rejections: list[HERejection] = []
        self.initial: dict[str, npt.NDArray[np.floating]] | None = None
        """The round-0 model the branches start from (public), for :func:`replay_global_model`."""
        self._length: int | None = None

    # ------------------------------------------------------------------ messages to branches

    def summary(self) -> None:
        """Log the wrapper's settings, then the inner strategy's summary."""
        logger.info(
            "HEAggregation: CKKS N=%d, key %s... (generation %d), %s summation, wrapping %s",
            self.context.params.poly_modulus_degree,
            self.context.key_id[:12],
            self.context.generation,
            self.engine,
            type(self.inner).__name__,
        )
        self.inner.summary()

    def _he_messages(self, messages: Iterable[Message], arrays: ArrayRecord) -> list[Message]:
        checkpoint = parse_checkpoint(arrays)
        he_fields: dict[str, int | str | bytes] = {HE_KEY_ID: self.context.key_id}
        if checkpoint is None:
            if self.initial is None:
                self.initial = {name: arrays[name].numpy() for name in arrays}
                self._length = sum(int(a.size) for a in self.initial.values())
            he_fields[HE_ROUND] = 0
        else:
            he_fields |= {
                HE_ROUND: checkpoint.server_round,
                HE_AGGREGATE: checkpoint.ciphertext,
                HE_COUNT: checkpoint.count,
            }
        out = []
        for msg in messages:
            content = RecordDict(
                {
                    key: value
                    for key, value in msg.content.items()
                    if not (checkpoint is not None and key == self.inner.arrayrecord_key)
                }
            )
            content[HE_RECORD] = ConfigRecord(dict(he_fields))
            out.append(
                Message(
                    content=content,
                    dst_node_id=msg.metadata.dst_node_id,
                    message_type=msg.metadata.message_type,
                )
            )
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample through the inner strategy; send the initial model or the last aggregate."""
        return self._he_messages(
            self.inner.configure_train(server_round, arrays, config, grid), arrays
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send this round's aggregate; branches decrypt, apply and evaluate locally."""
        return self._he_messages(
            self.inner.configure_evaluate(server_round, arrays, config, grid), arrays
        )

    # ------------------------------------------------------------------ replies

    def _parse(self, reply: Message) -> tuple[EncryptedUpdate, int]:
        """The reply's encrypted update and count; raises ``ValueError``/``HEError`` if bad."""
        if reply.has_error():
            raise ValueError(f"branch reported an error: {reply.error.reason}")
        content = reply.content
        if HE_RECORD not in content.config_records:
            raise ValueError(f"no {HE_RECORD!r} ConfigRecord: not an encrypted update")
        if content.array_records:
            raise ValueError("the reply carries plaintext arrays; refusing it under HE")
        metrics = content.metric_records
        if len(metrics) != 1:
            raise ValueError("expected exactly one MetricRecord")
        count = next(iter(metrics.values())).get(self.inner.weighted_by_key)
        if isinstance(count, bool) or not isinstance(count, int | float) or not count > 0:
            raise ValueError(f"{self.inner.weighted_by_key} must be > 0, got {count!r}")
        if not float(count).is_integer():
            raise ValueError(f"{self.inner.weighted_by_key} must be a whole number, got {count}")
        wire = content.config_records[HE_RECORD].get(HE_UPDATE)
        if not isinstance(wire, bytes):
            raise ValueError(f"{HE_UPDATE!r} missing or not bytes")
        update = EncryptedUpdate.from_bytes(wire)
        check_update(self.context, update)
        if update.summands != 1:
            raise ValueError(f"a branch update must be one encryption, got {update.summands}")
        if self._length is not None and update.length != self._length:
            raise ValueError(f"{update.length} values, the model has {self._length}")
        return update, int(count)

    def check_reply(self, server_round: int, reply: Message) -> str | None:
        """Why ``reply`` cannot enter the encrypted sum, or ``None`` (ValidatedStrategy hook)."""
        del server_round
        try:
            self._parse(reply)
        except (ValueError, HEError) as exc:
            return str(exc)
        return None

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        logger.warning(
            "round %d: encrypted update of node %d left out: %s", server_round, node, reason
        )
        self.rejections.append(HERejection(server_round, node, reason))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sum the valid encrypted updates and their counts; return a ciphertext checkpoint."""
        good: list[tuple[Message, EncryptedUpdate, int]] = []
        for reply in replies:
            try:
                update, count = self._parse(reply)
            except (ValueError, HEError) as exc:
                self._reject(server_round, reply.metadata.src_node_id, str(exc))
                continue
            good.append((reply, update, count))
        total: EncryptedUpdate | None = None
        while good:
            try:
                total = sum_encrypted(self.context, [u for _, u, _ in good], engine=self.engine)
                break
            except HEError as exc:
                if exc.index is None:
                    raise
                bad, _, _ = good.pop(exc.index)
                self._reject(server_round, bad.metadata.src_node_id, str(exc))
        if total is None:
            return None, None
        if len(good) < self.min_summands:
            logger.warning(
                "round %d: only %d encrypted updates could be summed, fewer than the %d "
                "required; the sum is neither stored nor released",
                server_round,
                len(good),
                self.min_summands,
            )
            return None, None
        checkpoint = Checkpoint(server_round, sum(c for _, _, c in good), total.to_bytes())
        self._store(checkpoint)
        metrics = self.inner.train_metrics_aggr_fn(
            [RecordDict({"m": next(iter(r.content.metric_records.values()))}) for r, _, _ in good],
            self.inner.weighted_by_key,
        )
        logger.info(
            "round %d: summed %d encrypted updates (%d examples, %d B checkpoint)",
            server_round,
            len(good),
            checkpoint.count,
            len(checkpoint.ciphertext),
        )
        return checkpoint_record(checkpoint), metrics

    def _store(self, checkpoint: Checkpoint) -> None:
        self.checkpoints = [c for c in self.checkpoints if c.server_round < checkpoint.server_round]
        self.checkpoints.append(checkpoint)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            stem = self.checkpoint_dir / f"round-{checkpoint.server_round:04d}"
            stem.with_suffix(".fche").write_bytes(checkpoint.ciphertext)
            stem.with_suffix(".count").write_text(f"{checkpoint.count}\n", encoding="utf-8")

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegate: evaluation replies carry metrics only."""
        return self.inner.aggregate_evaluate(server_round, replies)
