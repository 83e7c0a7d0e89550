"""Synthetic churn tables with the schema of a real data set, for fast tests.

The label depends on the features through a fixed random linear model, so a model can learn
it; values are drawn per schema (numbers, 0/1, declared categories), so a generated export
passes `fedcrm data check` unchanged.
"""

import numpy as np
import pandas as pd

from fedcrm.data.partition import STATE_TO_REGION
from fedcrm.data.schema import ChurnSchema, FeatureKind


def synthetic_export(schema: ChurnSchema, n: int, *, seed: int = 0) -> pd.DataFrame:
    """Return an export-shaped frame (raw ids, label as text) of ``n`` synthetic customers."""
    rng = np.random.default_rng(seed)
    coef = np.random.default_rng(12345).normal(size=schema.input_dim)
    frame: dict[str, object] = {schema.id_column: [f"cust-{seed}-{i:06d}" for i in range(n)]}
    signal = np.zeros(n)
    j = 0
    for f in schema.features:
        if f.kind is FeatureKind.NUMERIC:
            z = rng.normal(size=n)
            frame[f.name] = np.round(np.exp(z) * 10 if f.log1p else 50 + 10 * z, 2)
            signal += coef[j] * z
        elif f.kind is FeatureKind.BINARY:
            b = rng.integers(0, 2, size=n)
            frame[f.name] = b
            signal += coef[j] * (b - 0.5)
        else:
            codes = rng.integers(0, len(f.categories), size=n)
            frame[f.name] = np.asarray(f.categories)[codes]
            signal += coef[j : j + f.width][codes]
        j += f.width
    prob = 1 / (1 + np.exp(-(signal - 1.0)))
    frame[schema.label] = np.where(rng.random(n) < prob, *reversed(schema.label_values))
    if schema.region_column:
        states = sorted(STATE_TO_REGION)
        frame[schema.region_column] = rng.choice(states, size=n)
    return pd.DataFrame(frame)
