"""Server-side aggregation of branch evaluation replies into pooled churn metrics."""

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedcrm import wire as k
from fedcrm.exceptions import InconsistentReplies
from fedcrm.models.metrics import ScoreHistogram, spread


def _hist(record: MetricRecord, pos: str, neg: str) -> ScoreHistogram:
    return ScoreHistogram(
        np.asarray(record[pos], dtype=np.int64), np.asarray(record[neg], dtype=np.int64)
    )


def _scalar(record: MetricRecord, key: str) -> float:
    value = record[key]
    if isinstance(value, list):
        raise InconsistentReplies(f"metric {key!r} must be a number, got a list")
    return float(value)


def aggregate_churn_evaluation(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Pool branches' score histograms into ROC-AUC, PR-AUC, F1 and log loss.

    The F1 threshold is tuned on the pooled validation histogram, then applied to the pooled
    test histogram. The spread of per-branch test AUC shows how unevenly the global model
    serves the branches (NaN AUCs of single-class branches are left out of the spread).
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    vals = [_hist(m, k.KEY_HIST_VAL_POS, k.KEY_HIST_VAL_NEG) for m in metrics]
    tests = [_hist(m, k.KEY_HIST_TEST_POS, k.KEY_HIST_TEST_NEG) for m in metrics]
    val, test = sum(vals[1:], vals[0]), sum(tests[1:], tests[0])
    loss_sum = sum(_scalar(m, k.KEY_LOSS_SUM) for m in metrics)
    n = round(sum(_scalar(m, weight_key) for m in metrics))
    threshold = val.best_threshold()
    branch_auc = [_scalar(m, k.KEY_BRANCH_AUC) for m in metrics]
    s = spread(branch_auc)
    return MetricRecord(
        {
            "roc-auc": test.roc_auc(),
            "val-roc-auc": val.roc_auc(),
            "pr-auc": test.pr_auc(),
            "f1": test.f1_at(threshold),
            "threshold": threshold,
            "log-loss": loss_sum / max(n, 1),
            "branch-auc-min": s["min"],
            "branch-auc-max": s["max"],
            "branch-auc-std": s["std"],
            "num-branches": len(metrics),
            weight_key: n,
        }
    )
