"""Churn metrics, exact on one table and pooled across branches from score histograms.

A branch cannot send its scores and labels (they are per-customer data). It sends, for its
validation and test rows, how many positives and negatives fall in each of `BINS` equal-width
probability bins. The server adds the histograms and computes ROC-AUC, PR-AUC and F1 of the
pooled rows; ties inside a bin count half, so the pooled AUC is exact up to the bin width.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, log_loss, roc_auc_score

BINS = 1000
_EPS = 1e-7


@dataclass(frozen=True)
class ScoreHistogram:
    """Counts of positive and negative rows per probability bin."""

    pos: np.ndarray
    neg: np.ndarray

    @classmethod
    def of(cls, y: np.ndarray, p: np.ndarray, bins: int = BINS) -> "ScoreHistogram":
        """Histogram of probabilities ``p`` split by binary labels ``y``."""
        idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)
        pos = np.bincount(idx[y == 1], minlength=bins)
        neg = np.bincount(idx[y == 0], minlength=bins)
        return cls(pos.astype(np.int64), neg.astype(np.int64))

    def __add__(self, other: "ScoreHistogram") -> "ScoreHistogram":
        return ScoreHistogram(self.pos + other.pos, self.neg + other.neg)

    @property
    def bins(self) -> int:
        """Number of bins."""
        return len(self.pos)

    def roc_auc(self) -> float:
        """ROC-AUC of the histogrammed rows (NaN when one class is absent)."""
        p_tot, n_tot = self.pos.sum(), self.neg.sum()
        if p_tot == 0 or n_tot == 0:
            return float("nan")
        neg_below = np.cumsum(self.neg) - self.neg
        wins = (self.pos * (neg_below + 0.5 * self.neg)).sum()
        return float(wins / (p_tot * n_tot))

    def pr_auc(self) -> float:
        """Average precision, thresholds at bin edges from high to low (NaN without positives)."""
        p_tot = self.pos.sum()
        if p_tot == 0:
            return float("nan")
        tp = np.cumsum(self.pos[::-1])
        fp = np.cumsum(self.neg[::-1])
        keep = (self.pos[::-1] + self.neg[::-1]) > 0
        precision = tp[keep] / (tp[keep] + fp[keep])
        recall = tp[keep] / p_tot
        prev = np.concatenate([[0.0], recall[:-1]])
        return float(((recall - prev) * precision).sum())

    def f1_at(self, threshold: float) -> float:
        """F1 when predicting churn for probability ≥ ``threshold`` (rounded to a bin edge)."""
        cut = round(threshold * self.bins)
        tp = self.pos[cut:].sum()
        fp = self.neg[cut:].sum()
        fn = self.pos[:cut].sum()
        return float(2 * tp / (2 * tp + fp + fn)) if tp > 0 else 0.0

    def best_threshold(self) -> float:
        """The bin edge that maximises F1 on these rows (tuned on validation data)."""
        tp = np.cumsum(self.pos[::-1])[::-1]
        fp = np.cumsum(self.neg[::-1])[::-1]
        fn = self.pos.sum() - tp
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        return float(int(np.argmax(f1)) / self.bins)


@dataclass(frozen=True)
class ChurnMetrics:
    """Metrics of a churn model on one test set, with the F1 threshold tuned on validation."""

    roc_auc: float
    pr_auc: float
    f1: float
    threshold: float
    log_loss: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict for JSON."""
        return {
            "roc_auc": self.roc_auc,
            "pr_auc": self.pr_auc,
            "f1": self.f1,
            "threshold": self.threshold,
            "log_loss": self.log_loss,
        }


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Threshold on validation scores ``p`` that maximises F1 (exact, over observed scores)."""
    order = np.argsort(-p)
    ys, ps = y[order], p[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(1 - ys)
    f1 = 2 * tp / np.maximum(tp + fp + ys.sum(), 1)
    # Only cut between distinct scores.
    last_of_run = np.r_[ps[1:] != ps[:-1], True]
    f1 = np.where(last_of_run, f1, -1.0)
    return float(ps[int(np.argmax(f1))])


def exact_metrics(
    y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray
) -> ChurnMetrics:
    """Exact metrics on pooled rows (the researcher's view in a simulation and baselines)."""
    threshold = best_f1_threshold(y_val, p_val)
    return ChurnMetrics(
        roc_auc=float(roc_auc_score(y_test, p_test)),
        pr_auc=float(average_precision_score(y_test, p_test)),
        f1=float(f1_score(y_test, (p_test >= threshold).astype(int), zero_division=0.0)),
        threshold=threshold,
        log_loss=float(log_loss(y_test, np.clip(p_test, _EPS, 1 - _EPS), labels=[0, 1])),
    )


def log_loss_sum(y: np.ndarray, p: np.ndarray) -> float:
    """Sum (not mean) of binary log loss, so branches' sums add up to the pooled loss."""
    q = np.clip(p, _EPS, 1 - _EPS)
    return float(-(y * np.log(q) + (1 - y) * np.log(1 - q)).sum())


def spread(values: Sequence[float]) -> dict[str, float]:
    """Min, max, mean and standard deviation of per-branch values, NaNs ignored."""
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"min": float("nan"), "max": float("nan"), "mean": float("nan"), "std": float("nan")}
    return {
        "min": float(arr.min()),
        "max": float(arr.max()),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
    }
