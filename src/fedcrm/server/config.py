"""Typed, validated federation settings, built once from Flower's run config."""

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedcrm.data.schema import SCHEMAS
from fedcrm.exceptions import ConfigError
from fedcrm.strategies.factory import StrategyName


@dataclass(frozen=True)
class FederationConfig:
    """What the ServerApp needs to run one federated churn training.

    Attributes mirror the kebab-case keys of ``[tool.flwr.app.config]``
    (``num_rounds`` ↔ ``num-rounds``).
    """

    schema: str = "mlc"
    num_rounds: int = 20
    strategy: StrategyName = StrategyName.FEDAVG
    fraction_train: float = 1.0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.005
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    momentum: float = 0.9
    hidden_layers: str = "64,32"
    """Hidden layer widths of the churn MLP, comma-separated; empty for logistic regression."""
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    seed: int = 42
    round_timeout: float = 600.0
    min_train_nodes: int = 2
    """Fewest admitted branch updates a round needs; when privacy budgets refuse more branches
    than that leaves, the run stops (capped at the number of connected branches)."""

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise ConfigError(f"schema must be one of {sorted(SCHEMAS)}, got {self.schema!r}")
        for name in ("num_rounds", "local_epochs", "batch_size", "min_train_nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        for name in ("lr", "server_lr", "round_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )
        if self.weight_decay < 0 or self.proximal_mu < 0:
            raise ConfigError("weight-decay and proximal-mu must be >= 0")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        try:
            widths = self.hidden
        except ValueError:
            widths = (0,)
        if any(w < 1 for w in widths):
            raise ConfigError(
                f"hidden-layers must be comma-separated positive widths, got {self.hidden_layers!r}"
            )

    @property
    def hidden(self) -> tuple[int, ...]:
        """Hidden layer widths as integers."""
        return tuple(int(w) for w in self.hidden_layers.replace(" ", "").split(",") if w)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FederationConfig":
        """Build from kebab-case keys; unknown keys are ignored, known ones type-checked.

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                continue
            raw = run_config[key]
            default = f.default
            try:
                if isinstance(default, StrategyName):
                    values[f.name] = StrategyName(str(raw))
                elif isinstance(default, bool) or not isinstance(default, int | float | str):
                    values[f.name] = raw
                elif isinstance(default, int) and not isinstance(default, bool):
                    if isinstance(raw, float) and not raw.is_integer():
                        raise ValueError(f"{raw} is not a whole number")
                    values[f.name] = int(raw)
                else:
                    values[f.name] = type(default)(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{key}: invalid value {raw!r} ({exc})") from exc
        return cls(**values)

    def to_run_config(self) -> dict[str, int | float | str]:
        """Kebab-case mapping accepted by `from_run_config` (and by ``flwr run --run-config``)."""
        return {
            f.name.replace("_", "-"): (
                str(getattr(self, f.name))
                if isinstance(getattr(self, f.name), StrategyName)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }
