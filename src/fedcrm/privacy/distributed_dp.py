"""Distributed branch-level DP under HE: each branch clips and noises its own update.

Under ``[aggregation] mode = "he"`` the server only adds ciphertexts, so it can neither clip an
update nor add noise to the plaintext sum. With ``[central-dp] mode = "distributed"`` every
branch does both before encrypting (distributed DP; Truex et al., "A Hybrid Approach to
Privacy-Preserving Federated Learning", arXiv:1812.03224), in this order, in
:class:`fedcrm.client.he_mod.HEMod`'s encrypt path:

1. ``delta = w_k - w_{t-1}`` (the branch's update to the global model it decrypted);
2. clip: ``delta * min(1, C / ||delta||_2)`` (:func:`clip_to_norm`);
3. noise: add ``N(0, (z C)^2 / K_min)`` per coordinate from a generator seeded with 256 bits of
   the OS CSPRNG (:func:`secure_generator`);
4. weight 1 (equal weights, not ``n_k``), encrypt, send.

The server sums the ``K`` ciphertexts and sets the aggregate's count to ``K`` (public), so the
branches decrypt ``sum_k (clip(delta_k) + e_k)`` and step by its mean over ``K``.

Privacy argument (unit: one branch; neighbours: add/remove one branch's data, zero-out as in
:mod:`fedcrm.privacy.branch_accounting`; mechanism: Gaussian; ``q = 1``):
    * Sensitivity: with equal weights the sum of clipped updates changes by at most ``C`` in L2
      when one branch's data is replaced by the null (zero) update, exactly as in plaintext
      central DP. An ``n_k``-weighted sum (the HE mean without DP) would have sensitivity
      ``n_max C`` and its weights are themselves private; that is why the weights are 1.
    * Noise: each branch's noise has variance ``(z C)^2 / K_min``. Any ``K_min`` honest
      branches' noise alone sums to variance ``(z C)^2``; a coalition that knows (and could
      subtract) the noise of its own members leaves at least that much as long as at least
      ``K_min`` summed branches are honest. So each released aggregate is the Gaussian mechanism
      with noise multiplier ``z`` on sensitivity ``C``, and the rounds compose as in central DP
      (:class:`fedcrm.privacy.branch_accounting.BranchLevelAccountant`).
    * Trust: the server is honest-but-curious and cannot verify clipping or noise on
      ciphertexts; the guarantee holds only if the honest branches run the mod unmodified, and
      at most ``K - K_min`` of the ``K`` summed branches collude (or drop their noise). Every
      branch holds the secret key (the HE design), so a branch colluding with the server could
      decrypt individual updates: HE protects updates from the server, DP protects the branches
      from whoever sees the aggregate.
    * Dropouts: a round whose sum holds fewer than ``K_min`` branches would carry noise variance
      below ``(z C)^2``; the server refuses to release it (the aggregate is not stored or sent,
      and the ledger records the refusal).
    * Slightly more noise than needed: with ``K > K_min`` branches the total noise std is
      ``z C sqrt(K / K_min)``; the accountant counts only ``z`` (conservative).

Randomness: NumPy's PCG64 seeded with 256 bits from :mod:`secrets` per update: unpredictable,
though not a cryptographic generator, and floating-point attacks on Gaussian sampling
(Mironov 2012) are not mitigated. CKKS adds its own small approximation error, which is not
counted as noise.
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

__all__ = [
    "DDP_CLIPPING_NORM",
    "DDP_MIN_HONEST",
    "DDP_NOISE_MULTIPLIER",
    "DistributedNoise",
    "branch_noise_std",
    "clip_to_norm",
    "secure_generator",
]

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
