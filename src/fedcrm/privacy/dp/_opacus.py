"""The Opacus adapter: the only module that imports opacus.

Typed functions over Opacus (Yousefpour et al. 2021, arXiv:2109.12298): ε of a history by its
RDP or PRV accountant, its Poisson data loader, and DP-SGD steps with one of its per-sample
gradient modes. Opacus's exceptions become :class:`~fedcrm.privacy.dp.AccountingError` and
:class:`~fedcrm.privacy.dp.DPTrainingError` here. See docs/privacy-analysis.md#accounting.
"""

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import numpy as np
import opacus
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedError
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedcrm.privacy.dp._config import AccountantName, GradSampleMode
from fedcrm.privacy.dp._errors import AccountingError, DPTrainingError, UnsupportedModelError

OPACUS_VERSION: Final[str] = str(opacus.__version__)
"""Version of Opacus that computes ε (recorded in the privacy ledger)."""

RDP_ORDERS: Final[tuple[float, ...]] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""RDP orders: Opacus's defaults, so stock ``RDPAccountant`` reproduces every ε bit for bit."""

OPACUS_MODES: Final[tuple[GradSampleMode, ...]] = ("hooks", "ew", "functorch", "ghost")
"""The per-sample gradient modes Opacus implements."""

_FULL_BACKWARD_HOOK_WARNING: Final = "Full backward hook is firing when gradients are computed"
_OPTIMAL_ORDER_WARNING: Final = "Optimal order is the (largest|smallest) alpha"


def epsilon_of_history(
    history: Sequence[tuple[float, float, int]], *, delta: float, accountant: AccountantName
) -> float:
    """Return ε at ``delta`` of a history of ``(noise_multiplier, sample_rate, steps)``.

    Prefer :func:`fedcrm.privacy.dp.compute_epsilon`, which validates its input and merges
    equal consecutive events first.

    Args:
        history: Poisson-subsampled Gaussian events, oldest first.
        delta: δ, 0 < δ < 1.
        accountant: ``"rdp"`` (Mironov 2017, conversion of Balle et al. 2020) or ``"prv"``
            (Gopi et al. 2021, upper bound of the ε estimate).

    Returns:
        ε; ``inf`` when RDP gives no finite bound.

    Raises:
        fedcrm.privacy.dp.AccountingError: Opacus failed to compute ε.
    """
    if not history:
        return 0.0
    try:
        if accountant == "rdp":
            orders = list(RDP_ORDERS)
            # Same summation order as RDPAccountant.get_privacy_spent: identical floats.
            rdp = sum(
                np.asarray(_unit_rdp(float(q), float(sigma)), dtype=float) * steps
                for sigma, q, steps in history
            )
            with warnings.catch_warnings():
                # Still a valid upper bound, only a looser one; nothing to act on.
                warnings.filterwarnings(
                    "ignore", message=_OPTIMAL_ORDER_WARNING, category=UserWarning
                )
                eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
            return float(eps)
        prv = PRVAccountant()
        prv.history = [(float(s), float(q), int(n)) for s, q, n in history]
        with warnings.catch_warnings():
            # q = 1 (branch-level DP, no sampling): Opacus evaluates log(1 - q) = -inf inside an
            # np.where that then discards it; the result is exact.
            warnings.filterwarnings(
                "ignore", message="divide by zero encountered in log", category=RuntimeWarning
            )
            # PRV bounds its domain with RDP; a looser RDP bound there is harmless.
            warnings.filterwarnings("ignore", message=_OPTIMAL_ORDER_WARNING, category=UserWarning)
            return float(prv.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise AccountingError(f"{accountant} accountant failed: {exc}") from exc


@functools.lru_cache(maxsize=4096)
def _unit_rdp(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one step at every order; ``compute_rdp`` is this times ``steps``, exactly."""
    unit = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(x) for x in np.asarray(unit, dtype=float))


def poisson_loader(
    dataset: Dataset[Any],
    *,
    sample_rate: float,
    collate_fn: Callable[..., Any] | None,
    generator: torch.Generator,
    num_workers: int,
) -> DataLoader[Any]:
    """Opacus's Poisson-sampled loader (``UniformWithReplacementSampler``) over ``dataset``."""
    loader: DataLoader[Any] = DPDataLoader(
        dataset,
        sample_rate=sample_rate,
        collate_fn=collate_fn,
        generator=generator,
        num_workers=num_workers,
    )
    return loader


def _translate(mode: str, exc: BaseException) -> DPTrainingError:
    if isinstance(exc, UnsupportedError | NotImplementedError):
        return UnsupportedModelError(
            f"Opacus ({mode}) cannot compute per-sample gradients for this model: {exc}"
        )
    return DPTrainingError(f"Opacus ({mode}) refused the training set-up: {exc}")


@contextmanager
def _quiet_input_hook_warning() -> Iterator[None]:
    """Silence torch's note that a full backward hook fires with no input requiring grad.

    Opacus's hooks sit on the first layer, whose input (the data) never requires a gradient;
    torch notes this on every backward pass. It is expected and harmless here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FULL_BACKWARD_HOOK_WARNING, category=UserWarning)
        yield


class OpacusEngine:
    """DP-SGD steps with an Opacus per-sample gradient mode and DP optimizer (flat clipping).

    Args:
        model: The model to wrap (Opacus's ``GradSampleModule``).
        optimizer: A torch optimizer over ``model``'s parameters (wrapped in a ``DPOptimizer``).
        grad_sample_mode: One of :data:`OPACUS_MODES`.
        noise_multiplier: σ.
        max_grad_norm: C.
        expected_batch_size: The divisor of the noisy sum.
        generator: The noise generator.
        criterion: A per-example loss module (``reduction`` settable, mean-reduced).
        forbid_grad_accumulation: Refuse two backward passes per step (Poisson sampling).
        before_update: Called before every noisy update (the step counter); may raise.

    Raises:
        UnsupportedModelError: The model has layers the mode cannot handle.
        DPTrainingError: Opacus refused the set-up.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        grad_sample_mode: GradSampleMode,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
        criterion: nn.Module,
        forbid_grad_accumulation: bool,
        before_update: Callable[..., None],
    ) -> None:
        self.grad_sample_mode = grad_sample_mode
        try:
            ModuleValidator.validate(model, strict=True)
            extra: dict[str, Any] = (
                {"max_grad_norm": max_grad_norm} if grad_sample_mode == "ghost" else {}
            )
            wrapped = prepare_module(
                model,
                grad_sample_mode=grad_sample_mode,
                batch_first=True,
                loss_reduction="mean",
                **extra,
            )
            if forbid_grad_accumulation:
                wrapped.forbid_grad_accumulation()
            optimizer_class = get_optimizer_class(
                clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode
            )
            dp_optimizer = optimizer_class(
                optimizer=optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
                loss_reduction="mean",
                generator=generator,
                secure_mode=False,
            )
            loss_fn: Callable[..., Any] = criterion
            if grad_sample_mode == "ghost":
                loss_fn = DPLossFastGradientClipping(wrapped, dp_optimizer, criterion, "mean")
        except (UnsupportedError, NotImplementedError, ValueError, TypeError) as exc:
            raise _translate(grad_sample_mode, exc) from exc
        dp_optimizer.attach_step_hook(before_update)
        self.model: nn.Module = wrapped
        self.optimizer: torch.optim.Optimizer = dp_optimizer
        self.criterion = loss_fn

    def step(self, features: Tensor, targets: Tensor) -> float:
        """One noisy step on a batch; its mean loss (NaN for an empty batch).

        Raises:
            UnsupportedModelError: Opacus met a layer it cannot handle.
            DPTrainingError: Mode ``"ew"`` met an empty batch, or Opacus refused the step.
        """
        if features.shape[0] == 0 and self.grad_sample_mode == "ew":
            # The step must still add noise (skipping it would change the mechanism).
            raise DPTrainingError(
                "grad_sample_mode='ew' cannot take an empty Poisson batch (torch's expanded "
                "weights need a batch); use 'hooks' or 'fast-linear', or a larger batch size"
            )
        try:
            self.optimizer.zero_grad(set_to_none=True)
            with _quiet_input_hook_warning():
                loss = self.criterion(self.model(features), targets)
                loss.backward()
            self.optimizer.step()
        except (UnsupportedError, NotImplementedError, ValueError) as exc:
            raise _translate(self.grad_sample_mode, exc) from exc
        return float(loss.item()) if features.shape[0] else float("nan")

    def close(self) -> None:
        """Remove Opacus's hooks from the model."""
        if isinstance(self.model, AbstractGradSampleModule):
            self.model.to_standard_module()
