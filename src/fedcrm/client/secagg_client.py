"""The branch's side of SecAgg+: Flower's ``secaggplus_mod`` in front of the usual train handler.

Flower's ``secaggplus_mod`` speaks the legacy message format (``fitins.*`` in, ``fitres.*``
out), while the branch's train handler (`fedcrm.client.app`) speaks the Message API. Between
the two sits a thin translation: the legacy FitIns becomes the same train message a plaintext
round sends (named arrays in ``arrays``, settings in ``config``), and the handler's reply
becomes the FitRes the mod quantizes, masks and sends. Training itself is the one code path
of every mode (the task's ``train``).

Before the update leaves, the branch checks it against the round's quantization range: an
update that would be clipped (``|w| * n / max_weight > clipping range``) or a count above
``max_weight`` is refused with an error naming the branch and the round, so the branch drops
out of that round (the survivors' sum still completes) instead of biasing the mean.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedcrm import wire as k
from fedcrm.exceptions import FedCrmError
from fedcrm.wire import KEY_PARAM_NAMES, KEY_SECAGG_CLIPPING_RANGE, KEY_SECAGG_MAX_WEIGHT

__all__ = ["SecAggUpdateRefused", "secagg_mod"]

logger = logging.getLogger(__name__)

_FITINS_CONFIG = "fitins.config"
_FITINS_PARAMS = "fitins.parameters"
"""Record names of a legacy FitIns (``flwr.compat.common.recorddict_compat``)."""


class SecAggUpdateRefused(FedCrmError):
    """The branch's update does not fit the round's SecAgg+ quantization range."""


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's ``secaggplus_mod`` on SecAgg+ train messages; pass everything else on.

    Place it first (outermost) among the ClientApp's mods: the protocol's setup, share-keys
    and unmask stages are answered here and never reach the handler; only the
    collect-masked-vectors stage trains, through the mods after this one.
    """
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: _legacy_train(m, c, call_next))


def _legacy_train(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Translate the legacy FitIns into a Message-API train message and the reply back."""
    # Read the FitIns records directly: compat.recorddict_to_fitins refuses list values (the
    # shared scaler's mean and std), which ConfigRecords carry fine.
    config = dict(msg.content.config_records[_FITINS_CONFIG])
    names = json.loads(str(config.pop(KEY_PARAM_NAMES)))
    clipping = _number(config.pop(KEY_SECAGG_CLIPPING_RANGE), KEY_SECAGG_CLIPPING_RANGE)
    max_weight = _number(config.pop(KEY_SECAGG_MAX_WEIGHT), KEY_SECAGG_MAX_WEIGHT)
    arrays = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(msg.content.array_records[_FITINS_PARAMS], keep_input=True)
    )
    if len(names) != len(arrays):
        raise SecAggUpdateRefused(f"{len(names)} parameter names for {len(arrays)} arrays")
    msg.content = RecordDict(
        {
            k.ARRAYS: ArrayRecord({n: Array(a) for n, a in zip(names, arrays, strict=True)}),
            k.CONFIG: ConfigRecord(config),
        }
    )
    reply = call_next(msg, context)
    branch = context.node_config.get(k.NODE_PARTITION_ID, context.node_id)
    where = f"branch {branch!s}, round {config.get(k.KEY_SERVER_ROUND, '?')!s}"
    if reply.has_error():
        raise SecAggUpdateRefused(f"{where}: training failed: {reply.error.reason}")
    out = reply.content.array_records[k.ARRAYS]
    metrics = reply.content.metric_records[k.METRICS]
    count = int(_number(metrics[k.KEY_NUM_EXAMPLES], k.KEY_NUM_EXAMPLES))
    loss = _number(metrics.get(k.KEY_TRAIN_LOSS, math.nan), k.KEY_TRAIN_LOSS)
    ordered = [out[n].numpy() for n in names]
    check_range(ordered, count, clipping=clipping, max_weight=max_weight, where=where)
    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(ordered),
        num_examples=count,
        metrics={k.KEY_TRAIN_LOSS: loss},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SecAggUpdateRefused(f"{key} must be a number, got {value!r}")
    return float(value)


def check_range(
    arrays: list[np.ndarray], count: int, *, clipping: float, max_weight: float, where: str
) -> None:
    """Refuse an update SecAgg+ would clip or overflow.

    Raises:
        SecAggUpdateRefused: The count is not in ``(0, max_weight]``, a value is not finite,
            or a weighted value ``|w| * count / max_weight`` exceeds ``clipping``.
    """
    if not 0 < count <= max_weight:
        raise SecAggUpdateRefused(
            f"{where}: {count} training rows, outside (0, secagg-max-weight = {max_weight:g}]"
        )
    largest = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if not math.isfinite(largest):
        raise SecAggUpdateRefused(f"{where}: the update holds NaN or infinite values")
    weighted = largest * count / max_weight
    if weighted > clipping:
        raise SecAggUpdateRefused(
            f"{where}: largest weighted parameter {weighted:.3g} (|w| = {largest:.3g} x "
            f"{count}/{max_weight:g}) exceeds secagg-clipping-range = {clipping:g}; SecAgg+ "
            "would clip it and bias the mean, so the update is withheld (raise "
            "secagg-clipping-range)"
        )
