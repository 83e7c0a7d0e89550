"""The federation's own settings (task-neutral), built once from Flower's run config or TOML."""

from collections.abc import Mapping
from dataclasses import dataclass

from fedcrm.exceptions import ConfigError
from fedcrm.settings import check_positive, from_mapping, to_mapping
from fedcrm.strategies.factory import StrategyName
from fedcrm.tasks.registry import DEFAULT_TASK, get_task


@dataclass(frozen=True)
class FederationConfig:
    """What the coordinator needs to run a federation of any task.

    Attributes mirror the kebab-case keys of ``[tool.flwr.app.config]`` and of an experiment's
    ``[federation]`` table (``num_rounds`` ↔ ``num-rounds``); the task's own settings (local
    optimiser, model) sit beside them in the same table.

    Attributes:
        task: The registered task the run trains (`fedcrm.tasks.TASKS`).
        num_rounds: Federated rounds.
        strategy: The server strategy.
        fraction_train: Share of the branches sampled for training each round.
        proximal_mu: FedProx's proximal weight (sent to the branches).
        server_lr: FedAdam's server learning rate.
        seed: Seed of the initial model, the branches' splits and local shuffles.
        round_timeout: Seconds to wait for the branches in each exchange.
        min_train_nodes: Fewest admitted branch updates a round needs; when consent or
            privacy budgets refuse more branches than that leaves, the run stops (capped at the
            number of branches sent a message).
    """

    task: str = DEFAULT_TASK
    num_rounds: int = 20
    strategy: StrategyName = StrategyName.FEDAVG
    fraction_train: float = 1.0
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    seed: int = 42
    round_timeout: float = 600.0
    min_train_nodes: int = 2

    def __post_init__(self) -> None:
        get_task(self.task).check_strategy(str(self.strategy))
        check_positive(self, ("num_rounds", "min_train_nodes"))
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        for name in ("server_lr", "round_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}"
                )
        if self.proximal_mu < 0:
            raise ConfigError(f"proximal-mu must be >= 0, got {self.proximal_mu}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> "FederationConfig":
        """Build from a flat run config; keys of other settings are ignored.

        Raises:
            ConfigError: A value has the wrong type or is out of range.
        """
        return from_mapping(cls, run_config, where="run config", ignore_unknown=True)

    def to_run_config(self) -> dict[str, int | float | str]:
        """Kebab-case mapping accepted by `from_run_config` (and by ``flwr run --run-config``)."""
        return {
            key: value for key, value in to_mapping(self).items() if not isinstance(value, bool)
        }
