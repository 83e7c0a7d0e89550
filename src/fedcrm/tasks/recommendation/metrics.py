"""Pooling of per-branch ranking metrics, their message-record form, and the published anchors.

Branches report HR@k / NDCG@k as sums with a user count (`RankingMetrics`); the pooled value
is the sum of sums over the sum of counts, which equals evaluating all users at once. The
record keys below are what a branch puts in its evaluation reply's metric record; validation
sums carry the prefix ``val-``.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from flwr.app import MetricRecord, RecordDict

from fedcrm import wire as k
from fedcrm.exceptions import InconsistentReplies
from fedcrm.models.rec_training import DEFAULT_K, RankingMetrics

KEY_EVAL_USERS: Final = "num-eval-users"
"""Record key of the number of evaluated users."""


def metric_keys(k: int = DEFAULT_K) -> dict[str, str]:
    """Return the record key of each `RankingMetrics` sum at cut-off ``k``."""
    return {
        "hr_sampled_sum": f"hr{k}-sampled-sum",
        "ndcg_sampled_sum": f"ndcg{k}-sampled-sum",
        "hr_full_sum": f"hr{k}-full-sum",
        "ndcg_full_sum": f"ndcg{k}-full-sum",
    }


def to_record(metrics: RankingMetrics) -> dict[str, int | float]:
    """Flatten metrics into a metric-record mapping (sums and the user count)."""
    record: dict[str, int | float] = {KEY_EVAL_USERS: metrics.count}
    for attribute, key in metric_keys(metrics.k).items():
        record[key] = float(getattr(metrics, attribute))
    return record


def from_record(record: Mapping[str, int | float], k: int = DEFAULT_K) -> RankingMetrics:
    """Read metrics back from a branch's metric record.

    Raises:
        InconsistentReplies: A key is missing, or a sum is negative or exceeds the user count.
    """
    keys = metric_keys(k)
    missing = sorted(key for key in (KEY_EVAL_USERS, *keys.values()) if key not in record)
    if missing:
        raise InconsistentReplies(f"ranking metrics record lacks {missing}")
    count = int(record[KEY_EVAL_USERS])
    sums = {attribute: float(record[key]) for attribute, key in keys.items()}
    bad = sorted(a for a, v in sums.items() if not 0.0 <= v <= count)
    if count < 0 or bad:
        raise InconsistentReplies(f"ranking sums {bad} must lie in [0, {count}] (the user count)")
    return RankingMetrics(k=k, count=count, **sums)


def pool(parts: Iterable[RankingMetrics], k: int = DEFAULT_K) -> RankingMetrics:
    """Add branch results: exactly the metrics of evaluating all their users together.

    Raises:
        DataError: The parts were computed at different cut-offs.
    """
    total = RankingMetrics.empty(k)
    for part in parts:
        total = total + part
    return total


def pooled_keys(at: int) -> dict[str, str]:
    """The pooled metric names at cut-off ``at`` (``hr10-sampled`` ...), by attribute."""
    return {
        "hr_sampled": f"hr{at}-sampled",
        "ndcg_sampled": f"ndcg{at}-sampled",
        "hr_full": f"hr{at}-full",
        "ndcg_full": f"ndcg{at}-full",
    }


def as_pooled(metrics: RankingMetrics, prefix: str = "") -> dict[str, float]:
    """The means of pooled metrics, named by `pooled_keys`, and the user count."""
    out = {prefix + key: float(getattr(metrics, a)) for a, key in pooled_keys(metrics.k).items()}
    out[prefix + "users"] = float(metrics.count)
    return out


def from_pooled(values: Mapping[str, float], at: int, prefix: str = "") -> RankingMetrics:
    """The inverse of `as_pooled` (means times the user count)."""
    count = int(values[prefix + "users"])
    sums = {f"{a}_sum": values[prefix + key] * count for a, key in pooled_keys(at).items()}
    return RankingMetrics(k=at, count=count, **sums)


def aggregate_ranking(records: list[RecordDict], at: int) -> MetricRecord:
    """Pool the branches' evaluation replies into test and ``val-`` validation metrics.

    Raises:
        InconsistentReplies: A reply's metric record is malformed.
    """
    tests: list[RankingMetrics] = []
    vals: list[RankingMetrics] = []
    for content in records:
        record = next(iter(content.metric_records.values()))
        plain = {key: v for key, v in record.items() if isinstance(v, int | float)}
        tests.append(from_record(plain, at))
        val = {
            key.removeprefix(k.REC_VAL_PREFIX): v
            for key, v in plain.items()
            if key.startswith(k.REC_VAL_PREFIX)
        }
        vals.append(from_record(val, at))
    test = pool(tests, at)
    return MetricRecord(
        {
            **as_pooled(test),
            **as_pooled(pool(vals, at), k.REC_VAL_PREFIX),
            k.KEY_NUM_EXAMPLES: test.count,
        }
    )


@dataclass(frozen=True)
class Anchor:
    """A published result to print beside ours.

    Attributes:
        name: Method.
        data: Data set it was measured on.
        hr10: HR@10 with 99 sampled negatives.
        ndcg10: NDCG@10 with 99 sampled negatives.
        source: Where the number comes from.
    """

    name: str
    data: str
    hr10: float
    ndcg10: float
    source: str


PUBLISHED_ANCHORS: Final[tuple[Anchor, ...]] = (
    Anchor("NeuMF + pre-training (centralised)", "ML-1M", 0.726, 0.445, "He et al. 2017"),
    Anchor("FedMF", "ML-1M", 0.6515, 0.3938, "PFedRec, Zhang et al. 2023 (table)"),
    Anchor("FedNCF", "ML-1M", 0.6062, 0.3325, "Perifanis & Efraimidis 2022, via PFedRec"),
)
"""Leave-one-out, 99-negative anchors from ANCHORS.md section 2 (a different, larger data set)."""


def comparison_table(results: Mapping[str, RankingMetrics], *, data: str = "ML-100K") -> str:
    """Format ours beside the published anchors as a fixed-width text table."""
    head = (
        f"{'method':<48} {'data':<8} {'HR@10':>6} {'NDCG@10':>8} "
        f"{'HR@10 full':>10} {'NDCG@10 full':>12}"
    )
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        lines.append(
            f"{name:<48} {data:<8} {m.hr_sampled:>6.3f} {m.ndcg_sampled:>8.3f} "
            f"{m.hr_full:>10.3f} {m.ndcg_full:>12.3f}"
        )
    for a in PUBLISHED_ANCHORS:
        lines.append(
            f"{a.name + ' [published]':<48} {a.data:<8} {a.hr10:>6.3f} {a.ndcg10:>8.3f} "
            f"{'-':>10} {'-':>12}"
        )
    return "\n".join(lines)
