"""The Opacus adapter: record-level DP-SGD on a branch (the only module that imports opacus).

DP-SGD (Abadi et al. 2016, arXiv:1607.00133): sample each batch by Poisson sampling, clip every
example's gradient to norm C, add Gaussian noise of standard deviation σ·C to the sum, and divide
by the expected batch size. :func:`make_private` wires this up with Opacus (Yousefpour et al.
2021, arXiv:2109.12298) behind one typed return value, or with fedcrm's own per-sample gradient
path for models built from ``nn.Linear`` layers (``grad_sample_mode="fast-linear"``).

Privacy is counted by the branch's persistent :class:`fedcrm.privacy.accounting.BranchAccountant`,
never by a privacy engine made for one round: after a local round, record
:meth:`PrivateTraining.event` (the steps actually taken) in that accountant. One round::

    plan = plan_for_config(config, num_rows=len(dataset))          # once, for all rounds
    accountant = BranchAccountant.open(path, accountant=config.accountant, key=branch_key)
    decision = accountant.would_exceed(noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate, steps=plan.steps_per_round, delta=config.delta,
        budget=config.budget)
    if not decision.admitted:
        return refusal(decision.reason)                            # nothing trained
    with make_private(model, optimizer, loader, criterion=nn.BCEWithLogitsLoss(),
                      noise_multiplier=plan.noise_multiplier,
                      max_grad_norm=config.max_grad_norm,
                      grad_sample_mode=config.grad_sample_mode,
                      max_steps=plan.steps_per_round) as private:
        for _ in range(config.local_epochs):
            private.train_epoch()
        event = private.event()
    if event is not None:
        accountant.record(event)
        accountant.save(path, key=branch_key)                      # atomic, JSON

Notes:
    Privacy unit: one training row. Churn tables hold one row per customer, so there
    record-level DP is customer-level DP. For tables with many rows per customer, bound each
    customer's rows with :func:`cap_rows_per_customer` first; the guarantee then covers one
    customer with group privacy over at most ``cap`` rows.

    Randomness: Opacus's ``secure_mode`` (cryptographically secure noise and sampling) needs
    ``torchcsprng``, which does not install on this torch and Python, so it is unavailable here
    and :func:`make_private` refuses ``secure_mode=True``. Noise and Poisson sampling use torch's
    generator seeded from the OS CSPRNG (``secrets``); the seed is unpredictable, but the
    generator itself is not a CSPRNG, and floating-point attacks on Gaussian sampling (Mironov
    2012) are not mitigated. :class:`InsecureRNGWarning` says so on every ``make_private``.
"""

import copy
import functools
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, cast

import numpy as np
import opacus
import pandas as pd
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import AbstractGradSampleModule
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedError
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrm.exceptions import DataError, FedCrmError
from fedcrm.privacy.accounting import AccountingError, AccountingEvent, steps_per_epoch
from fedcrm.privacy.config import AccountantName, GradSampleMode

logger = logging.getLogger(__name__)

OPACUS_VERSION: Final[str] = str(opacus.__version__)
"""Version of Opacus that computes ε (recorded in the privacy ledger)."""

RDP_ORDERS: Final[tuple[float, ...]] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
"""RDP orders: Opacus's defaults, so stock ``RDPAccountant`` reproduces every ε bit for bit."""

_OPACUS_MODES: Final = ("hooks", "ew", "functorch", "ghost")
_MASK_CHUNK: Final = 1 << 22
_FULL_BACKWARD_HOOK_WARNING: Final = "Full backward hook is firing when gradients are computed"
_OPTIMAL_ORDER_WARNING: Final = "Optimal order is the (largest|smallest) alpha"


class DPTrainingError(FedCrmError):
    """DP-SGD cannot be set up or run as asked."""


class UnsupportedModelError(DPTrainingError):
    """The model contains layers the chosen per-sample gradient mode cannot handle."""


class SecureModeUnavailable(DPTrainingError):
    """Opacus's ``secure_mode`` was requested, but torchcsprng is not installable here."""


class StepLimitReached(DPTrainingError):
    """Training tried to take more steps than the budget check admitted."""


class InsecureRNGWarning(UserWarning):
    """DP noise comes from a CSPRNG-seeded PRNG, not a CSPRNG (``secure_mode`` unavailable)."""


class ApproximateAccountingWarning(UserWarning):
    """Batches are not Poisson-sampled, so the accountant's ε is an approximation."""


# -- accounting (Opacus analysis) ---------------------------------------------------------------


def epsilon_of_history(
    history: Sequence[tuple[float, float, int]], *, delta: float, accountant: AccountantName
) -> float:
    """Return ε at ``delta`` of a history of ``(noise_multiplier, sample_rate, steps)``.

    Prefer :func:`fedcrm.privacy.accounting.compute_epsilon`, which validates its input and
    merges equal consecutive events first.

    Args:
        history: Poisson-subsampled Gaussian events, oldest first.
        delta: δ, 0 < δ < 1.
        accountant: ``"rdp"`` (Mironov 2017, conversion of Balle et al. 2020) or ``"prv"``
            (Gopi et al. 2021, upper bound of the ε estimate).

    Returns:
        ε; ``inf`` when RDP gives no finite bound.

    Raises:
        fedcrm.privacy.accounting.AccountingError: Opacus failed to compute ε.
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


# -- clipping (pure tensor functions) -----------------------------------------------------------


def clip_factors(per_sample_norms: Tensor, max_grad_norm: float) -> Tensor:
    """Return the flat-clipping factor ``min(1, C / norm) = C / max(norm, C)`` per sample.

    Multiplying a per-sample gradient of norm ``norm`` by its factor gives norm ``min(norm, C)``.
    The ``max`` is also the zero-norm guard (Opacus adds 1e-6 to the norm instead, which clips
    gradients just below C slightly; the bound is the same).
    """
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise DPTrainingError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    return max_grad_norm / per_sample_norms.clamp(min=max_grad_norm)


def clip_per_sample(per_sample_grads: Tensor, max_grad_norm: float) -> Tensor:
    """Clip each row (one example's flattened gradient) to L2 norm <= ``max_grad_norm``.

    Args:
        per_sample_grads: Tensor of shape ``(batch, ...)``.
        max_grad_norm: C, > 0.

    Returns:
        The clipped per-sample gradients, same shape.
    """
    flat = per_sample_grads.reshape(per_sample_grads.shape[0], -1)
    factors = clip_factors(flat.norm(dim=1), max_grad_norm)
    return (flat * factors[:, None]).reshape(per_sample_grads.shape)


# -- loss and data helpers ----------------------------------------------------------------------


class _PerSampleLoss(nn.Module):
    """Wrap a torch loss so that ``reduction="none"`` yields one loss per example, shape (B,).

    Opacus's ghost clipping multiplies per-sample losses by per-sample clipping factors of shape
    (B,); a (B, 1) loss, as ``BCEWithLogitsLoss`` gives for a (B, 1) logit, broadcasts to (B, B)
    and silently yields an unclipped gradient. Reducing the non-batch dimensions first (mean,
    matching ``reduction="mean"``) avoids that.
    """

    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        if not isinstance(getattr(criterion, "reduction", None), str):
            raise DPTrainingError(
                "criterion must be a torch loss module with a 'reduction' attribute "
                f"(e.g. nn.BCEWithLogitsLoss()), got {type(criterion).__name__}"
            )
        unreduced: Any = copy.copy(criterion)  # shares parameters and buffers (e.g. pos_weight)
        unreduced.reduction = "none"
        self.inner = unreduced
        self.reduction = "mean"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        losses = cast(Tensor, self.inner(output, target))
        if losses.dim() == 0:
            raise DPTrainingError("the criterion returned a scalar with reduction='none'")
        if losses.dim() == 1:
            return losses
        if losses.numel() == losses.shape[0]:  # (B, 1): one loss per example already
            return losses.reshape(-1)
        return losses.reshape(losses.shape[0], -1).mean(dim=1)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        losses = self.per_sample(output, target)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean()


class _PoissonTensorLoader:
    """Poisson-sampled batches over in-memory tensors (same law as Opacus's sampler).

    Each of ``int(1 / q)`` batches per epoch includes every row independently with probability
    q, as ``opacus.utils.uniform_sampler.UniformWithReplacementSampler`` does, but draws the
    masks of many steps at once and indexes the tensors directly instead of collating rows one
    by one.
    """

    def __init__(
        self, tensors: Sequence[Tensor], *, sample_rate: float, generator: torch.Generator
    ):
        self.tensors = tuple(tensors)
        self.sample_rate = sample_rate
        self.generator = generator
        self.num_rows = int(self.tensors[0].shape[0])
        self.steps = steps_per_epoch(sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        # Draw the masks of many steps in one call (at most _MASK_CHUNK uniforms at a time):
        # the same law as one torch.rand(n) < q per step, with far fewer tensor operations.
        chunk = max(1, _MASK_CHUNK // self.num_rows)
        done = 0
        while done < self.steps:
            count = min(chunk, self.steps - done)
            hits = (
                torch.rand(count, self.num_rows, generator=self.generator) < self.sample_rate
            ).nonzero(as_tuple=False)
            sizes = torch.bincount(hits[:, 0], minlength=count).tolist()
            for index in torch.split(hits[:, 1], sizes):
                yield tuple(t.index_select(0, index) for t in self.tensors)
            done += count


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


@contextmanager
def _quiet_input_hook_warning() -> Iterator[None]:
    """Silence torch's note that a full backward hook fires with no input requiring grad.

    Opacus's hooks sit on the first layer, whose input (the data) never requires a gradient;
    torch notes this on every backward pass. It is expected and harmless here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FULL_BACKWARD_HOOK_WARNING, category=UserWarning)
        yield


# -- fedcrm's per-sample gradient path for nn.Linear models -------------------------------------


@dataclass(frozen=True, slots=True)
class _Capture:
    module: nn.Linear
    activations: Tensor
    output: Tensor


class _FastLinearEngine:
    """DP-SGD for models whose trainable parameters all sit in ``nn.Linear`` layers.

    For a linear layer ``z = a W^T + b`` the per-sample gradient of example i is the outer
    product ``g_i a_i^T`` (and ``g_i`` for the bias), with ``g_i = dℓ_i/dz_i``. Its squared
    Frobenius norm is ``|g_i|^2 |a_i|^2``, so per-sample norms cost O(B (in + out)) and the
    clipped sum is one matrix product ``(c ⊙ G)^T A`` per layer: per-sample gradients are never
    materialised (the ghost-norm identity of Goodfellow 2015, arXiv:1510.01799, and Li et al.
    2022, arXiv:2110.05679, used for exact flat clipping as in Abadi et al. 2016).

    Like Opacus, it assumes the forward pass treats examples independently (no batch
    statistics); batch norm is refused, other cross-example operations cannot be detected.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
        before_update: Callable[[], None],
    ) -> None:
        problems: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                problems.append(f"{name or 'model'}: batch norm mixes examples of a batch")
            if isinstance(module, nn.Linear):
                continue
            for pname, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    problems.append(
                        f"{name or 'model'}.{pname}: trainable parameter of "
                        f"{type(module).__name__} (fast-linear supports nn.Linear only)"
                    )
        if problems:
            raise UnsupportedModelError(
                "grad_sample_mode='fast-linear' cannot train this model; use an Opacus mode "
                "('hooks'):\n" + "\n".join(f"  - {p}" for p in problems)
            )
        self.model = model
        self.optimizer = optimizer
        self.noise_std = noise_multiplier * max_grad_norm
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.before_update = before_update
        self.linears = [
            m
            for m in model.modules()
            if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters())
        ]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise UnsupportedModelError("the model has no trainable parameters")
        if len({(p.dtype, p.device) for p in self.params}) != 1:
            raise UnsupportedModelError(
                "fast-linear needs every trainable parameter on one device with one dtype"
            )
        self.sizes = [p.numel() for p in self.params]
        # One buffer for every noisy gradient: refilled with fresh noise at each step.
        self.buffer = torch.empty(sum(self.sizes), dtype=self.params[0].dtype)
        self.grad_views = [
            v.view(p.shape)
            for p, v in zip(self.params, torch.split(self.buffer, self.sizes), strict=True)
        ]
        self.grad_of: dict[Tensor, Tensor] = dict(zip(self.params, self.grad_views, strict=True))
        self._recording = False
        self._captures: list[_Capture] = []
        self._in_step = False
        self._handles = [m.register_forward_hook(self._capture) for m in self.linears]
        self._handles.append(optimizer.register_step_pre_hook(self._guard_optimizer_step))

    def _capture(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self._recording:
            self._captures.append(_Capture(cast(nn.Linear, module), inputs[0].detach(), output))

    def _guard_optimizer_step(self, *_: object) -> None:
        if not self._in_step:
            raise DPTrainingError(
                "optimizer.step() was called directly on a model trained with "
                "grad_sample_mode='fast-linear'; that update would not be private. "
                "Call PrivateTraining.step(features, targets) instead"
            )

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in self.params:
            param.grad = None

    def _backprops(
        self, features: Tensor, targets: Tensor, criterion: _PerSampleLoss
    ) -> tuple[Tensor, list[_Capture], tuple[Tensor, ...]]:
        """Forward pass; summed loss and dℓ_i/dz_i at every captured Linear output."""
        self._captures = []
        self._recording = True
        try:
            output = self.model(features)
        finally:
            self._recording = False
        captures, self._captures = self._captures, []
        seen: set[int] = set()
        for capture in captures:
            if id(capture.module) in seen:
                raise UnsupportedModelError(
                    "fast-linear: a Linear layer ran twice in one forward pass (shared weights); "
                    "use grad_sample_mode='hooks'"
                )
            seen.add(id(capture.module))
            if capture.activations.dim() != 2:
                raise UnsupportedModelError(
                    "fast-linear supports 2-D inputs (batch, features) to every Linear layer; "
                    f"got shape {tuple(capture.activations.shape)}; use grad_sample_mode='hooks'"
                )
        total = criterion.per_sample(output, targets).sum()
        backprops = torch.autograd.grad(total, [c.output for c in captures])
        return total.detach(), captures, backprops

    def noisy_gradients(
        self, features: Tensor, targets: Tensor, criterion: _PerSampleLoss
    ) -> tuple[float, dict[Tensor, Tensor]]:
        """Return the mean loss and (Σ clipped per-example gradients + noise) / expected batch.

        All gradients are views of one buffer that starts as the noise N(0, (σC/B)²), so each
        layer costs one fused matrix product (``addmm_``) and one ``addmv_``.
        """
        self.buffer.normal_(
            0.0, self.noise_std / self.expected_batch_size, generator=self.generator
        )
        grads = self.grad_of
        if features.shape[0] == 0:  # an empty Poisson batch: the step is pure noise
            return float("nan"), grads
        total, captures, backprops = self._backprops(features, targets, criterion)
        norms_sq: Tensor | None = None
        for capture, g in zip(captures, backprops, strict=True):
            g_sq = torch.linalg.vecdot(g, g)
            weight, bias = capture.module.weight, capture.module.bias
            if weight.requires_grad:
                a_sq = torch.linalg.vecdot(capture.activations, capture.activations)
                if bias is not None and bias.requires_grad:
                    a_sq += 1.0
                g_sq *= a_sq
            norms_sq = g_sq if norms_sq is None else norms_sq.add_(g_sq)
        if norms_sq is None:  # no trainable Linear ran: pure noise
            return total.item() / features.shape[0], grads
        # min(1, C / norm), zero-safe: see clip_factors.
        c = self.max_grad_norm
        factors = norms_sq.clamp_(min=c * c).rsqrt_().mul_(c)
        factor_column = factors[:, None]
        scale = 1.0 / self.expected_batch_size
        for capture, g in zip(captures, backprops, strict=True):
            weight, bias = capture.module.weight, capture.module.bias
            if weight.requires_grad:
                grads[weight].addmm_(g.T, capture.activations * factor_column, alpha=scale)
            if bias is not None and bias.requires_grad:
                grads[bias].addmv_(g.T, factors, alpha=scale)
        return total.item() / features.shape[0], grads

    def step(self, features: Tensor, targets: Tensor, criterion: _PerSampleLoss) -> float:
        loss, _ = self.noisy_gradients(features, targets, criterion)
        for param, grad in zip(self.params, self.grad_views, strict=True):
            if param.grad is not grad:
                param.grad = grad
        self.before_update()
        self._in_step = True
        try:
            self.optimizer.step()
        finally:
            self._in_step = False
        return loss


# -- the adapter --------------------------------------------------------------------------------


class PrivateTraining:
    """Model, optimizer, data and loss prepared for DP-SGD, with a step counter.

    Made by :func:`make_private`; use :meth:`step` (or :meth:`train_epoch`) to train and
    :meth:`event` to record the round in the branch accountant, then :meth:`close`.

    Attributes:
        model: The module to call for forward passes (Opacus's wrapper in Opacus modes).
        optimizer: The optimizer (Opacus's ``DPOptimizer`` in Opacus modes). Adjust learning
            rates on it; in ``fast-linear`` mode calling its ``step()`` directly is refused.
        data_loader: Poisson-sampled batches ``(features, targets)``, ``int(1/q)`` per epoch.
        criterion: The loss to use in custom loops (Opacus's ghost-clipping wrapper in
            ``ghost`` mode).
        noise_multiplier: σ.
        max_grad_norm: C.
        sample_rate: q used by the sampler and by the accountant.
        expected_batch_size: q · rows, the divisor of the noisy sum.
        grad_sample_mode: The per-sample gradient implementation.
        max_steps: Steps admitted by the budget check (``None``: unlimited).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: Any,
        criterion: Callable[..., Any],
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: int,
        grad_sample_mode: GradSampleMode,
        max_steps: int | None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.criterion = criterion
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.grad_sample_mode = grad_sample_mode
        self.max_steps = max_steps
        self._steps = 0
        self._fast: _FastLinearEngine | None = None
        self._per_sample_loss: _PerSampleLoss | None = None
        self._original_model: nn.Module | None = None
        self._closed = False

    @property
    def steps_taken(self) -> int:
        """Noisy steps taken so far (each one spends privacy)."""
        return self._steps

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of :attr:`data_loader`."""
        return len(self.data_loader)

    def _before_update(self, *_: object) -> None:
        """Count a step; refuse it if it would pass the admitted number."""
        if self.max_steps is not None and self._steps >= self.max_steps:
            raise StepLimitReached(
                f"step {self._steps + 1} refused: the budget check admitted {self.max_steps} "
                "steps for this round"
            )
        self._steps += 1

    def step(self, features: Tensor, targets: Tensor) -> float:
        """Take one DP-SGD step on a Poisson-sampled batch and return its mean loss.

        An empty batch (possible under Poisson sampling) still takes a step: the update is pure
        noise, as the privacy analysis assumes, and the loss is NaN.

        Raises:
            StepLimitReached: The round already took ``max_steps`` steps (no update is made).
            DPTrainingError: This object was closed, or mode "ew" met an empty batch.
        """
        if self._closed:
            raise DPTrainingError("this PrivateTraining was closed; call make_private again")
        if self._fast is not None and self._per_sample_loss is not None:
            return self._fast.step(features, targets, self._per_sample_loss)
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
            raise _translate_opacus_errors(self.grad_sample_mode)(exc) from exc
        return float(loss.item()) if features.shape[0] else float("nan")

    def train_epoch(self) -> float:
        """Run one epoch of Poisson-sampled steps; return the mean of the batch losses."""
        losses = [self.step(features, targets) for features, targets in self.data_loader]
        finite = [x for x in losses if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else float("nan")

    def event(self) -> AccountingEvent | None:
        """Return the steps taken as an accounting event (``None`` if no step was taken).

        Record it in the branch's accountant after the round:
        ``accountant.record(event)``.
        """
        if self._steps == 0:
            return None
        return AccountingEvent(self.noise_multiplier, self.sample_rate, self._steps)

    def close(self) -> nn.Module:
        """Remove every hook and wrapper; return the plain model (trained in place)."""
        if not self._closed:
            self._closed = True
            if self._fast is not None:
                self._fast.close()
            if isinstance(self.model, AbstractGradSampleModule):
                self.model.to_standard_module()
        return self._original_model if self._original_model is not None else self.model

    def __enter__(self) -> "PrivateTraining":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _translate_opacus_errors(mode: str) -> Callable[[BaseException], DPTrainingError]:
    def translate(exc: BaseException) -> DPTrainingError:
        if isinstance(exc, UnsupportedError | NotImplementedError):
            return UnsupportedModelError(
                f"Opacus ({mode}) cannot compute per-sample gradients for this model: {exc}"
            )
        return DPTrainingError(f"Opacus ({mode}) refused the training set-up: {exc}")

    return translate


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    criterion: nn.Module,
    noise_multiplier: float,
    max_grad_norm: float,
    poisson_sampling: bool = True,
    grad_sample_mode: GradSampleMode = "hooks",
    max_steps: int | None = None,
    secure_mode: bool = False,
    seed: int | None = None,
) -> PrivateTraining:
    """Prepare a model, optimizer and data for DP-SGD (Abadi et al. 2016, arXiv:1607.00133).

    Unlike Opacus's ``PrivacyEngine.make_private``, this returns one typed object whatever the
    mode, creates no privacy engine and no accountant: the branch's persistent accountant
    records :meth:`PrivateTraining.event` after the round.

    Args:
        model: The model; its parameters must be those of ``optimizer``.
        optimizer: A torch optimizer over ``model``'s parameters.
        data_loader: Loader over a map-style dataset of ``(features, targets)`` with an
            integer ``batch_size``; the Poisson rate is q = batch size / dataset rows.
        criterion: A torch loss module (e.g. ``nn.BCEWithLogitsLoss()``); it is applied
            per example and averaged. The model must treat examples independently (no batch
            statistics), as DP-SGD's analysis assumes.
        noise_multiplier: σ > 0 (plan it with
            :func:`fedcrm.privacy.accounting.plan_noise_multiplier`).
        max_grad_norm: Clipping norm C > 0.
        poisson_sampling: Keep ``True``; ``False`` keeps ``data_loader`` as it is, and the ε
            the accountant reports becomes an approximation.
        grad_sample_mode: ``"hooks"``, ``"ew"``, ``"functorch"``, ``"ghost"`` (Opacus) or
            ``"fast-linear"`` (fedcrm; ``nn.Linear`` models only).
        max_steps: Steps admitted by the budget check; a further step raises
            :class:`StepLimitReached` before the update is applied.
        secure_mode: Opacus's cryptographically secure RNG; unavailable here.
        seed: Fixed seed for noise and sampling (tests only; ``None`` seeds from the OS CSPRNG).

    Returns:
        The prepared training objects.

    Raises:
        SecureModeUnavailable: ``secure_mode=True``.
        UnsupportedModelError: The model has layers the mode cannot handle.
        DPTrainingError: Another argument is invalid or Opacus refused the set-up.

    Warns:
        InsecureRNGWarning: Always (``secure_mode`` is unavailable).
        ApproximateAccountingWarning: ``poisson_sampling=False``.
    """
    if secure_mode:
        raise SecureModeUnavailable(
            "secure_mode needs Opacus's torchcsprng, which does not install with this torch "
            "and Python; run with secure_mode=False (noise from a PRNG seeded by the OS CSPRNG)"
        )
    for name, value in (("noise_multiplier", noise_multiplier), ("max_grad_norm", max_grad_norm)):
        if isinstance(value, bool) or not (
            isinstance(value, int | float) and math.isfinite(value) and value > 0
        ):
            raise DPTrainingError(f"{name} must be a finite number > 0, got {value!r}")
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise DPTrainingError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
    if grad_sample_mode not in (*_OPACUS_MODES, "fast-linear"):
        raise DPTrainingError(f"unknown grad_sample_mode {grad_sample_mode!r}")
    model_params = {id(p) for p in model.parameters()}
    if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
        raise DPTrainingError("the optimizer holds parameters that are not the model's")
    dataset = data_loader.dataset
    batch_size = data_loader.batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DPTrainingError("data_loader must have an integer batch_size (no batch_sampler)")
    try:
        num_rows = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise DPTrainingError("DP-SGD needs a map-style dataset with a length") from exc
    if batch_size > num_rows:
        raise DPTrainingError(f"batch_size {batch_size} exceeds the {num_rows} rows of the data")
    per_sample_loss = _PerSampleLoss(criterion)
    sample_rate = batch_size / num_rows

    warnings.warn(
        "DP noise and Poisson sampling use torch's PRNG seeded from the OS CSPRNG: Opacus "
        "secure_mode is unavailable here (torchcsprng does not install)",
        InsecureRNGWarning,
        stacklevel=2,
    )
    noise_generator = _generator(seed)
    sampling_generator = _generator(None if seed is None else seed + 1)
    loader: Any
    if poisson_sampling:
        if isinstance(dataset, TensorDataset):
            loader = _PoissonTensorLoader(
                dataset.tensors, sample_rate=sample_rate, generator=sampling_generator
            )
        else:
            loader = DPDataLoader(
                dataset,
                sample_rate=sample_rate,
                collate_fn=data_loader.collate_fn,
                generator=sampling_generator,
                num_workers=data_loader.num_workers,
            )
    else:
        warnings.warn(
            "poisson_sampling=False: batches are not Poisson-sampled, so the accountant's "
            "epsilon is an approximation",
            ApproximateAccountingWarning,
            stacklevel=2,
        )
        loader = data_loader

    if grad_sample_mode == "fast-linear":
        training = PrivateTraining(
            model=model,
            optimizer=optimizer,
            data_loader=loader,
            criterion=per_sample_loss,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            sample_rate=sample_rate,
            expected_batch_size=batch_size,
            grad_sample_mode=grad_sample_mode,
            max_steps=max_steps,
        )
        training._fast = _FastLinearEngine(
            model,
            optimizer,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=batch_size,
            generator=noise_generator,
            before_update=training._before_update,
        )
        training._per_sample_loss = per_sample_loss
        logger.info(
            "DP-SGD ready: mode fast-linear, sigma %.4f, C %.3g, q %.5f",
            noise_multiplier,
            max_grad_norm,
            sample_rate,
        )
        return training

    translate = _translate_opacus_errors(grad_sample_mode)
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
        if poisson_sampling:
            wrapped.forbid_grad_accumulation()
        optimizer_class = get_optimizer_class(
            clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode
        )
        dp_optimizer: DPOptimizer = optimizer_class(
            optimizer=optimizer,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=noise_generator,
            secure_mode=False,
        )
        loss_fn: Callable[..., Any] = per_sample_loss
        if grad_sample_mode == "ghost":
            loss_fn = DPLossFastGradientClipping(wrapped, dp_optimizer, per_sample_loss, "mean")
    except (UnsupportedError, NotImplementedError, ValueError, TypeError) as exc:
        raise translate(exc) from exc
    training = PrivateTraining(
        model=wrapped,
        optimizer=dp_optimizer,
        data_loader=loader,
        criterion=loss_fn,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        expected_batch_size=batch_size,
        grad_sample_mode=grad_sample_mode,
        max_steps=max_steps,
    )
    training._original_model = model
    dp_optimizer.attach_step_hook(training._before_update)
    logger.info(
        "DP-SGD ready: mode %s (opacus %s), sigma %.4f, C %.3g, q %.5f",
        grad_sample_mode,
        OPACUS_VERSION,
        noise_multiplier,
        max_grad_norm,
        sample_rate,
    )
    return training


# -- contribution bounding ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapReport:
    """What :func:`cap_rows_per_customer` did (aggregate counts only, no identifiers).

    Attributes:
        cap: Maximum rows kept per customer.
        rows_before: Rows in the input.
        rows_after: Rows kept.
        customers: Distinct customers.
        customers_capped: Customers who had more than ``cap`` rows.
    """

    cap: int
    rows_before: int
    rows_after: int
    customers: int
    customers_capped: int

    @property
    def rows_dropped(self) -> int:
        """Rows removed by the cap."""
        return self.rows_before - self.rows_after


def cap_rows_per_customer(
    frame: pd.DataFrame, id_column: str, cap: int, seed: int | None = None
) -> tuple[pd.DataFrame, CapReport]:
    """Keep at most ``cap`` rows per customer, chosen uniformly at random, before DP-SGD.

    DP-SGD protects one row. When a customer has k rows, the guarantee for that customer is
    only the group-privacy bound for k rows, so bound k first and record the cap with the run.
    Churn tables have one row per customer: record-level DP is already customer-level DP there
    and no cap is needed (``cap=1`` changes nothing). The cap is data-independent; the choice
    of rows does not depend on their content, and rows keep their original order.

    Args:
        frame: Rows of the branch, with a customer identifier (pseudonymised) column.
        id_column: Name of that column.
        cap: Maximum rows per customer, >= 1.
        seed: Seed of the row choice (``None``: fresh OS randomness).

    Returns:
        The capped frame (original order) and a report of counts.

    Raises:
        DataError: The column is missing or has missing identifiers, or ``cap`` < 1.
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise DataError(f"cap must be an integer >= 1, got {cap!r}")
    if id_column not in frame.columns:
        raise DataError(f"column {id_column!r} not found; cannot bound rows per customer")
    ids = frame[id_column]
    if bool(ids.isna().any()):
        raise DataError(
            f"{int(ids.isna().sum())} row(s) have no {id_column!r}; rows without a customer "
            "cannot be bounded: fix or drop them first"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(frame))
    shuffled = ids.iloc[order].reset_index(drop=True)
    rank = shuffled.groupby(shuffled, sort=False).cumcount().to_numpy()
    keep = np.sort(order[rank < cap])
    counts = ids.value_counts()
    report = CapReport(
        cap=cap,
        rows_before=len(frame),
        rows_after=len(keep),
        customers=len(counts),
        customers_capped=int((counts > cap).sum()),
    )
    logger.info(
        "contribution bound: cap %d rows/customer, %d of %d rows kept, %d customers capped",
        cap,
        report.rows_after,
        report.rows_before,
        report.customers_capped,
    )
    return frame.iloc[keep], report
