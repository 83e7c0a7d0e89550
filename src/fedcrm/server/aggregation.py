"""The aggregation mode of a deployed run, from Flower's run config (``flwr run --run-config``).

A simulation builds its strategy wrapper from the experiment TOML (`fedcrm.simulation.runner`);
the deployed ServerApp (``fedcrm.server.app:app``) reads the same choice from run-config keys::

    aggregation-mode    "plain" (default), "he" or "secagg"
    he-public-context   "he": the key authority's public.tenseal (public.json beside it);
                        the server never loads anything that holds a secret key
    he-checkpoint-dir   "he": where the server keeps the ciphertext checkpoints
    secagg-*            "secagg": protocol and quantization settings (`SecAggConfig`)

Branches need the matching side: ``he-key-dir`` in their node config for HE (their copy of the
secret context); nothing for SecAgg+ (``secagg_mod`` is always in the deployed ClientApp).
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from flwr.serverapp.strategy import Strategy

from fedcrm import constants as k
from fedcrm.exceptions import ConfigError
from fedcrm.privacy.keys import load_public_context
from fedcrm.server.federation import StrategyWrapper
from fedcrm.strategies.guardrails import AggregationMode, check_combination
from fedcrm.strategies.he import HEAggregation
from fedcrm.strategies.secagg import SecAggConfig, SecAggPlusAggregation

__all__ = ["KEY_AGGREGATION_MODE", "KEY_HE_CHECKPOINT_DIR", "KEY_HE_PUBLIC_CONTEXT", "wrapper"]

KEY_AGGREGATION_MODE: Final = k.KEY_AGGREGATION_MODE
KEY_HE_PUBLIC_CONTEXT: Final = "he-public-context"
KEY_HE_CHECKPOINT_DIR: Final = "he-checkpoint-dir"
DEFAULT_CHECKPOINT_DIR: Final = "he-checkpoints"


def wrapper(
    run_config: Mapping[str, Any], *, strategy: str, round_timeout: float
) -> StrategyWrapper | None:
    """The strategy wrapper the run config asks for (``None``: plaintext aggregation).

    Args:
        run_config: Flower's run config.
        strategy: The server strategy's name (checked against the guardrails).
        round_timeout: Seconds each SecAgg+ stage waits for replies.

    Raises:
        ConfigError: Unknown mode, HE without a public context, a refused combination, or
            invalid SecAgg+ settings. The HE public context is loaded (and checked to be
            public) here, before any round.
    """
    raw = str(run_config.get(KEY_AGGREGATION_MODE, "plain") or "plain")
    try:
        mode = AggregationMode(raw)
    except ValueError as exc:
        allowed = [str(m) for m in AggregationMode]
        raise ConfigError(f"{KEY_AGGREGATION_MODE} must be one of {allowed}, got {raw!r}") from exc
    check_combination(mode=mode, strategy=strategy)
    if mode is AggregationMode.HE:
        path = str(run_config.get(KEY_HE_PUBLIC_CONTEXT, "") or "")
        if not path:
            raise ConfigError(
                f"{KEY_AGGREGATION_MODE} = 'he' needs {KEY_HE_PUBLIC_CONTEXT}: the path of the "
                "key authority's public.tenseal (fedcrm keys init)"
            )
        public = load_public_context(Path(path))
        checkpoints = Path(str(run_config.get(KEY_HE_CHECKPOINT_DIR, "") or DEFAULT_CHECKPOINT_DIR))

        def wrap_he(inner: Strategy) -> Strategy:
            return HEAggregation(inner, public_context=public, checkpoint_dir=checkpoints)

        return wrap_he
    if mode is AggregationMode.SECAGG:
        if run_config.get(k.KEY_CONSENT_PURPOSE) or run_config.get(k.KEY_DP_TARGET_EPSILON):
            raise ConfigError(
                "aggregation-mode = 'secagg' with consent-purpose or dp-target-epsilon is not "
                "supported yet: SecAgg+ replies carry no round manifest or privacy report"
            )
        secagg = SecAggConfig.from_run_config(run_config)

        def wrap_secagg(inner: Strategy) -> Strategy:
            return SecAggPlusAggregation(inner, secagg, timeout=round_timeout)

        return wrap_secagg
    return None
