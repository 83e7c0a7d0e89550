"""Record-level DP-SGD on a branch: :func:`make_private` and the :class:`PrivateTraining` it makes.

One typed object whatever the per-sample gradient mode (Opacus's, through the adapter, or
fedcrm's fast-linear engine), Poisson-sampled batches, and a step limit from the budget check.
No accountant lives here: the branch's persistent accountant records
:meth:`PrivateTraining.event` after the round. See docs/privacy-analysis.md#dp-sgd-on-a-branch
for the mechanism and docs/privacy-analysis.md#randomness for the RNG's limits.
"""

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fedcrm.privacy.dp._analysis import AccountingEvent, steps_per_epoch
from fedcrm.privacy.dp._config import GradSampleMode
from fedcrm.privacy.dp._errors import (
    ApproximateAccountingWarning,
    DPTrainingError,
    InsecureRNGWarning,
    SecureModeUnavailable,
    StepLimitReached,
)
from fedcrm.privacy.dp._fast_linear import FastLinearEngine, PerSampleLoss
from fedcrm.privacy.dp._opacus import OPACUS_MODES, OPACUS_VERSION, OpacusEngine, poisson_loader

logger = logging.getLogger(__name__)

_MASK_CHUNK = 1 << 22


class _Engine(Protocol):
    """What :class:`PrivateTraining` drives: Opacus's modes or the fast-linear engine."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def criterion(self) -> Callable[..., Any]: ...

    def step(self, features: Tensor, targets: Tensor) -> float: ...

    def close(self) -> None: ...


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


class _StepLimit:
    """Counts the noisy steps of a round and refuses one past the number admitted."""

    def __init__(self, max_steps: int | None) -> None:
        self.max_steps = max_steps
        self.taken = 0

    def __call__(self, *_: object) -> None:
        if self.max_steps is not None and self.taken >= self.max_steps:
            raise StepLimitReached(
                f"step {self.taken + 1} refused: the budget check admitted {self.max_steps} "
                "steps for this round"
            )
        self.taken += 1


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
        engine: _Engine,
        original_model: nn.Module,
        data_loader: Any,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: int,
        grad_sample_mode: GradSampleMode,
        limit: _StepLimit,
    ) -> None:
        self.model = engine.model
        self.optimizer = engine.optimizer
        self.data_loader = data_loader
        self.criterion = engine.criterion
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self.expected_batch_size = expected_batch_size
        self.grad_sample_mode = grad_sample_mode
        self.max_steps = limit.max_steps
        self._engine = engine
        self._original_model = original_model
        self._limit = limit
        self._closed = False

    @property
    def steps_taken(self) -> int:
        """Noisy steps taken so far (each one spends privacy)."""
        return self._limit.taken

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch of :attr:`data_loader`."""
        return len(self.data_loader)

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
        return self._engine.step(features, targets)

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
        if self._limit.taken == 0:
            return None
        return AccountingEvent(self.noise_multiplier, self.sample_rate, self._limit.taken)

    def close(self) -> nn.Module:
        """Remove every hook and wrapper; return the plain model (trained in place)."""
        if not self._closed:
            self._closed = True
            self._engine.close()
        return self._original_model

    def __enter__(self) -> "PrivateTraining":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


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
        noise_multiplier: σ > 0 (plan it with :func:`fedcrm.privacy.dp.plan_noise_multiplier`).
        max_grad_norm: Clipping norm C > 0.
        poisson_sampling: Keep ``True``; ``False`` keeps ``data_loader`` as it is, and the ε
            the accountant reports becomes an approximation.
        grad_sample_mode: ``"hooks"``, ``"ew"``, ``"functorch"``, ``"ghost"`` (Opacus) or
            ``"fast-linear"`` (fedcrm; ``nn.Linear`` models only).
        max_steps: Steps admitted by the budget check; a further step raises
            :class:`~fedcrm.privacy.dp.StepLimitReached` before the update is applied.
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
    if grad_sample_mode not in (*OPACUS_MODES, "fast-linear"):
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
    per_sample_loss = PerSampleLoss(criterion)
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
            loader = poisson_loader(
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

    limit = _StepLimit(max_steps)
    engine: _Engine
    if grad_sample_mode == "fast-linear":
        engine = FastLinearEngine(
            model,
            optimizer,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=batch_size,
            generator=noise_generator,
            criterion=per_sample_loss,
            before_update=limit,
        )
        logger.info(
            "DP-SGD ready: mode fast-linear, sigma %.4f, C %.3g, q %.5f",
            noise_multiplier,
            max_grad_norm,
            sample_rate,
        )
    else:
        engine = OpacusEngine(
            model,
            optimizer,
            grad_sample_mode=grad_sample_mode,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            expected_batch_size=batch_size,
            generator=noise_generator,
            criterion=per_sample_loss,
            forbid_grad_accumulation=poisson_sampling,
            before_update=limit,
        )
        logger.info(
            "DP-SGD ready: mode %s (opacus %s), sigma %.4f, C %.3g, q %.5f",
            grad_sample_mode,
            OPACUS_VERSION,
            noise_multiplier,
            max_grad_norm,
            sample_rate,
        )
    return PrivateTraining(
        engine=engine,
        original_model=model,
        data_loader=loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        expected_batch_size=batch_size,
        grad_sample_mode=grad_sample_mode,
        limit=limit,
    )
