"""A small federation on Flower's simulation engine (Ray), end to end.

One simulation serves several assertions: it takes ~20 s to start Ray on 2 cores.
"""

import ipaddress
import json
import os
import threading
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from fedcrm.simulation.config import parse_experiment
from fedcrm.simulation.runner import run_experiment

pytestmark = pytest.mark.integration


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in found]
        found.update(children)
        frontier.extend(children)
    return found


def _socket_inodes(pids: set[int]) -> dict[str, int]:
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    return inodes


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return ipaddress.IPv6Address(words)


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return address.is_loopback


def listening_sockets_of_tree(root: int) -> list[tuple[int, str]]:
    """(pid, address) of every listening TCP socket owned by ``root`` or its descendants."""
    inodes = _socket_inodes(_descendants(root))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                host, port = local.split(":")
                found.append((inodes[inode], f"{_address(host)}:{int(port, 16)}"))
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    cfg = parse_experiment(
        {
            "name": "it",
            "dataset": "synthetic:mlc",
            "rows": 450,
            "partition": {"kind": "iid", "num-branches": 3},
            "federation": {"num-rounds": 2, "lr": 0.01, "local-epochs": 2},
            "baselines": {"torch-epochs": 3},
        }
    )
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.extend(listening_sockets_of_tree(os.getpid()))
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rounds: list[object] = []
    try:
        run_dir = run_experiment(
            cfg, runs_root=tmp_path_factory.mktemp("runs"), on_round=rounds.append
        )
    finally:
        stop.set()
        sampler.join()
    return {"run_dir": run_dir, "sockets": seen, "rounds": rounds}


def test_simulation_completes_and_loss_goes_down(run: dict[str, object]) -> None:
    run_dir = run["run_dir"]
    assert isinstance(run_dir, Path)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["train_replies"] == 3 for r in lines)
    assert lines[1]["evaluate"]["log-loss"] < lines[0]["evaluate"]["log-loss"]
    assert lines[1]["train"]["train-loss"] < lines[0]["train"]["train-loss"]
    assert len(run["rounds"]) == 2  # type: ignore[arg-type]


def test_run_directory_contents(run: dict[str, object]) -> None:
    run_dir = run["run_dir"]
    assert isinstance(run_dir, Path)
    for name in (
        "config.toml",
        "metrics.jsonl",
        "model.safetensors",
        "summary.json",
        "report.md",
        "metric_per_round.png",
    ):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["centralised"]) == {
        "logistic_regression",
        "hist_gradient_boosting",
        "pooled_torch",
    }
    assert 0.5 < summary["federated"]["roc_auc"] <= 1.0
    assert sum(summary["rows"].values()) == 450
    weights = load_file(str(run_dir / "model.safetensors"))
    assert "net.0.weight" in weights


def test_no_raw_customer_id_in_run_directory(run: dict[str, object]) -> None:
    run_dir = run["run_dir"]
    assert isinstance(run_dir, Path)
    # Synthetic raw ids look like cust-<seed>-<n>; branch exports must hold only pseudonyms.
    for path in run_dir.rglob("*"):
        if path.suffix == ".parquet":
            ids = pd.read_parquet(path)["customer_id"]
            assert ids.str.startswith("p_").all(), path
        elif path.is_file() and path.suffix in {".json", ".jsonl", ".md", ".toml", ".log"}:
            assert b"cust-" not in path.read_bytes(), path


def test_nothing_listens_beyond_loopback(run: dict[str, object]) -> None:
    sockets = run["sockets"]
    assert isinstance(sockets, list)
    assert sockets, "the sampler saw no listening socket at all: Ray did not run?"
    outside = [(pid, addr) for pid, addr in sockets if not _is_loopback(addr.rsplit(":", 1)[0])]
    assert outside == [], f"sockets listening beyond loopback: {sorted(set(outside))}"
