"""The guardrail table: every refused combination, with its reason and alternative."""

import itertools

import pytest

from fedcrm.exceptions import ConfigError
from fedcrm.simulation.config import parse_experiment
from fedcrm.strategies.guardrails import (
    AggregationMode,
    CombinationRefused,
    RobustAggregator,
    ServerClipping,
    check_combination,
)

ROBUST = [r for r in RobustAggregator if r is not RobustAggregator.NONE]
CLIPPING = [c for c in ServerClipping if c is not ServerClipping.NONE]
MASKED = [AggregationMode.HE, AggregationMode.SECAGG]

REFUSED: list[tuple[dict[str, object], str, str]] = [
    *(
        ({"mode": m, "robust": r}, f"{r} on", "mode = 'plain'")
        for m, r in itertools.product(MASKED, ROBUST)
    ),
    *(
        ({"mode": m, "server_clipping": c}, f"server-side {c} clipping", "clip on the branches")
        for m, c in itertools.product(MASKED, CLIPPING)
    ),
    *(
        ({"mode": AggregationMode.HE, "strategy": s}, f"{s} on HE", "'fedavg' or 'fedprox'")
        for s in ("fedadam", "fedyogi", "fedadagrad")
    ),
    ({"mode": AggregationMode.HE, "secagg": True}, "HE + SecAgg+", "choose one"),
    *(
        ({"mode": AggregationMode.PLAIN, "robust": r, "strategy": s}, f"{r} with {s}", "fedavg")
        for r, s in itertools.product(ROBUST, ("fedprox", "fedadam"))
    ),
]


def _id(case: tuple[dict[str, object], str, str]) -> str:
    return "-".join(f"{v}" for v in case[0].values())


@pytest.mark.parametrize(("kwargs", "rule", "alternative"), REFUSED, ids=[_id(c) for c in REFUSED])
def test_every_refused_combination_names_reason_and_alternative(
    kwargs: dict[str, object], rule: str, alternative: str
) -> None:
    refusals = check_combination(strict=False, **kwargs)  # type: ignore[arg-type]
    assert len(refusals) == 1, refusals
    (refusal,) = refusals
    assert rule in refusal.rule
    assert refusal.reason and alternative in refusal.alternative
    with pytest.raises(CombinationRefused) as info:
        check_combination(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ConfigError)
    assert rule in str(info.value) and "Instead:" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": AggregationMode.PLAIN},
        {"mode": AggregationMode.PLAIN, "strategy": "fedadam"},
        {"mode": AggregationMode.PLAIN, "server_clipping": ServerClipping.FIXED},
        *({"mode": AggregationMode.PLAIN, "robust": r} for r in ROBUST),
        {"mode": AggregationMode.HE},
        {"mode": AggregationMode.HE, "strategy": "fedprox"},
        {"mode": AggregationMode.SECAGG, "strategy": "fedadam"},
        {"mode": AggregationMode.SECAGG, "secagg": True},
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_valid_combinations_pass(kwargs: dict[str, object]) -> None:
    assert check_combination(**kwargs) == []  # type: ignore[arg-type]


def test_all_refusals_are_listed_at_once() -> None:
    refusals = check_combination(
        mode=AggregationMode.HE,
        robust=RobustAggregator.KRUM,
        server_clipping=ServerClipping.ADAPTIVE,
        strategy="fedyogi",
        secagg=True,
        strict=False,
    )
    assert len(refusals) == 5


def _raw(aggregation: dict[str, object], strategy: str = "fedavg") -> dict[str, object]:
    return {
        "name": "g",
        "dataset": "synthetic:mlc",
        "federation": {"strategy": strategy},
        "aggregation": aggregation,
    }


@pytest.mark.parametrize(
    ("aggregation", "strategy", "match"),
    [
        ({"mode": "he", "robust": "krum"}, "fedavg", "krum on HE ciphertexts"),
        ({"mode": "he", "robust": "median"}, "fedavg", "median on HE ciphertexts"),
        ({"mode": "he"}, "fedadam", "fedadam on HE ciphertexts"),
        ({"robust": "trimmed-mean"}, "fedprox", "trimmed-mean with fedprox"),
        ({"mode": "secagg", "robust": "krum"}, "fedavg", "krum on SecAgg\\+ masks"),
        ({"mode": "secagg", "secagg-clipping-range": 0}, "fedavg", "clipping-range must be > 0"),
        ({"mode": "secagg", "secagg-modulus-range": 3000}, "fedavg", "power of two"),
        ({"mode": "secagg", "secagg-num-shares": 4}, "fedavg", "odd integer"),
        ({"mode": "secagg", "secagg-threshold": 5}, "fedavg", "below secagg-num-shares"),
        ({"mode": "secagg", "secagg-quantization-range": 1.5}, "fedavg", "whole number"),
        ({"secagg-max-weight": 10}, "fedavg", "need mode = 'secagg'"),
        ({"mode": "fhe"}, "fedavg", "aggregation"),
        ({"robust": "bulyan"}, "fedavg", "aggregation"),
        ({"trim-beta": 0.7, "robust": "trimmed-mean"}, "fedavg", "trim-beta"),
        ({"colour": "red"}, "fedavg", "unknown key"),
    ],
)
def test_bad_toml_is_refused_before_the_run(
    aggregation: dict[str, object], strategy: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_experiment(_raw(aggregation, strategy))


def test_good_toml_is_parsed() -> None:
    cfg = parse_experiment(_raw({"mode": "he"}))
    assert cfg.aggregation.mode is AggregationMode.HE
    cfg = parse_experiment(_raw({"robust": "multi-krum", "multi-krum-select": 4}))
    assert cfg.aggregation.robust.aggregator is RobustAggregator.MULTI_KRUM
    assert cfg.aggregation.robust.num_selected == 4


def test_secagg_toml_is_parsed() -> None:
    cfg = parse_experiment(
        _raw({"mode": "secagg", "secagg-clipping-range": 4, "secagg-num-shares": 0.5})
    )
    assert cfg.aggregation.mode is AggregationMode.SECAGG
    assert cfg.aggregation.secagg.clipping_range == 4.0
    assert cfg.aggregation.secagg.num_shares == 0.5


def test_secagg_refuses_dp_until_reports_travel_with_it() -> None:
    raw = {**_raw({"mode": "secagg"}), "dp": {"target-epsilon": 3.0}}
    with pytest.raises(ConfigError, match="not supported yet"):
        parse_experiment(raw)
