"""Matrix factorisation with item bias, split into a branch-local user part and a shared item part.

Score of user ``u`` for item ``i``: ``p_u · q_i + b_i`` (Koren et al. 2009; trained on implicit
feedback as in He et al. 2017, "Neural Collaborative Filtering", arXiv:1708.05031, and Rendle et
al. 2009, "BPR", arXiv:1205.2618). In the federated setting of Ammad-ud-din et al. 2019
("Federated Collaborative Filtering", arXiv:1901.09888) the user factors ``p_u`` are private to
the branch that holds the user, and only the item factors ``q`` and biases ``b`` are aggregated.

With ``context = L > 0`` the user's vector also holds their recent history: score
``(p_u + sum_l w_l y_{c_l}) · q_i + b_i`` over the items ``c_1..c_L`` of the user's ``L`` latest
earlier events (most recent first), with shared context factors ``y`` and position weights ``w``:
the high-order Markov chain of Fossil (He and McAuley 2016, "Fusing Similarity Models with
Markov Chains for Sparse Sequential Recommendation", arXiv:1609.09152) on top of MF. The
history stays on the branch like ``p_u``; ``y`` and ``w`` are shared and aggregated.

The model enforces that split structurally: user factors live in `UserTower` (``model.users``),
everything aggregated lives in `ItemTower` (``model.items``), and `shared_state` /
`load_shared_state` only ever read or write ``model.items``.
"""

from collections.abc import Mapping
from typing import Final

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from fedcrm.exceptions import ConfigError

SHARED_PREFIX: Final = "items."
"""Prefix of every key of `shared_state` (parameters of ``model.items``)."""
LOCAL_PREFIX: Final = "users."
"""Prefix of every key of `local_state` (parameters of ``model.users``)."""
INIT_STD: Final = 0.01
"""Standard deviation of the normal initialisation of the factors (He et al. 2017)."""


class UserTower(nn.Module):
    """The branch-local part: one factor vector per user of the branch. Never leaves the branch."""

    def __init__(self, n_users: int, factors: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_users, factors)

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        """Return the factors of ``users``, shape ``(batch, factors)``."""
        out: torch.Tensor = self.embedding(users)
        return out


class ItemTower(nn.Module):
    """The shared part, aggregated across branches.

    Item factors and biases and, with a history context, context factors and position weights
    (all `nn.Embedding`, which Opacus computes per-example gradients for).
    """

    def __init__(self, n_items: int, factors: int, context: int = 0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_items, factors)
        self.bias = nn.Embedding(n_items, 1)
        self.context_length = context
        if context:
            self.context = nn.Embedding(n_items, factors)
            self.position = nn.Embedding(context, 1)

    def forward(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the factors ``(batch, factors)`` and biases ``(batch,)`` of ``items``."""
        factors: torch.Tensor = self.embedding(items)
        bias: torch.Tensor = self.bias(items).squeeze(-1)
        return factors, bias

    def history(self, recent: torch.Tensor) -> torch.Tensor:
        """Return ``sum_l w_l y_{recent[..., l]}``, shape ``(*recent.shape[:-1], factors)``.

        Args:
            recent: ``(..., context)`` item indices, most recent first;
                `fedcrm.data.interactions.NO_ITEM` (-1) marks an empty slot, which adds
                nothing. The leading dimension is the batch.
        """
        if recent.shape[-1] != self.context_length:
            raise ConfigError(
                f"history holds {recent.shape[-1]} items, the model needs {self.context_length}"
            )
        positions = torch.arange(self.context_length, device=recent.device).expand_as(recent)
        weights = self.position(positions) * (recent >= 0).unsqueeze(-1)
        out: torch.Tensor = (self.context(recent.clamp(min=0)) * weights).sum(dim=-2)
        return out


class MatrixFactorisation(nn.Module):
    """Matrix factorisation with item bias for implicit feedback.

    Args:
        n_users: Number of users whose factors this model holds (a branch's own users, or all
            users in a pooled baseline).
        n_items: Size of the shared item catalogue.
        factors: Latent dimension.
        context: History length ``L`` (0: plain MF, no history).
        seed: Seed of the initialisation. The shared part depends only on ``(n_items,
            factors, context, seed)``, so every branch and the server start from the same
            shared state.

    Raises:
        ConfigError: A size is not positive (or ``context`` is negative).
    """

    def __init__(
        self, n_users: int, n_items: int, factors: int = 32, *, context: int = 0, seed: int = 0
    ) -> None:
        if n_users < 1 or n_items < 1 or factors < 1 or context < 0:
            raise ConfigError(
                f"n_users, n_items and factors must be >= 1 and context >= 0, got {n_users}, "
                f"{n_items}, {factors}, {context}"
            )
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items
        self.factors = factors
        self.users = UserTower(n_users, factors)
        self.items = ItemTower(n_items, factors, context)
        item_gen = torch.Generator().manual_seed(seed)
        nn.init.normal_(self.items.embedding.weight, std=INIT_STD, generator=item_gen)
        nn.init.zeros_(self.items.bias.weight)
        if context:
            nn.init.normal_(self.items.context.weight, std=INIT_STD, generator=item_gen)
            nn.init.constant_(self.items.position.weight, 1.0 / context)
        user_gen = torch.Generator().manual_seed(seed + 1)
        nn.init.normal_(self.users.embedding.weight, std=INIT_STD, generator=user_gen)

    @property
    def context_length(self) -> int:
        """History length ``L`` (0: plain MF)."""
        return self.items.context_length

    def user_vectors(self, users: torch.Tensor, recent: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``p_u`` plus, with a history context, the users' history vectors.

        Args:
            users: ``(batch,)`` local user indices.
            recent: ``(batch, context)`` items of each user's latest earlier events (see
                `fedcrm.data.interactions.preceding_items` / `latest_items`); required exactly
                when the model has a context.

        Raises:
            ConfigError: ``recent`` is missing for a context model, or given to plain MF.
        """
        p: torch.Tensor = self.users(users)
        if (recent is None) != (self.context_length == 0):
            raise ConfigError(
                f"the model's history context is {self.context_length} items: pass recent items "
                "exactly when it is > 0"
            )
        if recent is None:
            return p
        return p + self.items.history(recent)

    def forward(
        self, users: torch.Tensor, items: torch.Tensor, recent: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return the logits of the ``(users[j], items[j])`` pairs, shape ``(batch,)``."""
        p = self.user_vectors(users, recent)
        q, b = self.items(items)
        out: torch.Tensor = (p * q).sum(dim=-1) + b
        return out

    def score_all(self, users: torch.Tensor, recent: torch.Tensor | None = None) -> torch.Tensor:
        """Return the logits of ``users`` for every catalogue item, shape ``(batch, n_items)``."""
        p = self.user_vectors(users, recent)
        out: torch.Tensor = p @ self.items.embedding.weight.T + self.items.bias.weight.T
        return out


def context_length_of(arrays: Mapping[str, NDArray[np.floating]]) -> int:
    """Return the history length of a model from its `shared_state` arrays (0: plain MF)."""
    position = arrays.get(f"{SHARED_PREFIX}position.weight")
    return 0 if position is None else int(np.asarray(position).shape[0])


def _to_numpy(module: nn.Module, prefix: str) -> dict[str, NDArray[np.float32]]:
    return {
        f"{prefix}{name}": tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in module.state_dict().items()
    }


def _load(module: nn.Module, prefix: str, arrays: Mapping[str, NDArray[np.floating]]) -> None:
    expected = module.state_dict()
    wanted = {f"{prefix}{name}" for name in expected}
    missing = sorted(wanted - arrays.keys())
    unexpected = sorted(set(arrays) - wanted)
    if missing or unexpected:
        raise ConfigError(f"state keys do not match: missing {missing}, unexpected {unexpected}")
    tensors: dict[str, torch.Tensor] = {}
    for name, current in expected.items():
        array = np.asarray(arrays[f"{prefix}{name}"])
        if tuple(array.shape) != tuple(current.shape):
            raise ConfigError(
                f"{prefix}{name} has shape {array.shape}, the model needs {tuple(current.shape)}"
            )
        if not np.isfinite(array).all():
            raise ConfigError(f"{prefix}{name} holds non-finite values")
        tensors[name] = torch.from_numpy(array.astype(np.float32, copy=True))
    module.load_state_dict(tensors)


def shared_state(model: MatrixFactorisation) -> dict[str, NDArray[np.float32]]:
    """Return the aggregated parameters (item factors and biases) as float32 copies.

    Only ``model.items`` is read, so user factors cannot appear here whatever the model holds.
    Keys start with `SHARED_PREFIX`; the order is stable.

    Notes:
        User factors are personal data about a branch's customers (Ammad-ud-din et al. 2019):
        they stay in the branch, kept between rounds with `local_state`.
    """
    return _to_numpy(model.items, SHARED_PREFIX)


def load_shared_state(
    model: MatrixFactorisation, arrays: Mapping[str, NDArray[np.floating]]
) -> None:
    """Overwrite the item factors and biases from ``arrays`` (as produced by `shared_state`).

    User factors are left untouched.

    Raises:
        ConfigError: Keys, shapes or values do not match the model (all of the key mismatches
            are listed); nothing is loaded then.
    """
    _load(model.items, SHARED_PREFIX, arrays)


def local_state(model: MatrixFactorisation) -> dict[str, NDArray[np.float32]]:
    """Return the branch-local user factors, to keep on the branch between rounds.

    Store this in the node's own state (Flower ``Context.state``), never in a message.
    """
    return _to_numpy(model.users, LOCAL_PREFIX)


def load_local_state(
    model: MatrixFactorisation, arrays: Mapping[str, NDArray[np.floating]]
) -> None:
    """Restore the user factors saved with `local_state`.

    Raises:
        ConfigError: Keys, shapes or values do not match the model.
    """
    _load(model.users, LOCAL_PREFIX, arrays)
