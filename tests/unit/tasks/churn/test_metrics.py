"""The churn task's pooled evaluation: branch histograms pooled equal scoring everyone at once."""

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from fedcrm import wire as k
from fedcrm.exceptions import InconsistentReplies
from fedcrm.models.metrics import ScoreHistogram, log_loss_sum
from fedcrm.tasks.churn.metrics import aggregate_churn_evaluation
from fedcrm.tasks.churn.settings import ChurnSettings
from fedcrm.tasks.churn.task import ChurnTask


def _scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.3).astype(int)
    return y, np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 1e-3, 1 - 1e-3)


def _reply(y_val: np.ndarray, p_val: np.ndarray, y: np.ndarray, p: np.ndarray) -> RecordDict:
    """A branch's evaluation reply, as `ChurnTask.evaluate` builds it."""
    val, test = ScoreHistogram.of(y_val, p_val), ScoreHistogram.of(y, p)
    values = {
        k.KEY_NUM_EXAMPLES: len(y_val) + len(y),
        k.KEY_LOSS_SUM: log_loss_sum(y_val, p_val) + log_loss_sum(y, p),
        k.KEY_BRANCH_AUC: float(roc_auc_score(y, p)),
        k.KEY_HIST_VAL_POS: val.pos.tolist(),
        k.KEY_HIST_VAL_NEG: val.neg.tolist(),
        k.KEY_HIST_TEST_POS: test.pos.tolist(),
        k.KEY_HIST_TEST_NEG: test.neg.tolist(),
    }
    return RecordDict({"metrics": MetricRecord(values)})  # type: ignore[arg-type]


def test_pooled_metrics_match_sklearn_on_all_branches_rows() -> None:
    rng = np.random.default_rng(3)
    parts = [(*_scores(rng, n), *_scores(rng, n)) for n in (120, 300, 80)]
    pooled = aggregate_churn_evaluation([_reply(*p) for p in parts], k.KEY_NUM_EXAMPLES)
    y_val, p_val = (np.concatenate([p[i] for p in parts]) for i in (0, 1))
    y, p = (np.concatenate([part[i] for part in parts]) for i in (2, 3))
    assert pooled["roc-auc"] == pytest.approx(roc_auc_score(y, p), abs=2e-3)
    assert pooled["val-roc-auc"] == pytest.approx(roc_auc_score(y_val, p_val), abs=2e-3)
    assert pooled["pr-auc"] == pytest.approx(average_precision_score(y, p), abs=1e-2)
    both_y, both_p = np.concatenate([y_val, y]), np.concatenate([p_val, p])
    assert pooled["log-loss"] == pytest.approx(log_loss(both_y, both_p))
    assert pooled[k.KEY_NUM_EXAMPLES] == len(both_y) and pooled["num-branches"] == 3
    branch = [roc_auc_score(part[2], part[3]) for part in parts]
    assert pooled["branch-auc-min"] == pytest.approx(min(branch))
    assert pooled["branch-auc-max"] == pytest.approx(max(branch))
    # The task's pooling is this function, and its selection metric is among the results.
    task = ChurnTask()
    settings = ChurnSettings()
    again = task.aggregate_evaluation(settings, [_reply(*p) for p in parts], k.KEY_NUM_EXAMPLES)
    assert dict(again) == dict(pooled)
    assert task.selection_metric(settings) in pooled and task.headline(settings)[1] in pooled


def test_a_list_where_a_number_belongs_is_refused() -> None:
    rng = np.random.default_rng(0)
    reply = _reply(*_scores(rng, 50), *_scores(rng, 50))
    reply.metric_records["metrics"][k.KEY_LOSS_SUM] = [1.0, 2.0]
    with pytest.raises(InconsistentReplies, match="must be a number"):
        aggregate_churn_evaluation([reply], k.KEY_NUM_EXAMPLES)
