"""DP-SGD on a branch: set-up in every mode, clipping, step limits, error translation, sampling."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedcrm.privacy.dp import (
    ApproximateAccountingWarning,
    BranchAccountant,
    DPTrainingError,
    InsecureRNGWarning,
    PrivateTraining,
    SecureModeUnavailable,
    StepLimitReached,
    UnsupportedModelError,
    clip_per_sample,
    make_private,
    plan_noise_multiplier,
    steps_per_epoch,
)

WIDTH = 40
ROWS = 256
BATCH = 32
C = 0.5
MODES = ["hooks", "ew", "functorch", "ghost", "fast-linear"]


class ChurnLikeMLP(nn.Module):
    """Same shape as the churn model: Linear-ReLU-Linear-ReLU-Linear, one logit."""

    def __init__(self, squeeze: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)
        )
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out.squeeze(-1) if self.squeeze else out


@pytest.fixture
def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, WIDTH, generator=gen) * 2.0
    y = (x[:, :1] + 0.3 * torch.randn(ROWS, 1, generator=gen) > 0).float()
    return TensorDataset(x, y)


def _private(
    model: nn.Module, data: Dataset[tuple[torch.Tensor, ...]], mode: str, **kwargs: object
) -> PrivateTraining:
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    options: dict[str, object] = {
        "noise_multiplier": 1.0,
        "max_grad_norm": C,
        "grad_sample_mode": mode,
        "seed": 7,
    }
    options.update(kwargs)
    with pytest.warns(InsecureRNGWarning, match="secure_mode is unavailable"):
        return make_private(
            model,
            optimizer,
            DataLoader(data, batch_size=BATCH),
            criterion=nn.BCEWithLogitsLoss(),
            **options,  # type: ignore[arg-type]
        )


def _params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", MODES)
def test_short_dp_sgd_training_runs_and_counts_its_steps(data: TensorDataset, mode: str) -> None:
    model = ChurnLikeMLP()
    before = _params(model)
    with _private(model, data, mode) as private:
        loss = private.train_epoch()
        assert np.isfinite(loss)
        assert private.steps_taken == private.steps_per_epoch == steps_per_epoch(BATCH / ROWS)
        event = private.event()
    assert event is not None
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (1.0, BATCH / ROWS, 8)
    assert not torch.equal(before, _params(model))
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("squeeze", [False, True], ids=["logit-B1", "logit-B"])
def test_every_mode_applies_the_same_clipped_update(data: TensorDataset, squeeze: bool) -> None:
    """With negligible noise one SGD step (lr 1) is minus the mean clipped gradient."""
    base = ChurnLikeMLP(squeeze=squeeze)
    x, y = data.tensors[0][:BATCH], data.tensors[1][:BATCH]
    target = y.squeeze(-1) if squeeze else y
    updates = {}
    for mode in MODES:
        model = copy.deepcopy(base)
        with _private(model, data, mode, noise_multiplier=1e-9) as private:
            private.step(x, target)
        updates[mode] = _params(base) - _params(model)
    # Independent reference: per-sample gradients by plain autograd, one example at a time.
    grads = []
    for i in range(BATCH):
        model = copy.deepcopy(base)
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(x[i : i + 1]), target[i : i + 1]
        )
        grads.append(
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
        )
    reference = clip_per_sample(torch.stack(grads), C).sum(dim=0) / BATCH
    for mode, update in updates.items():
        torch.testing.assert_close(update, reference, atol=1e-5, rtol=1e-4, msg=mode)


def test_opacus_per_sample_gradients_are_clipped_to_c(data: TensorDataset) -> None:
    model = ChurnLikeMLP()
    with _private(model, data, "hooks", max_grad_norm=1e-3) as private:
        x, y = data.tensors[0][:BATCH], data.tensors[1][:BATCH]
        private.step(x, y)
        per_sample = torch.cat(
            [p.grad_sample.reshape(BATCH, -1) for p in model.parameters()],  # type: ignore[attr-defined]
            dim=1,
        )
    assert per_sample.norm(dim=1).max() > 1e-3  # the raw gradients do need clipping
    clipped = clip_per_sample(per_sample, 1e-3)
    assert clipped.norm(dim=1).max() <= 1e-3 * (1 + 1e-5)


@settings(max_examples=50, deadline=None)
@given(
    grads=arrays(
        np.float32,
        st.tuples(st.integers(1, 16), st.integers(1, 30)),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    max_norm=st.floats(1e-3, 1e3),
)
def test_clipped_per_sample_norm_is_at_most_c(grads: np.ndarray, max_norm: float) -> None:
    tensor = torch.from_numpy(grads)
    clipped = clip_per_sample(tensor, max_norm)
    norms = clipped.double().norm(dim=1)
    assert bool((norms <= max_norm * (1 + 1e-5)).all())
    small = tensor.double().norm(dim=1) <= max_norm * 0.5
    torch.testing.assert_close(clipped[small], tensor[small], rtol=1e-5, atol=1e-6)


def test_step_limit_from_the_budget_check_is_enforced(data: TensorDataset) -> None:
    model = ChurnLikeMLP()
    x, y = data.tensors[0][:BATCH], data.tensors[1][:BATCH]
    for mode in ("hooks", "fast-linear"):
        with _private(model, data, mode, max_steps=2) as private:
            private.step(x, y)
            private.step(x, y)
            frozen = _params(model)
            with pytest.raises(StepLimitReached, match="admitted 2 steps"):
                private.step(x, y)
            assert torch.equal(frozen, _params(model))
            assert private.steps_taken == 2


def test_fast_linear_refuses_a_direct_optimizer_step(data: TensorDataset) -> None:
    model = ChurnLikeMLP()
    with _private(model, data, "fast-linear") as private:
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(data.tensors[0]), data.tensors[1]
        )
        torch.autograd.backward(loss)
        with pytest.raises(DPTrainingError, match="would not be private"):
            private.optimizer.step()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # the guard is gone after close()


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(WIDTH, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


@pytest.mark.parametrize("mode", ["hooks", "fast-linear"])
def test_unsupported_layers_become_project_errors(data: TensorDataset, mode: str) -> None:
    with pytest.raises(UnsupportedModelError, match=r"(?i)batch ?norm"):
        _private(WithBatchNorm(), data, mode)


def test_fast_linear_rejects_non_linear_parameters(data: TensorDataset) -> None:
    model = nn.Sequential(nn.Linear(WIDTH, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        _private(model, data, "fast-linear")


def test_secure_mode_and_bad_arguments_are_refused(data: TensorDataset) -> None:
    model = ChurnLikeMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=BATCH)
    criterion = nn.BCEWithLogitsLoss()
    with pytest.raises(SecureModeUnavailable, match="torchcsprng"):
        make_private(
            model,
            optimizer,
            loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            secure_mode=True,
        )
    for sigma, clip in [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, -2.0), (1.0, float("nan"))]:
        with pytest.raises(DPTrainingError, match="must be a finite number > 0"):
            make_private(
                model,
                optimizer,
                loader,
                criterion=criterion,
                noise_multiplier=sigma,
                max_grad_norm=clip,
            )
    other = torch.optim.SGD(ChurnLikeMLP().parameters(), lr=0.1)
    with pytest.raises(DPTrainingError, match="not the model's"):
        make_private(
            model,
            other,
            loader,
            criterion=criterion,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks",
        )


class RowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, inner: TensorDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.inner[index]
        return x, y


def test_generic_datasets_use_opacus_poisson_loader(data: TensorDataset) -> None:
    model = ChurnLikeMLP()
    with _private(model, RowDataset(data), "hooks") as private:
        private.train_epoch()
        assert private.steps_taken == 8


def test_without_poisson_sampling_the_accounting_is_flagged_approximate(
    data: TensorDataset,
) -> None:
    model = ChurnLikeMLP()
    with pytest.warns(ApproximateAccountingWarning):
        private = _private(model, data, "fast-linear", poisson_sampling=False)
    with private:
        private.train_epoch()
        assert private.steps_taken == len(DataLoader(data, batch_size=BATCH))


def test_persistent_accountant_counts_every_round_across_restarts(
    data: TensorDataset, tmp_path: Path
) -> None:
    delta, budget, rounds = 1e-3, 4.0, 3
    q = BATCH / ROWS
    sigma = plan_noise_multiplier(
        target_epsilon=budget,
        delta=delta,
        sample_rate=q,
        steps_per_round=steps_per_epoch(q),
        rounds=rounds,
    )
    path = tmp_path / "accountant.json"
    model = ChurnLikeMLP()
    spent = [0.0]
    for _ in range(rounds + 1):
        accountant = BranchAccountant.open(path)  # a new process each round
        decision = accountant.would_exceed(
            noise_multiplier=sigma,
            sample_rate=q,
            steps=steps_per_epoch(q),
            delta=delta,
            budget=budget,
        )
        if not decision.admitted:
            break
        with _private(
            model, data, "fast-linear", noise_multiplier=sigma, max_steps=steps_per_epoch(q)
        ) as private:
            private.train_epoch()
            event = private.event()
        assert event is not None
        accountant.record(event)
        accountant.save(path)
        spent.append(accountant.epsilon(delta))
    assert len(spent) == rounds + 1  # the planned rounds ran, the extra one was refused
    assert spent == sorted(spent)
    assert spent[-1] <= budget


def test_batches_follow_the_poisson_law() -> None:
    ids = torch.arange(ROWS, dtype=torch.float32)[:, None].expand(ROWS, WIDTH).contiguous()
    data = TensorDataset(ids, torch.zeros(ROWS, 1))
    with _private(ChurnLikeMLP(), data, "fast-linear") as private:
        counts = torch.zeros(ROWS)
        sizes = []
        epochs = 60
        for _ in range(epochs):
            for x, _y in private.data_loader:
                sizes.append(x.shape[0])
                rows = x[:, 0].long()
                assert rows.unique().numel() == rows.numel()  # no row twice in a batch
                counts[rows] += 1
    steps = epochs * steps_per_epoch(BATCH / ROWS)
    assert len(sizes) == steps
    # Mean batch size is q * n; every row is drawn with probability q at every step.
    q = BATCH / ROWS
    assert abs(np.mean(sizes) - BATCH) < 4 * np.sqrt(BATCH * (1 - q) / steps)
    rate = counts / steps
    assert abs(float(rate.mean()) - q) < 4 * np.sqrt(q * (1 - q) / steps / ROWS)
    assert float(rate.min()) > 0


@pytest.mark.parametrize("mode", ["hooks", "ghost", "fast-linear"])
def test_an_empty_poisson_batch_is_a_pure_noise_step(data: TensorDataset, mode: str) -> None:
    model = ChurnLikeMLP()
    before = _params(model)
    with _private(model, data, mode) as private:
        loss = private.step(data.tensors[0][:0], data.tensors[1][:0])
        assert np.isnan(loss)
        assert private.steps_taken == 1
    assert not torch.equal(before, _params(model))  # noise moved the weights
