"""Distributed branch-level DP under HE: each branch clips its update and adds a noise share.

With ``[central-dp] mode = "distributed"`` the server only adds ciphertexts, so every branch
clips its update to ``C`` and adds ``N(0, (z C)^2 / K_min)`` before encrypting
(:class:`fedcrm.client.he_mod.HEMod`); any ``K_min`` honest branches' shares sum to noise of std
``z C`` on the decrypted sum (Truex et al., arXiv:1812.03224). See
docs/privacy-analysis.md#distributed-dp-under-he.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from fedcrm.exceptions import ConfigError

DDP_NOISE_MULTIPLIER: Final = "ddp-noise-multiplier"
"""HE ConfigRecord key (server -> branch): ``z``, the noise multiplier of the decrypted sum."""
DDP_CLIPPING_NORM: Final = "ddp-clipping-norm"
"""HE ConfigRecord key (server -> branch): ``C``, the L2 norm each branch clips its update to."""
DDP_MIN_HONEST: Final = "ddp-min-honest"
"""HE ConfigRecord key (server -> branch): ``K_min``, the honest branches the noise is sized for."""


def clip_to_norm(delta: npt.NDArray[np.float64], clipping_norm: float) -> npt.NDArray[np.float64]:
    """``delta * min(1, C / ||delta||_2)``: the update scaled into the L2 ball of radius ``C``.

    Raises:
        ValueError: ``clipping_norm`` is not a finite number > 0, or ``delta`` is not finite.
    """
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError(f"clipping norm must be a finite number > 0, got {clipping_norm!r}")
    vector = np.asarray(delta, dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ValueError("the update has non-finite values; refusing to clip and send it")
    norm = float(np.linalg.norm(vector))
    if norm <= clipping_norm:
        return vector.copy()
    # Divide by the norm first, then scale: the result's norm is C up to one rounding.
    return (vector / norm) * (clipping_norm * (1.0 - 1e-12))


def branch_noise_std(noise_multiplier: float, clipping_norm: float, min_honest: int) -> float:
    """Per-coordinate noise std of one branch: ``z C / sqrt(K_min)``."""
    return noise_multiplier * clipping_norm / math.sqrt(min_honest)


def secure_generator() -> np.random.Generator:
    """A fresh PCG64 generator seeded with 256 bits from the OS CSPRNG."""
    return np.random.default_rng(secrets.randbits(256))


@dataclass(frozen=True, slots=True)
class DistributedNoise:
    """What each branch applies before encrypting (sent by the server in the HE record).

    Attributes:
        noise_multiplier: ``z``: the decrypted sum carries noise std ``z C`` (at least).
        clipping_norm: ``C``.
        min_honest: ``K_min``: the number of honest branches the noise is sized for.

    Raises:
        ConfigError: A value is out of range (``z > 0``, ``C > 0``, ``K_min >= 1``).
    """

    noise_multiplier: float
    clipping_norm: float
    min_honest: int

    def __post_init__(self) -> None:
        problems = []
        for name in ("noise_multiplier", "clipping_norm"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value > 0)
            ):
                problems.append(f"{name} must be a finite number > 0, got {value!r}")
        if (
            isinstance(self.min_honest, bool)
            or not isinstance(self.min_honest, int)
            or self.min_honest < 1
        ):
            problems.append(f"min_honest must be an integer >= 1, got {self.min_honest!r}")
        if problems:
            raise ConfigError("distributed DP: " + "; ".join(problems))

    @property
    def branch_std(self) -> float:
        """The per-coordinate noise std each branch adds: ``z C / sqrt(K_min)``."""
        return branch_noise_std(self.noise_multiplier, self.clipping_norm, self.min_honest)

    def privatize(
        self, delta: npt.NDArray[np.float64], *, rng: np.random.Generator | None = None
    ) -> npt.NDArray[np.float64]:
        """Clip ``delta`` to ``C``, then add this branch's share of the Gaussian noise.

        Args:
            delta: The branch's update (flattened).
            rng: Test seam only; ``None`` (always in production): :func:`secure_generator`.
        """
        clipped = clip_to_norm(delta, self.clipping_norm)
        generator = secure_generator() if rng is None else rng
        noise = generator.normal(0.0, self.branch_std, size=clipped.shape)
        return clipped + noise

    def to_fields(self) -> dict[str, int | float]:
        """The HE ConfigRecord fields announcing these settings to the branches."""
        return {
            DDP_NOISE_MULTIPLIER: float(self.noise_multiplier),
            DDP_CLIPPING_NORM: float(self.clipping_norm),
            DDP_MIN_HONEST: int(self.min_honest),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, object]) -> DistributedNoise | None:
        """The settings in an HE ConfigRecord; ``None`` when the round uses no distributed DP.

        Raises:
            ConfigError: Some but not all fields are present, or a value is invalid.
        """
        keys = (DDP_NOISE_MULTIPLIER, DDP_CLIPPING_NORM, DDP_MIN_HONEST)
        present = [key in fields for key in keys]
        if not any(present):
            return None
        if not all(present):
            raise ConfigError(f"distributed DP: the round must carry all of {list(keys)}")
        z, c, k_min = (fields[key] for key in keys)
        return cls(z, c, k_min)  # type: ignore[arg-type]  # validated in __post_init__
