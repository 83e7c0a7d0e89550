"""Client-side clipping for branch-level central DP: Flower's clipping mods, applied safely.

Flower's ``fixedclipping_mod`` and ``adaptiveclipping_mod`` (``flwr.clientapp.mod``) clip the
branch's model update to the norm the server's ``DifferentialPrivacyClientSide*Clipping``
wrapper sends as ``clipping_norm``. fedcrm's ClientApp answers several message types and, with
record-level DP, may answer a train message with a refusal that carries no parameters; Flower's
mods would turn each of those into an error. The mods here hand them through unchanged and call
Flower's mod only for a train message that carries ``clipping_norm``.

The deployed ClientApp (``fedcrm.client.app:app``) cannot know the variant when it is built,
so it carries :func:`central_clipping_mod`, which picks one of the two per message from the run
config's ``central-dp-mode`` (the same run config the deployed ServerApp reads).

Mod order: put the clipping mod first in ``ClientApp(mods=[...])``, so that it is the last to
touch the reply's parameters before they leave the branch (Flower's own advice). It is not
combined with :class:`fedcrm.client.he_mod.HEMod` (the guardrails refuse central DP with HE).
"""

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedcrm import wire as k
from fedcrm.privacy import CentralDPMode


def _applies(msg: Message) -> bool:
    if not msg.metadata.message_type.startswith(MessageType.TRAIN):
        return False
    config = msg.content.config_records.get(k.CONFIG)
    return config is not None and k.KEY_CLIPPING_NORM in config


def _guarded(flower_mod: Mod, *, adaptive: bool) -> Mod:
    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if not _applies(msg):
            return call_next(msg, ctxt)
        reply: Message | None = None

        def run_and_keep(inner_msg: Message, inner_ctxt: Context) -> Message:
            nonlocal reply
            reply = call_next(inner_msg, inner_ctxt)
            return reply

        try:
            out = flower_mod(msg, ctxt, run_and_keep)
        except ZeroDivisionError:
            # Flower divides by the update's norm: an exactly-zero update (nothing learnt) is
            # already within any clipping norm and is not clipped.
            if reply is None or not reply.content.metric_records:
                raise
            if adaptive:
                next(iter(reply.content.metric_records.values()))[k.KEY_NORM_BIT] = 0
            return reply
        if (
            reply is not None
            and out.has_error()
            and not reply.has_error()
            and not reply.content.array_records
        ):
            return reply  # a refusal (record-level budget): nothing to clip, hand it through
        return out

    mod.__doc__ = (
        f"Flower's ``{getattr(flower_mod, '__name__', 'clipping mod')}`` on train messages that "
        "carry a clipping norm; every other message passes unchanged."
    )
    return mod


fixed_clipping_mod: Mod = _guarded(fixedclipping_mod, adaptive=False)
"""``fixedclipping_mod`` for train messages that carry a clipping norm."""

adaptive_clipping_mod: Mod = _guarded(adaptiveclipping_mod, adaptive=True)
"""``adaptiveclipping_mod`` (clip and report the clipped bit) for the same messages."""


def central_clipping_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Client-side clipping chosen by the run config, for the deployed ClientApp.

    A train message that carries ``clipping_norm`` (only Flower's client-side wrappers send it)
    is clipped by :data:`adaptive_clipping_mod` when the run config's ``central-dp-mode`` is
    ``client-adaptive`` (the server needs the clipped bit), else by :data:`fixed_clipping_mod`
    (a norm sent without a matching mode is still honoured). Every other message, and every
    message of a run without client-side clipping, is handed through unchanged.
    """
    if not _applies(msg):
        return call_next(msg, ctxt)
    adaptive = ctxt.run_config.get(k.KEY_CENTRAL_DP_MODE) == CentralDPMode.CLIENT_ADAPTIVE
    return (adaptive_clipping_mod if adaptive else fixed_clipping_mod)(msg, ctxt, call_next)
