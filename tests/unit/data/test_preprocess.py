import itertools

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.data.check import coerce_frame
from fedcrm.data.preprocess import Moments, Scaler, combine_moments, encode, local_moments
from fedcrm.data.schema import TELCO
from fedcrm.data.synthetic import synthetic_export


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 1000),
    cuts=st.lists(st.integers(1, 199), min_size=1, max_size=6, unique=True),
)
def test_federated_statistics_equal_pooled_statistics(seed: int, cuts: list[int]) -> None:
    frame = coerce_frame(synthetic_export(TELCO, 200, seed=seed), TELCO)
    frame.loc[frame.index[::17], "total_charges"] = np.nan
    bounds = [0, *sorted(cuts), 200]
    parts = [frame.iloc[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    fed = Scaler.from_moments(combine_moments(local_moments(p, TELCO) for p in parts))
    pooled = Scaler.from_moments(local_moments(frame, TELCO))
    np.testing.assert_allclose(fed.mean, pooled.mean, rtol=1e-12)
    np.testing.assert_allclose(fed.std, pooled.std, rtol=1e-9)
    # And both equal the textbook statistics of the pooled columns.
    tenure = frame["tenure"].to_numpy()
    np.testing.assert_allclose(fed.mean[0], tenure.mean())
    np.testing.assert_allclose(fed.std[0], tenure.std())
    charges = np.log1p(frame["total_charges"].dropna().to_numpy())
    np.testing.assert_allclose(fed.mean[-1], charges.mean())


def test_moments_round_trip_and_validation() -> None:
    m = local_moments(coerce_frame(synthetic_export(TELCO, 30, seed=0), TELCO), TELCO)
    back = Moments.from_list(m.to_list(), len(TELCO.numeric))
    np.testing.assert_array_equal(back.total, m.total)
    for bad in ([1.0, 2.0], [float("nan")] * 9, [-1.0] * 9):
        try:
            Moments.from_list(bad, 3)
        except Exception as exc:
            assert "moments" in str(exc)
        else:
            raise AssertionError(f"accepted {bad}")


def test_encode_shape_and_one_hot() -> None:
    frame = coerce_frame(synthetic_export(TELCO, 40, seed=5), TELCO)
    scaler = Scaler.from_moments(local_moments(frame, TELCO))
    x, y = encode(frame, TELCO, scaler)
    assert x.shape == (40, TELCO.input_dim)
    assert x.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    # Contract one-hot block sums to one on every row.
    start = sum(
        f.width for f in TELCO.features[: [f.name for f in TELCO.features].index("contract")]
    )
    np.testing.assert_array_equal(x[:, start : start + 3].sum(axis=1), np.ones(40))


def test_encoding_does_not_depend_on_the_branch() -> None:
    # The same customer encodes identically whichever branch (or scaler source) holds it.
    frame = coerce_frame(synthetic_export(TELCO, 60, seed=9), TELCO)
    scaler = Scaler.from_moments(local_moments(frame, TELCO))
    whole, _ = encode(frame, TELCO, scaler)
    alone, _ = encode(pd.DataFrame(frame.iloc[[5]]), TELCO, scaler)
    np.testing.assert_array_equal(whole[5], alone[0])
