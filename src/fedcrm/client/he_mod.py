"""The branch side of HE aggregation: a Flower mod that decrypts before and encrypts after.

Place it with ``make_client_app(mods=[HEMod(key_dir)])``. Mod order: **outermost** of the
privacy mods, i.e. first in the list, so that it sees the wire messages: any clipping or
local-DP mod must sit *after* it (inside), where it receives the plaintext model this mod
decrypted and returns the plaintext update this mod then encrypts. Nothing may sit between
it and the network that expects plaintext ArrayRecords.

Incoming (train and evaluate): the server sends the initial model in plaintext (round 0) or
the encrypted aggregate ``A_t`` with its count ``N_t``. The mod keeps the branch's current
global model in ``Context.state`` (it never leaves the node), applies
``w_t = w_{t-1} + decrypt(A_t) / N_t`` once per round, and hands the handler an ordinary
message with ``w_t`` under ``arrays``.

Outgoing (train): the handler's new local model ``w_k`` becomes
``enc(n_k * (w_k - w_t))`` under the round's key; the plaintext ``ArrayRecord`` is removed from
the reply. Evaluate replies (metrics only) pass unchanged.

Distributed DP (``[central-dp] mode = "distributed"``: the round's HE record carries ``z``, ``C``
and ``K_min``, :class:`fedcrm.privacy.DistributedNoise`): the one encrypt path
then runs, in this order, ``delta = w_k - w_t``; clip ``delta`` to L2 norm ``C``; add
``N(0, (z C)^2 / K_min)`` per coordinate from a CSPRNG-seeded generator; weight 1 instead of
``n_k`` (the server's count is then the number of branches); encrypt. The privacy argument is in
docs/privacy-analysis.md#distributed-dp-under-he.

Failures (no or wrong key, a stale base model, a value out of the encryptable range,
ciphertext that does not decrypt) become an error ``Message`` with the reason; nothing is
raised across the network and nothing is sent in plaintext instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError
from fedcrm.privacy import DistributedNoise, secure_generator
from fedcrm.privacy.he import EncryptedUpdate, HEContext, HEError, decrypt, encrypt_update
from fedcrm.privacy.keys import current_generation, load_secret_context
from fedcrm.wire import (
    HE_AGGREGATE,
    HE_COUNT,
    HE_KEY_ID,
    HE_RECORD,
    HE_ROUND,
    HE_UPDATE,
    NODE_HE_KEY_DIR,
    apply_aggregate,
    flatten,
    pre_weight,
)

__all__ = ["HEMod"]

logger = logging.getLogger(__name__)

_STATE_MODEL = "he-global-model"
_STATE_META = "he-global-meta"


class _Refusal(Exception):
    """A precondition failed; the reason goes back to the server in an error Message."""


class HEMod:
    """Flower mod: decrypt the encrypted global model in, encrypt the pre-weighted update out.

    Args:
        key_dir: The key directory from ``fedcrm keys init`` (the branch's copy: it loads the
            current generation's ``secret.tenseal``, mode 0600). ``None``: read it from the
            node config key ``he-key-dir``.
        arrays_key: Record name of the model in messages (``fedcrm.wire.ARRAYS``).
        metrics_key: Record name of the reply metrics.
        weight_key: Metric holding the example count ``n_k`` used as the pre-weight.

    Raises:
        ValueError: ``key_dir`` is given but is not a directory.

    Notes:
        Mod order: first in ``mods`` (outermost; see the module docstring). The secret
        context is loaded once per process and reloaded when a round names another key id
        (after ``fedcrm keys rotate``). The mod is picklable (Ray ships the ClientApp to its
        workers); the loaded context is not pickled.
    """

    def __init__(
        self,
        key_dir: Path | None = None,
        *,
        arrays_key: str = k.ARRAYS,
        metrics_key: str = k.METRICS,
        weight_key: str = k.KEY_NUM_EXAMPLES,
    ) -> None:
        if key_dir is not None and not key_dir.is_dir():
            raise ValueError(f"HE key directory {key_dir} does not exist")
        self.key_dir = key_dir
        self.arrays_key = arrays_key
        self.metrics_key = metrics_key
        self.weight_key = weight_key
        self._context: HEContext | None = None
        self._rng_factory: Callable[[], np.random.Generator] = secure_generator
        """Distributed DP's noise source; replaced by tests only (fixed seeds)."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_context"] = None
        return state

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Run the handler between decryption and encryption; errors become error replies."""
        if HE_RECORD not in msg.content.config_records:
            return call_next(msg, ctxt)
        try:
            fields = msg.content.config_records[HE_RECORD]
            secret = self._secret(ctxt, _field(fields, HE_KEY_ID, str))
            base = self._global_model(msg, ctxt, fields, secret)
            inner = RecordDict({key: rec for key, rec in msg.content.items() if key != HE_RECORD})
            inner[self.arrays_key] = ArrayRecord({n: Array(a) for n, a in base.items()})
            msg.content = inner
            reply = call_next(msg, ctxt)
            if reply.has_error() or msg.metadata.message_type.split(".")[0] != "train":
                return reply
            return self._encrypt_reply(reply, base, secret, DistributedNoise.from_fields(fields))
        except (_Refusal, HEError, ConfigError, ValueError, KeyError, TypeError) as exc:
            reason = f"HE mod: {exc}"
            logger.warning("%s", reason)
            return Message(
                Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
            )

    # ------------------------------------------------------------------ keys

    def _secret(self, ctxt: Context, key_id: str) -> HEContext:
        if self._context is not None and self._context.key_id == key_id:
            return self._context
        folder = self.key_dir
        if folder is None:
            configured = ctxt.node_config.get(NODE_HE_KEY_DIR)
            if not configured:
                raise _Refusal(
                    f"no HE key directory: build the mod with one or set node config "
                    f"{NODE_HE_KEY_DIR!r}"
                )
            folder = Path(str(configured))
        self._context = load_secret_context(current_generation(folder).secret_path)
        if self._context.key_id != key_id:
            raise _Refusal(
                f"the round asks for key {key_id[:12]}..., this branch's current key is "
                f"{self._context.key_id[:12]}... (generation {self._context.generation}): "
                "install the key authority's current generation"
            )
        return self._context

    # ------------------------------------------------------------------ incoming

    def _global_model(
        self, msg: Message, ctxt: Context, fields: ConfigRecord, secret: HEContext
    ) -> dict[str, np.ndarray]:
        rnd = _field(fields, HE_ROUND, int)
        if HE_AGGREGATE not in fields:  # round 0: the public initial model in plaintext
            if self.arrays_key not in msg.content.array_records:
                raise _Refusal("round-0 message without the initial model")
            record = msg.content.array_records[self.arrays_key]
            base = {name: record[name].numpy() for name in record}
            self._save(ctxt, base, rnd)
            return base
        cached, cached_round = self._load(ctxt)
        if cached is not None and cached_round == rnd:
            return cached  # the evaluate message of this round already applied it
        if cached is None or cached_round != rnd - 1:
            have = "no global model" if cached is None else f"the model of round {cached_round}"
            raise _Refusal(
                f"the aggregate of round {rnd} applies to the model of round {rnd - 1}, but this "
                f"branch holds {have}: it missed a round (rejoin the federation from round 1)"
            )
        aggregate = _field(fields, HE_AGGREGATE, bytes)
        count = _field(fields, HE_COUNT, int)
        total = decrypt(secret, EncryptedUpdate.from_bytes(aggregate))
        model = apply_aggregate(cached, total, count)
        self._save(ctxt, model, rnd)
        return model

    def _save(self, ctxt: Context, model: dict[str, np.ndarray], rnd: int) -> None:
        ctxt.state[_STATE_MODEL] = ArrayRecord(
            {n: Array(np.ascontiguousarray(a)) for n, a in model.items()}
        )
        ctxt.state[_STATE_META] = ConfigRecord({HE_ROUND: rnd})

    def _load(self, ctxt: Context) -> tuple[dict[str, np.ndarray] | None, int]:
        if _STATE_MODEL not in ctxt.state.array_records:
            return None, -1
        record = ctxt.state.array_records[_STATE_MODEL]
        meta = ctxt.state.config_records[_STATE_META]
        return {name: record[name].numpy() for name in record}, _field(meta, HE_ROUND, int)

    # ------------------------------------------------------------------ outgoing

    def _encrypt_reply(
        self,
        reply: Message,
        base: dict[str, np.ndarray],
        secret: HEContext,
        noise: DistributedNoise | None,
    ) -> Message:
        content = reply.content
        if self.arrays_key not in content.array_records:
            return reply  # nothing to encrypt (e.g. a branch whose DP budget refused the round)
        if self.metrics_key not in content.metric_records:
            raise _Refusal(f"the train handler's reply lacks {self.metrics_key!r}")
        metrics = content.metric_records[self.metrics_key]
        count = metrics.get(self.weight_key)
        if isinstance(count, bool) or not isinstance(count, int | float) or not count > 0:
            raise _Refusal(f"{self.weight_key} must be > 0 to weight the update, got {count!r}")
        record = content.array_records[self.arrays_key]
        local = {name: record[name].numpy() for name in base}
        delta = flatten(local) - flatten(base)
        if noise is None:
            plain = pre_weight(delta, count)
        else:  # distributed DP: clip to C, add this branch's noise share, weight 1
            plain = pre_weight(noise.privatize(delta, rng=self._rng_factory()), 1.0)
        update = encrypt_update(secret, plain, key_id=secret.key_id)
        # Every other record (metrics, a DP privacy report) passes; the plaintext model does not.
        out = RecordDict({key: rec for key, rec in content.items() if key != self.arrays_key})
        out[HE_RECORD] = ConfigRecord({HE_UPDATE: update.to_bytes(), HE_KEY_ID: secret.key_id})
        reply.content = out
        return reply


def _field(record: ConfigRecord, key: str, kind: type[Any]) -> Any:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise _Refusal(f"HE field {key!r}: expected {kind.__name__}, got {type(value).__name__}")
    return value
