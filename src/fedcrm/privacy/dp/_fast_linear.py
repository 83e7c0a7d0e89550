"""DP-SGD without Opacus for models built from ``nn.Linear`` layers: clipping and the engine.

``grad_sample_mode="fast-linear"``: per-sample gradient norms from the ghost-norm identity,
exact flat clipping and one matrix product per layer, without materialising per-sample
gradients. Also the per-example loss every mode uses. See
docs/privacy-analysis.md#dp-sgd-on-a-branch.
"""

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from fedcrm.privacy.dp._errors import DPTrainingError, UnsupportedModelError


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


class PerSampleLoss(nn.Module):
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
        """One loss per example, shape (B,)."""
        losses = cast(Tensor, self.inner(output, target))
        if losses.dim() == 0:
            raise DPTrainingError("the criterion returned a scalar with reduction='none'")
        if losses.dim() == 1:
            return losses
        if losses.numel() == losses.shape[0]:  # (B, 1): one loss per example already
            return losses.reshape(-1)
        return losses.reshape(losses.shape[0], -1).mean(dim=1)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        """The per-example losses reduced as ``self.reduction`` says (Opacus sets it)."""
        losses = self.per_sample(output, target)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean()


@dataclass(frozen=True, slots=True)
class _Capture:
    module: nn.Linear
    activations: Tensor
    output: Tensor


class FastLinearEngine:
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
        criterion: PerSampleLoss,
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
        self.criterion = criterion
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
        """Remove the hooks and the gradient views from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in self.params:
            param.grad = None

    def _backprops(
        self, features: Tensor, targets: Tensor
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
        total = self.criterion.per_sample(output, targets).sum()
        backprops = torch.autograd.grad(total, [c.output for c in captures])
        return total.detach(), captures, backprops

    def noisy_gradients(
        self, features: Tensor, targets: Tensor
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
        total, captures, backprops = self._backprops(features, targets)
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

    def step(self, features: Tensor, targets: Tensor) -> float:
        """One noisy step on a batch; its mean loss (NaN for an empty batch)."""
        loss, _ = self.noisy_gradients(features, targets)
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
