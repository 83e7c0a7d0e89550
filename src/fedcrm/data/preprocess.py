"""Encoding identical on every branch: categories from the schema, scaling from federated stats.

No scaler or encoder is ever fitted on one branch's data. Each branch sends, per numeric feature,
the count of non-missing values, their sum and their sum of squares (`local_moments`); the
server adds them up (`combine_moments`) and sends back one mean and standard deviation per
feature (`Scaler`). The pooled moments equal those of the pooled data exactly (up to float
rounding), so federated scaling is what a central scaler would have computed.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcrm.data.schema import ChurnSchema, FeatureKind
from fedcrm.exceptions import InconsistentReplies


@dataclass(frozen=True)
class Moments:
    """Per-feature count, sum and sum of squares of a branch's numeric columns."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    def to_list(self) -> list[float]:
        """Flatten as ``count + total + total_sq`` (one float list for a MetricRecord)."""
        return [float(v) for v in np.concatenate([self.count, self.total, self.total_sq])]

    @classmethod
    def from_list(cls, values: Sequence[float], num_features: int) -> "Moments":
        """Inverse of `to_list`.

        Raises:
            InconsistentReplies: The list does not hold 3 values per numeric feature.
        """
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (3 * num_features,) or not np.all(np.isfinite(arr)):
            raise InconsistentReplies(
                f"moments must be {3 * num_features} finite numbers, got shape {arr.shape}"
            )
        count, total, total_sq = np.split(arr, 3)
        if np.any(count < 0) or np.any(total_sq < 0):
            raise InconsistentReplies("moments have a negative count or sum of squares")
        return cls(count, total, total_sq)


def _numeric_matrix(frame: pd.DataFrame, schema: ChurnSchema) -> np.ndarray:
    cols = []
    for f in schema.numeric:
        x = frame[f.name].to_numpy(dtype=np.float64)
        cols.append(np.log1p(np.clip(x, 0, None)) if f.log1p else x)
    return np.column_stack(cols) if cols else np.zeros((len(frame), 0))


def local_moments(frame: pd.DataFrame, schema: ChurnSchema) -> Moments:
    """A branch's contribution to the federated scaler (missing values skipped)."""
    x = _numeric_matrix(frame, schema)
    present = ~np.isnan(x)
    filled = np.where(present, x, 0.0)
    return Moments(
        present.sum(axis=0).astype(np.float64), filled.sum(axis=0), (filled**2).sum(axis=0)
    )


def combine_moments(parts: Iterable[Moments]) -> Moments:
    """Add the branches' moments into the pooled moments."""
    parts = list(parts)
    if not parts:
        raise InconsistentReplies("no branch sent statistics")
    return Moments(
        np.sum([p.count for p in parts], axis=0),
        np.sum([p.total for p in parts], axis=0),
        np.sum([p.total_sq for p in parts], axis=0),
    )


@dataclass(frozen=True)
class Scaler:
    """Mean and standard deviation per numeric feature, computed from pooled moments."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_moments(cls, moments: Moments) -> "Scaler":
        """Population mean and standard deviation (a constant feature gets std 1)."""
        count = np.maximum(moments.count, 1.0)
        mean = moments.total / count
        var = np.maximum(moments.total_sq / count - mean**2, 0.0)
        std = np.sqrt(var)
        return cls(mean, np.where(std > 1e-12, std, 1.0))


def encode(
    frame: pd.DataFrame, schema: ChurnSchema, scaler: Scaler
) -> tuple[np.ndarray, np.ndarray]:
    """Encode a coerced frame into ``(X, y)`` float32 arrays in schema order.

    Numeric features are standardised (missing → federated mean, i.e. 0), binary ones used
    as is, categorical ones one-hot in vocabulary order.
    """
    numeric = (_numeric_matrix(frame, schema) - scaler.mean) / scaler.std
    numeric = np.nan_to_num(numeric, nan=0.0)
    blocks: list[np.ndarray] = []
    j = 0
    for f in schema.features:
        if f.kind is FeatureKind.NUMERIC:
            blocks.append(numeric[:, j : j + 1])
            j += 1
        elif f.kind is FeatureKind.BINARY:
            blocks.append(frame[f.name].to_numpy(dtype=np.float64).reshape(-1, 1))
        else:
            codes = pd.Categorical(frame[f.name], categories=list(f.categories)).codes
            blocks.append(np.eye(len(f.categories))[codes])
    x = np.hstack(blocks).astype(np.float32)
    y = frame[schema.label].to_numpy(dtype=np.float32)
    return x, y
