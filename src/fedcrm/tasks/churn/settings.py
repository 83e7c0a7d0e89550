"""The churn task's settings: schema, local optimiser and MLP widths (``[federation]`` keys)."""

from dataclasses import dataclass
from typing import Literal

from fedcrm.data.schema import SCHEMAS
from fedcrm.exceptions import ConfigError
from fedcrm.models.churn import TrainSettings
from fedcrm.settings import check_positive


@dataclass(frozen=True)
class ChurnSettings:
    """How every branch trains the churn MLP (sent with every message).

    Attributes:
        schema: The declared export schema (``telco`` or ``mlc``).
        local_epochs: Local epochs per round.
        batch_size: Rows per local step (DP: the expected Poisson batch).
        lr: Local learning rate.
        weight_decay: L2 weight decay of the local optimiser.
        optimizer: ``sgd`` (with momentum) or ``adam``.
        momentum: SGD momentum.
        hidden_layers: Hidden layer widths, comma-separated; empty for logistic regression.
    """

    schema: str = "mlc"
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.005
    weight_decay: float = 0.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    hidden_layers: str = "64,32"

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise ConfigError(f"schema must be one of {sorted(SCHEMAS)}, got {self.schema!r}")
        check_positive(self, ("local_epochs", "batch_size"))
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay must be >= 0, got {self.weight_decay}")
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

    def train_settings(
        self, *, proximal_mu: float = 0.0, epochs: int | None = None
    ) -> TrainSettings:
        """The local optimisation of one round (FedProx's ``proximal_mu`` from the message)."""
        return TrainSettings(
            epochs=self.local_epochs if epochs is None else epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=self.weight_decay,
            proximal_mu=proximal_mu,
            optimizer=self.optimizer,
            momentum=self.momentum,
        )
