"""fedcrm's ε beside Flower's own accountant (`flwr.serverapp.RdpAccountant`, flwr 1.41).

Branch-level DP: every round is one Gaussian release on the sum of clipped updates, no
sampling amplification, add/remove one branch. Record-level DP-SGD: a Poisson-sampled Gaussian
per step. Flower's accountant wraps dp-accounting; fedcrm's uses Opacus: the figures must
agree to 1 %, except where fedcrm accounts for a release Flower's figure leaves out.
"""

import pytest
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

from fedcrm.privacy import AccountingEvent, CentralAccountant, compute_epsilon
from fedcrm.privacy.dp import effective_noise_multiplier

DELTA = 1e-5
BRANCHES = 10


def _flower(sampling: SamplingMethod, population: int) -> RdpAccountant:
    config = PrivacyConfig(
        target_delta=DELTA,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=sampling,
    )
    return RdpAccountant(config)


@pytest.mark.parametrize(("z", "rounds"), [(0.72, 30), (3.49, 30), (22.2, 40)])
def test_branch_level_dp_with_fixed_clipping_matches_flower(z: float, rounds: int) -> None:
    ours = CentralAccountant(accountant="rdp", delta=DELTA, history=[z] * rounds)
    flower = _flower(SamplingMethod.NO_AMPLIFICATION, BRANCHES)
    flower.compose(GaussianPrivacyEvent(z, BRANCHES, BRANCHES), count=rounds)
    assert ours.epsilon() == pytest.approx(flower.get_epsilon(DELTA), rel=1e-2)


def test_adaptive_clipping_costs_more_than_flowers_update_only_figure() -> None:
    """Flower's accountant sees the update noise z only; the clipped count is a release too.

    Adaptive clipping also releases a noisy count of clipped updates (σ_b); fedcrm accounts the
    round as one Gaussian with z_eff = (z⁻² + σ_b⁻²)^-1/2 < z, so its ε is larger. Accounting
    the same z_eff, Flower's accountant agrees.
    """
    z, sigma_b, rounds = 3.49, 5.0, 30
    z_eff = effective_noise_multiplier(z, sigma_b)
    ours = CentralAccountant(accountant="rdp", delta=DELTA, history=[z_eff] * rounds)
    update_only = _flower(SamplingMethod.NO_AMPLIFICATION, BRANCHES)
    update_only.compose(GaussianPrivacyEvent(z, BRANCHES, BRANCHES), count=rounds)
    assert ours.epsilon() > 1.05 * update_only.get_epsilon(DELTA)
    same = _flower(SamplingMethod.NO_AMPLIFICATION, BRANCHES)
    same.compose(GaussianPrivacyEvent(z_eff, BRANCHES, BRANCHES), count=rounds)
    assert ours.epsilon() == pytest.approx(same.get_epsilon(DELTA), rel=1e-2)


@pytest.mark.parametrize(
    ("sigma", "batch", "rows", "steps"), [(1.1, 32, 700, 660), (3.0, 16, 100, 190)]
)
def test_record_level_dp_sgd_matches_flower_with_poisson_sampling(
    sigma: float, batch: int, rows: int, steps: int
) -> None:
    ours = compute_epsilon(
        [AccountingEvent(sigma, batch / rows, steps)], delta=DELTA, accountant="rdp"
    )
    flower = _flower(SamplingMethod.POISSON, rows)
    flower.compose(GaussianPrivacyEvent(sigma, batch, rows), count=steps)
    assert ours == pytest.approx(flower.get_epsilon(DELTA), rel=1e-2)
