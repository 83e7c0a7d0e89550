"""Deterministic, stratified train / validation / test split of one branch's rows."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcrm.exceptions import ConfigError


@dataclass(frozen=True)
class Split:
    """One branch's three disjoint subsets."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame


def split_frame(
    frame: pd.DataFrame, *, label: str, seed: int, val: float = 0.2, test: float = 0.2
) -> Split:
    """Split ``frame`` per label class so each subset keeps the branch's churn share.

    Raises:
        ConfigError: Fractions outside (0, 1) or summing to 1 or more.
    """
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ConfigError(
            f"val and test fractions must be in (0, 1) and sum below 1: {val}, {test}"
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for _, idx in frame.groupby(label, sort=True).indices.items():
        idx = rng.permutation(idx)
        n_test = round(len(idx) * test)
        n_val = round(len(idx) * val)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    pick = {
        k: frame.iloc[np.sort(np.concatenate(v))].reset_index(drop=True) for k, v in parts.items()
    }
    return Split(pick["train"], pick["val"], pick["test"])
