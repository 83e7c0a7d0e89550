"""Every task on Flower's deployment engine: a SuperLink, two SuperNodes and ``flwr run``.

The same ServerApp and ClientApp as a simulation (``fedcrm.server.app:app``,
``fedcrm.client.app:app``); each branch names its own export in its node config (churn: a CRM
export; recommendations: an interaction export and the shared catalogue). Everything listens on
127.0.0.1; each process is started here and stopped by its PID. Deployment rounds take several
seconds each (SuperNode polling, one ClientApp process per message; ../shared/STACK.md #9), so
the run is two rounds.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from conftest import TASK_IDS
from fedcrm.data.interaction_export import write_catalogue, write_interaction_export
from fedcrm.data.schema import get_schema
from fedcrm.data.synthetic import synthetic_export
from fedcrm.tasks import get_task
from fedcrm.tasks.recommendation.data import SyntheticRecConfig, synthetic_rec_data

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_CONFIG = {
    "churn": 'num-rounds=2 hidden-layers="16"',
    "recommendation": (
        'task="recommendation" num-rounds=2 factors=8 batch-size=256 lr=0.01 local-epochs=1 '
        "num-items=130"
    ),
}
"""What each task's run sets beyond the declared defaults (pyproject.toml)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited early:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on 127.0.0.1:{port} after 60 s:\n{log.read_text()[-3000:]}")


class Processes:
    """Processes started by this test, each in its own process group, stopped by PID."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.folder,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _branch_exports(task_name: str, folder: Path) -> list[str]:
    """Write two branches' exports, each in its own folder; return each one's node config."""
    if task_name == "churn":
        configs = []
        for i, name in enumerate(["north", "south"]):
            export = folder / name / "export.csv"
            export.parent.mkdir()
            synthetic_export(get_schema("mlc"), 400, seed=i).to_csv(export, index=False)
            configs.append(f'data-path="{export}" branch-name="{name}"')
        return configs
    data = synthetic_rec_data(SyntheticRecConfig(users=60, items=130, branches=2), seed=0)
    catalogue = folder / "items.txt"
    write_catalogue(catalogue, data.item_ids)
    configs = []
    log = data.interactions
    for b, name in enumerate(["north", "south"]):
        mine = data.user_branch[log.user] == b
        export = folder / name / "interactions.csv"
        frame = pd.DataFrame(
            {
                "customer_id": [data.user_ids[u] for u in log.user[mine]],
                "item_id": [data.item_ids[i] for i in log.item[mine]],
                "timestamp": log.timestamp[mine],
            }
        )
        write_interaction_export(export, frame)
        key = folder / name / "hmac.key"
        configs.append(
            f'data-path="{export}" catalogue-path="{catalogue}" key-path="{key}" '
            f'branch-name="{name}"'
        )
    return configs


@pytest.fixture
def federation(task_name: str, tmp_path: Path) -> Iterator[tuple[Processes, int]]:
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    procs = Processes(tmp_path, env)
    try:
        link_port = _free_port()
        link, log = procs.start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--disable-runtime-dependency-installation",
        )
        _wait_for_port(link_port, link, log)
        for name, node_config in zip(
            ["north", "south"], _branch_exports(task_name, tmp_path), strict=True
        ):
            node_port = _free_port()
            node, log = procs.start(
                f"supernode-{name}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
                "--node-config",
                node_config,
            )
            _wait_for_port(node_port, node, log)
        (flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        yield procs, link_port
    finally:
        procs.stop()


@pytest.mark.parametrize("task_name", TASK_IDS)
def test_two_rounds_on_the_deployment_engine(
    task_name: str, federation: tuple[Processes, int], tmp_path: Path
) -> None:
    task = get_task(task_name)
    procs, _ = federation
    out = tmp_path / "out"
    app = tmp_path / "app"  # a copy without runs/ and .venv: `flwr run` packs the folder
    app.mkdir()
    shutil.copy(REPO / "pyproject.toml", app)
    shutil.copytree(REPO / "src", app / "src", ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(app),
            "test",
            "--run-config",
            f'{RUN_CONFIG[task_name]} out-dir="{out}"',
            "--stream",
        ],
        capture_output=True,
        text=True,
        env=procs.env,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    # Flower's `--stream` returns 0 even when the ServerApp fails: check what it did.
    assert "aggregate_train: Received 2 results and 0 failures" in output, output[-4000:]
    settings = task.settings({}, where="test", strict=False)
    label, headline = task.headline(settings)
    assert f"round 2: {label}" in output, output[-4000:]

    (folder,) = out.iterdir()
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["train_replies"] == 2 and not r["rejected"] for r in rounds)
    assert all(0.0 <= r["evaluate"][headline] <= 1.0 for r in rounds)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["task"] == task_name
    assert summary["branches"] == 2 and summary["best_round"] in (1, 2)
    model = task.load_model(folder)
    if task_name == "churn":
        assert model["net.0.weight"].shape[0] == 16
    else:  # the item tower only: user factors stay in each branch's folder
        assert set(model) == {"items.embedding.weight", "items.bias.weight"}
        assert model["items.embedding.weight"].shape == (130, 8)
        for name in ("north", "south"):  # each branch keeps its own, beside its export
            assert (tmp_path / name / "user_factors.npz").is_file()
