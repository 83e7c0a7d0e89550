"""Federated churn on Flower's deployment engine: a SuperLink, two SuperNodes and ``flwr run``.

Everything listens on 127.0.0.1; each process is started here and stopped by its PID.
Deployment rounds take several seconds each (SuperNode polling, one ClientApp process per
message; ../shared/STACK.md #9), so the run is two rounds.
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

import pytest
from safetensors.torch import load_file

from fedcrm.data.schema import get_schema
from fedcrm.data.synthetic import synthetic_export

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[Processes, int]]:
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
        for i, name in enumerate(["north", "south"]):
            export = tmp_path / f"{name}.csv"
            synthetic_export(get_schema("mlc"), 400, seed=i).to_csv(export, index=False)
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
                f'data-path="{export}" branch-name="{name}"',
            )
            _wait_for_port(node_port, node, log)
        (flwr_home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        yield procs, link_port
    finally:
        procs.stop()


def test_two_rounds_on_the_deployment_engine(
    federation: tuple[Processes, int], tmp_path: Path
) -> None:
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
            f'num-rounds=2 hidden-layers="16" out-dir="{out}"',
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
    assert "round 2: AUC" in output, output[-4000:]

    (folder,) = out.iterdir()
    rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["train_replies"] == 2 for r in rounds)
    assert all(0.0 <= r["evaluate"]["roc-auc"] <= 1.0 for r in rounds)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["branches"] == 2 and summary["best_round"] in (1, 2)
    state = load_file(str(folder / "model.safetensors"))
    assert state["net.0.weight"].shape[0] == 16
