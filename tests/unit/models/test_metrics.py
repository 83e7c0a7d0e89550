import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from fedcrm.models.metrics import (
    ScoreHistogram,
    best_f1_threshold,
    exact_metrics,
    log_loss_sum,
    spread,
)


def _data(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, p


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), splits=st.integers(1, 8))
def test_pooled_histograms_match_exact_metrics(seed: int, splits: int) -> None:
    y, p = _data(seed)
    parts = np.array_split(np.arange(len(y)), splits)
    hists = [ScoreHistogram.of(y[i], p[i]) for i in parts]
    pooled = sum(hists[1:], hists[0])
    assert pooled.roc_auc() == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert pooled.pr_auc() == pytest.approx(average_precision_score(y, p), abs=1e-2)
    t = pooled.best_threshold()
    assert pooled.f1_at(t) == pytest.approx(f1_score(y, p >= t), abs=1e-2)


def test_single_class_auc_is_nan() -> None:
    h = ScoreHistogram.of(np.zeros(5, dtype=int), np.linspace(0, 1, 5))
    assert np.isnan(h.roc_auc()) and np.isnan(h.pr_auc())


def test_best_threshold_maximises_f1() -> None:
    y, p = _data(1)
    t = best_f1_threshold(y, p)
    best = f1_score(y, p >= t)
    for cand in np.linspace(0.05, 0.95, 37):
        assert f1_score(y, p >= cand) <= best + 1e-12


def test_exact_metrics_and_log_loss_sum() -> None:
    y, p = _data(2)
    m = exact_metrics(y, p, y, p)
    assert m.roc_auc == pytest.approx(roc_auc_score(y, p))
    assert log_loss_sum(y, p) / len(y) == pytest.approx(m.log_loss)


def test_spread_ignores_nan() -> None:
    s = spread([0.5, float("nan"), 0.7])
    assert s["min"] == 0.5 and s["max"] == 0.7 and s["std"] == pytest.approx(0.1)
