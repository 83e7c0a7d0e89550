import numpy as np
import pytest
import torch

from fedcrm.models.churn import (
    TrainSettings,
    build_model,
    model_from_state,
    predict_proba,
    train_local,
)


def _xy(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.float32)
    return x, y


def test_build_is_deterministic_and_keeps_global_rng() -> None:
    before = torch.random.get_rng_state()
    a, b = build_model(8, seed=3), build_model(8, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_training_lowers_loss() -> None:
    x, y = _xy()
    model = build_model(8, seed=0)
    first = train_local(model, x, y, TrainSettings(epochs=1, lr=0.05), seed=0)
    later = train_local(model, x, y, TrainSettings(epochs=5, lr=0.05), seed=1)
    assert later < first
    p = predict_proba(model, x)
    assert ((p > 0.5) == (y == 1)).mean() > 0.9


def test_proximal_term_keeps_weights_near_global() -> None:
    x, y = _xy(1)
    global_state = {k: v.clone() for k, v in build_model(8, seed=0).state_dict().items()}

    def drift(mu: float) -> float:
        model = build_model(8, seed=0)
        train_local(
            model,
            x,
            y,
            TrainSettings(epochs=3, lr=0.01, proximal_mu=mu),
            seed=0,
            global_state=global_state,
        )
        return sum(
            ((p.detach() - global_state[n]) ** 2).sum().item() for n, p in model.named_parameters()
        )

    assert drift(10.0) < drift(0.0)


def test_model_from_state_rebuilds_any_architecture() -> None:
    for hidden in [(), (16,), (64, 32)]:
        model = build_model(5, seed=1, hidden=hidden)
        rebuilt = model_from_state(model.state_dict())
        x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
        np.testing.assert_array_equal(predict_proba(model, x), predict_proba(rebuilt, x))
    with pytest.raises(ValueError, match="not a churn model state"):
        model_from_state({"weight": torch.zeros(2, 2)})


def test_adam_optimizer_option_trains_too() -> None:
    x, y = _xy(2)
    model = build_model(8, seed=0)
    train_local(model, x, y, TrainSettings(epochs=5, lr=0.01, optimizer="adam"), seed=0)
    assert ((predict_proba(model, x) > 0.5) == (y == 1)).mean() > 0.9
