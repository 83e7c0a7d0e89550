"""The one experiment loader, for every task: parsing, refusals and the resolved round trip."""

import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from conftest import TASK_IDS, small_experiment
from fedcrm.data.partition import PartitionKind
from fedcrm.exceptions import ConfigError
from fedcrm.simulation.config import load_experiment, parse_experiment, to_toml_dict
from fedcrm.strategies.guardrails import AggregationMode, RobustAggregator
from fedcrm.tasks import get_task

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
REC = {"task": "recommendation", "name": "r", "dataset": "synthetic"}

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


def _round_trip(cfg: Any) -> Any:
    """Write the resolved config as TOML and read it back."""
    return parse_experiment(tomllib.loads(tomli_w.dumps(to_toml_dict(cfg))))


# -- shared behaviour ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.stem)
def test_examples_parse_and_round_trip(path: Path) -> None:
    cfg = load_experiment(path)
    assert cfg.task in TASK_IDS
    assert parse_experiment(to_toml_dict(cfg)) == cfg
    assert _round_trip(cfg) == cfg


TABLES: dict[str, dict[str, Any]] = {
    "plain": {},
    "dp": {"dp": {"target-epsilon": 3.0, "delta": 1e-6}},
    "central-dp": {"central_dp": {"mode": "server-fixed", "noise-multiplier": 1.0}},
    "he": {"aggregation": {"mode": "he"}},
    "he-ddp": {
        "aggregation": {"mode": "he"},
        "central_dp": {"mode": "distributed", "noise-multiplier": 1.0},
    },
    "secagg": {"aggregation": {"mode": "secagg", "secagg-clipping-range": 4.0}},
    "robust": {"aggregation": {"robust": "median"}},
    "compliance": {"compliance": {"withdrawn-share": 0.1}},
}


@parametrize_tasks
@pytest.mark.parametrize("tables", sorted(TABLES))
def test_resolved_config_round_trips(task_name: str, tables: str) -> None:
    cfg = parse_experiment(small_experiment(task_name, **TABLES[tables]))
    assert cfg.task == task_name and cfg.federation.task == task_name
    assert parse_experiment(to_toml_dict(cfg)) == cfg
    assert _round_trip(cfg) == cfg


@parametrize_tasks
def test_the_tasks_model_and_purpose_name_the_privacy_budgets(task_name: str) -> None:
    task = get_task(task_name)
    cfg = parse_experiment(
        small_experiment(
            task_name,
            dp={"target-epsilon": 3.0},
            central_dp={"mode": "server-fixed", "noise-multiplier": 1.0},
        )
    )
    assert cfg.dp is not None and cfg.central_dp is not None
    assert (cfg.dp.model, cfg.dp.purpose) == (task.model_name, task.purpose)
    assert (cfg.central_dp.model, cfg.central_dp.purpose) == (task.model_name, task.purpose)
    assert isinstance(cfg.settings, task.settings_type)


@parametrize_tasks
@pytest.mark.parametrize(
    ("table", "values", "match"),
    [
        (None, {"rounds": 3}, r"experiment: unknown key\(s\) \['rounds'\]; allowed: \["),
        ("federation", {"num-round": 3}, r"\[federation\] has unknown key\(s\) \['num-round'\]"),
        ("dp", {"target-epsilon": 3.0, "clip": 1.0}, r"\[dp\] has unknown key\(s\) \['clip'\]"),
        ("central-dp", {"mode": "server-fixed", "sigma": 1}, r"unknown key\(s\) \['sigma'\]"),
        ("aggregation", {"colour": "red"}, r"\[aggregation\] has unknown key\(s\) \['colour'\]"),
        ("compliance", {"share": 0.1}, r"\[compliance\] has unknown key\(s\) \['share'\]"),
    ],
    ids=["top-level", "federation", "dp", "central-dp", "aggregation", "compliance"],
)
def test_unknown_keys_are_refused_with_the_allowed_keys(
    task_name: str, table: str | None, values: dict[str, Any], match: str
) -> None:
    raw = small_experiment(task_name)
    if table is None:
        raw.update(values)
    else:
        raw[table] = {**raw.get(table, {}), **values}
    with pytest.raises(ConfigError, match=match) as info:
        parse_experiment(raw)
    assert "allowed" in str(info.value) or "known keys" in str(info.value)


def test_the_allowed_keys_are_the_tasks_own() -> None:
    with pytest.raises(ConfigError) as churn:
        parse_experiment(small_experiment("churn", federation={"num-round": 3}))
    with pytest.raises(ConfigError) as rec:
        parse_experiment(small_experiment("recommendation", federation={"num-round": 3}))
    assert "hidden-layers" in str(churn.value) and "factors" not in str(churn.value)
    assert "factors" in str(rec.value) and "hidden-layers" not in str(rec.value)
    for info in (churn, rec):  # the federation's own keys are allowed in every task
        assert "num-rounds" in str(info.value) and "min-train-nodes" in str(info.value)


@parametrize_tasks
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": "a/b"}, "name must be"),
        ({"name": "a b"}, "name must be"),
        ({"seed": "one"}, "seed must be a whole number"),
        ({"cpus-per-branch": 0}, "cpus-per-branch must be > 0"),
        ({"federation": "fast"}, r"\[federation\] must be a table"),
        ({"aggregation": "he"}, r"\[aggregation\] must be a table"),
        ({"federation": {"num-rounds": 0}}, "num-rounds must be >= 1"),
        ({"federation": {"lr": -1.0}}, "lr must be"),
        ({"dp": {"target-epsilon": -1.0}}, "target_epsilon must be a finite number > 0"),
        ({"dp": {"delta": 1e-5}}, r"\[dp\] needs target-epsilon"),
        ({"aggregation": {"mode": "paillier"}}, r"\[aggregation\].*paillier"),
        ({"aggregation": {"mode": 1}}, r"\[aggregation\]"),
        ({"aggregation": {"secagg-threshold": 3}}, "need mode = 'secagg'"),
        ({"aggregation": {"mode": "he", "robust": "krum"}}, "krum on HE ciphertexts"),
        ({"aggregation": {"mode": "secagg"}, "dp": {"target-epsilon": 3.0}}, "not supported yet"),
        (
            {"aggregation": {"mode": "secagg"}, "compliance": {"withdrawn-share": 0.1}},
            "not supported yet",
        ),
        (
            {
                "central-dp": {"mode": "server-fixed", "noise-multiplier": 1.0},
                "federation": {"strategy": "fedadam"},
            },
            "central DP with fedadam",
        ),
        ({"central-dp": {"mode": "distributed", "noise-multiplier": 1.0}}, "without HE"),
    ],
    ids=[
        "slash-name",
        "spaced-name",
        "seed",
        "cpus",
        "federation-not-a-table",
        "aggregation-not-a-table",
        "rounds",
        "lr",
        "dp-epsilon",
        "dp-no-target",
        "unknown-mode",
        "mode-type",
        "secagg-key",
        "he-robust",
        "secagg-dp",
        "secagg-consent",
        "central-dp-fedadam",
        "ddp-plain",
    ],
)
def test_refused_experiments(task_name: str, changes: dict[str, Any], match: str) -> None:
    raw = small_experiment(task_name)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    with pytest.raises(ConfigError, match=match):
        parse_experiment(raw)


@parametrize_tasks
def test_secagg_and_robust_aggregation_are_allowed(task_name: str) -> None:
    secagg = parse_experiment(
        small_experiment(task_name, aggregation={"mode": "secagg", "secagg-clipping-range": 4})
    )
    assert secagg.aggregation.mode is AggregationMode.SECAGG
    assert secagg.aggregation.secagg.clipping_range == 4.0
    robust = parse_experiment(
        small_experiment(task_name, aggregation={"robust": "multi-krum", "multi-krum-select": 2})
    )
    assert robust.aggregation.robust.aggregator is RobustAggregator.MULTI_KRUM
    he = parse_experiment(small_experiment(task_name, aggregation={"mode": "he"}))
    assert he.aggregation.mode is AggregationMode.HE


@parametrize_tasks
def test_plain_is_the_default_aggregation(task_name: str) -> None:
    cfg = parse_experiment(small_experiment(task_name))
    assert cfg.aggregation.mode is AggregationMode.PLAIN
    assert to_toml_dict(cfg)["aggregation"]["mode"] == "plain"
    assert parse_experiment(small_experiment(task_name, aggregation={"mode": "plain"})) == cfg


def test_unknown_task_is_refused_with_the_registered_tasks() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'sales'.*\['churn', 'recommendation'\]"):
        parse_experiment({**REC, "task": "sales"})


def test_missing_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="missing top-level key 'name'"):
        parse_experiment({"dataset": "mlc"})


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "missing.toml")
    path.write_text('name = "x"\ndataset = "bank"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: .*dataset must be one of"):
        load_experiment(path)


# -- churn -----------------------------------------------------------------------------------------


def test_churn_is_the_default_task_and_the_schema_is_the_datasets() -> None:
    cfg = parse_experiment(
        {"name": "x", "dataset": "synthetic:telco", "partition": {"kind": "dirichlet"}}
    )
    assert cfg.task == "churn"
    assert cfg.settings.schema == "telco"
    assert cfg.spec.partition.kind is PartitionKind.DIRICHLET


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "x", "dataset": "bank"}, "dataset must be one of"),
        ({"name": "x", "dataset": "mlc", "partition": {"kind": "random"}}, r"\[partition\]"),
        ({"name": "x", "dataset": "mlc", "federation": {"schema": "telco"}}, "schema must match"),
        (
            {
                "name": "x",
                "dataset": "mlc",
                "federation": {"strategy": "fedprox"},
                "dp": {"target-epsilon": 3.0},
            },
            "cannot be used with strategy 'fedprox'",
        ),
    ],
    ids=["dataset", "partition", "schema", "dp-fedprox"],
)
def test_invalid_churn_configs(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_experiment(raw)


# -- recommendation --------------------------------------------------------------------------------


def test_rec_he_example_is_the_plain_example_with_he_aggregation() -> None:
    he = load_experiment(EXAMPLES / "movielens_zip_he.toml")
    plain = load_experiment(EXAMPLES / "movielens_zip.toml")
    assert he.task == plain.task == "recommendation"
    assert he.aggregation.mode is AggregationMode.HE
    assert plain.aggregation.mode is AggregationMode.PLAIN
    assert (he.federation, he.settings, he.spec, he.seed, he.dp) == (
        plain.federation,
        plain.settings,
        plain.spec,
        plain.seed,
        None,
    )
    assert he.spec.dataset == "movielens-100k"


def test_rec_dp_example_states_its_unit_budget() -> None:
    cfg = load_experiment(EXAMPLES / "movielens_zip_dp.toml")
    assert cfg.dp is not None
    # grad-sample-mode is not the recommender's: its per-customer step always uses Opacus hooks.
    assert (cfg.dp.target_epsilon, cfg.dp.delta) == (8.0, 1e-5)
    assert (cfg.dp.model, cfg.dp.purpose) == ("recommender", "recommendation-training")
    assert (cfg.settings.users_per_step, cfg.settings.max_interactions_per_user) == (1000, 50)


def test_rec_dp_task_keys_go_from_dp_into_the_task_settings() -> None:
    dp = {"target-epsilon": 8.0, "users-per-step": 7, "max-interactions-per-user": 9}
    cfg = parse_experiment({**REC, "dp": dp})
    assert (cfg.settings.users_per_step, cfg.settings.max_interactions_per_user) == (7, 9)
    assert cfg.dp is not None and cfg.dp.target_epsilon == 8.0
    resolved = to_toml_dict(cfg)
    assert resolved["dp"]["users-per-step"] == 7
    assert resolved["dp"]["max-interactions-per-user"] == 9
    assert "users-per-step" not in resolved["federation"]
    assert _round_trip(cfg) == cfg


def test_rec_dp_task_keys_belong_in_dp_only() -> None:
    with pytest.raises(ConfigError, match=r"\[federation\] has unknown key") as info:
        parse_experiment({**REC, "federation": {"users-per-step": 4}})
    assert "users-per-step" not in str(info.value).split("allowed:")[1]
    with pytest.raises(ConfigError, match=r"\[dp\] has unknown key\(s\) \['users-per-step'\]"):
        parse_experiment(small_experiment("churn", dp={"target-epsilon": 3.0, "users-per-step": 4}))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"dataset": "ml-1m"}, "dataset must be one of"),
        ({"synthetic": {"items": 50}}, "items must be >= 100"),
        ({"synthetic": {"branches": 12}}, r"branches must lie in \[1, 11\]"),
        ({"synthetic": {"min-per-user": 2}}, "min-per-user"),
        ({"synthetic": {"users": 2, "branches": 3}}, "users >= branches"),
        ({"synthetic": {"colour": 1}}, r"\[synthetic\]: unknown key\(s\) \['colour'\]"),
        ({"synthetic": "big"}, "must be a table"),
        ({"baselines": {"mf-epochs": 0}}, "mf-epochs"),
        ({"dp": {"target-epsilon": 8.0, "users-per-step": 0}}, "users-per-step must be >= 1"),
        ({"dp": {"target-epsilon": 8.0, "max-interactions-per-user": 0}}, "max-interactions"),
        ({"federation": {"recency-halflife": -2.0}}, "recency-halflife"),
        ({"federation": {"history-length": 51}}, "history-length"),
        ({"federation": {"history-length": 2.5}}, "history-length must be a whole number"),
        ({"federation": {"loss": "hinge"}}, "loss must be one of"),
        ({"federation": {"strategy": "fedprox"}}, "supports strategy"),
    ],
    ids=[
        "dataset",
        "items",
        "branches",
        "min-per-user",
        "users",
        "synthetic-key",
        "synthetic-not-a-table",
        "mf-epochs",
        "dp-users",
        "dp-cap",
        "halflife",
        "history-too-long",
        "history-float",
        "loss",
        "fedprox",
    ],
)
def test_invalid_rec_configs(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_experiment({**REC, **changes})


def test_rec_he_combines_with_customer_level_dp() -> None:
    cfg = parse_experiment({**REC, "aggregation": {"mode": "he"}, "dp": {"target-epsilon": 8.0}})
    assert cfg.aggregation.mode is AggregationMode.HE and cfg.dp is not None
    assert to_toml_dict(cfg)["aggregation"]["mode"] == "he"
