"""The one runner's wiring of Ray and of the branches' mods, for every task."""

from pathlib import Path

import pytest

from conftest import TASK_IDS, small_experiment
from fedcrm.client import HEMod, fixed_clipping_mod, secagg_mod
from fedcrm.simulation import parse_experiment
from fedcrm.simulation.runner import _backend_config, client_mods

parametrize_tasks = pytest.mark.parametrize("task_name", TASK_IDS)


@parametrize_tasks
def test_ray_keeps_branch_logs_off_the_console(task_name: str, tmp_path: Path) -> None:
    """The drift fix: the recommendation runner did not set ``log_to_driver``."""
    cfg = parse_experiment(small_experiment(task_name))
    init = _backend_config(cfg, tmp_path)["init_args"]
    assert init["log_to_driver"] is False and init["include_dashboard"] is False
    assert init["_temp_dir"] == str(tmp_path)


@parametrize_tasks
def test_branch_mods_follow_the_aggregation(task_name: str, tmp_path: Path) -> None:
    plain = parse_experiment(small_experiment(task_name))
    assert client_mods(plain, None) == []
    he = parse_experiment(small_experiment(task_name, aggregation={"mode": "he"}))
    (mod,) = client_mods(he, tmp_path)
    assert isinstance(mod, HEMod) and mod.key_dir == tmp_path
    secagg = parse_experiment(small_experiment(task_name, aggregation={"mode": "secagg"}))
    assert client_mods(secagg, None) == [secagg_mod]
    clipped = parse_experiment(
        small_experiment(task_name, central_dp={"mode": "client-fixed", "noise-multiplier": 1.0})
    )
    assert client_mods(clipped, None) == [fixed_clipping_mod]
