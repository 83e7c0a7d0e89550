"""Benchmark: a federated churn round in plaintext vs with HE aggregation, 10 and 100 branches.

Run: ``.venv/bin/python bench/he_rounds.py`` (about 2-3 minutes on the 2-core VM; ``--quick``
for a smoke run).

What runs: the real code paths, in one process, without Ray: the server side is
``ValidatedStrategy(FedAvg)`` or ``ValidatedStrategy(HEAggregation(FedAvg))`` exactly as
``run_federation`` builds it (``build_strategy`` with the churn task's pooled evaluation); each
branch is the ``HEMod`` (HE only) around a handler doing what the ClientApp's train / evaluate
handlers do (the churn task's ``train`` / ``evaluate`` on its synthetic MLC branch, written and
read back by the task as ``fedcrm simulate`` does; churn MLP 22-64-32-1). Every message carries
the federated scaler, as the product's do. Branches run one after the other, so a round's
wall time here is the *sum* of all branch work plus the server's; the table also gives the
per-branch and server shares, and their sum: the critical path of a deployment where branches
work in parallel (one branch's train + evaluate work, plus the server's).

Bytes are Flower's wire bytes: the protobuf size of each message's ``RecordDict``
(``flwr.common.serde.recorddict_to_proto``), server -> branch (train message) and
branch -> server (train reply), per branch per round. Round times are medians over rounds
2..R (round 1 of HE carries the plaintext initial model).

The last table is the server-side ciphertext summation throughput (GB of ciphertext added
per second, parsing and CRC checks included) for both summation engines of
``fedcrm.privacy.he.sum_encrypted``.
"""

import argparse
import logging
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedcrm import wire as k
from fedcrm.client import HEMod
from fedcrm.privacy import he, keys
from fedcrm.simulation import in_process_identity, parse_experiment
from fedcrm.strategies import HEAggregation, StrategyName, ValidatedStrategy, build_strategy
from fedcrm.tasks import Arrays, BranchSource, RoundContext, Task, get_task

ROWS_PER_BRANCH = 120


def experiment(n: int) -> dict[str, Any]:
    """``n`` synthetic MLC branches of about ``ROWS_PER_BRANCH`` customers (IID)."""
    return {
        "name": f"he-rounds-{n}",
        "dataset": "synthetic:mlc",
        "rows": n * ROWS_PER_BRANCH,
        "seed": 1,
        "partition": {"kind": "iid", "num-branches": n},
        "federation": {"local-epochs": 1, "batch-size": 32, "lr": 0.01, "seed": 0},
    }


class _Grid:
    def __init__(self, n: int) -> None:
        self.nodes = list(range(1, n + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


@dataclass
class RoundStats:
    seconds: float
    branch_seconds: float
    server_seconds: float
    down_bytes: float
    up_bytes: float


def _wire(content: RecordDict) -> int:
    return int(recorddict_to_proto(content).ByteSize())


def _arrays(record: ArrayRecord) -> Arrays:
    return {name: record[name].numpy() for name in record}


class Branch:
    """One branch: the task's train / evaluate on its data, behind the HE mod (HE runs)."""

    def __init__(self, node: int, fed: "Branches", mod: HEMod | None) -> None:
        self.node, self.task, self.settings, self.mod = node, fed.task, fed.settings, mod
        self.data, self.folder = fed.data[node - 1], fed.folders[node - 1]
        self.context = Context(1, node, {}, RecordDict(), {})

    def _handler(self, msg: Message, ctxt: Context) -> Message:
        arrays = _arrays(msg.content.array_records[k.ARRAYS])
        config = dict(msg.content.config_records[k.CONFIG])
        server_round = int(config.get(k.KEY_SERVER_ROUND, 0))  # type: ignore[call-overload]
        ctx = RoundContext(  # as the ClientApp builds it (run seed 0, partition node - 1)
            server_round=server_round,
            seed=1000 * server_round + self.node - 1,
            run_seed=0,
            config=config,
            state=ctxt.state,
            folder=self.folder,
        )
        if msg.metadata.message_type == "train":
            out = self.task.train(self.data, arrays, self.settings, ctx)
            content = RecordDict(
                {
                    k.ARRAYS: ArrayRecord(
                        {name: Array(np.ascontiguousarray(a)) for name, a in out.arrays.items()}
                    ),
                    k.METRICS: MetricRecord({k.KEY_NUM_EXAMPLES: out.num_examples, **out.metrics}),
                }
            )
        else:
            values = self.task.evaluate(self.data, arrays, self.settings, ctx)
            content = RecordDict({k.METRICS: MetricRecord(values)})  # type: ignore[arg-type]
        return Message(content, reply_to=msg)

    def handle(self, msg: Message) -> Message:
        if self.mod is None:
            return self._handler(msg, self.context)
        return self.mod(msg, self.context, self._handler)


@dataclass
class Branches:
    """A federation of ``n`` synthetic branches, read back through the churn task."""

    task: Task[Any, Any]
    settings: Any
    data: list[Any]
    folders: list[Path]
    statistics: dict[str, Any]
    initial: Arrays


def prepare(n: int, workdir: Path) -> Branches:
    cfg = parse_experiment(experiment(n))
    task = cfg.plugin
    simulated = task.experiment.prepare(cfg.spec, cfg.settings, workdir, seed=cfg.seed)
    data = [
        task.load(
            BranchSource(folder=b.folder, name=b.name, number=b.partition_id),
            cfg.settings,
            seed=cfg.federation.seed,
        )
        for b in simulated.branches
    ]
    stats = task.combine_statistics(
        cfg.settings, [MetricRecord(task.statistics(d, cfg.settings)) for d in data]
    )
    initial = task.initial_arrays(cfg.settings, seed=cfg.federation.seed)
    folders = [b.folder for b in simulated.branches]
    return Branches(task, cfg.settings, data, folders, dict(stats), initial)


def run_rounds(fed: Branches, rounds: int, key_dir: Path | None) -> list[RoundStats]:
    n = len(fed.data)
    mod = HEMod(key_dir) if key_dir is not None else None
    branches = {node: Branch(node, fed, mod) for node in range(1, n + 1)}
    inner = build_strategy(
        StrategyName.FEDAVG,
        num_nodes=n,
        evaluate_metrics=partial(fed.task.aggregate_evaluation, fed.settings),
    )
    if key_dir is not None:
        public = keys.load_public_context(keys.current_generation(key_dir).public_path)
        strategy = ValidatedStrategy(HEAggregation(inner, public_context=public))
    else:
        strategy = ValidatedStrategy(inner)
    arrays = ArrayRecord({name: Array(a) for name, a in fed.initial.items()})
    config = ConfigRecord(fed.statistics)
    grid = _Grid(n)
    stats = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        server = branch_time = 0.0
        t = time.perf_counter()
        msgs = list(strategy.configure_train(rnd, arrays, config, grid))  # type: ignore[arg-type]
        server += time.perf_counter() - t
        down = statistics.mean(_wire(m.content) for m in msgs)
        replies = []
        for m in msgs:
            t = time.perf_counter()
            replies.append(branches[m.metadata.dst_node_id].handle(m))
            branch_time += time.perf_counter() - t
        up = statistics.mean(_wire(r.content) for r in replies)
        t = time.perf_counter()
        new, _ = strategy.aggregate_train(rnd, replies)
        assert new is not None, "no update aggregated"
        arrays = new
        evals = list(strategy.configure_evaluate(rnd, arrays, config, grid))  # type: ignore[arg-type]
        server += time.perf_counter() - t
        ev_replies = []
        for m in evals:
            t = time.perf_counter()
            ev_replies.append(branches[m.metadata.dst_node_id].handle(m))
            branch_time += time.perf_counter() - t
        t = time.perf_counter()
        strategy.aggregate_evaluate(rnd, ev_replies)
        server += time.perf_counter() - t
        stats.append(RoundStats(time.perf_counter() - start, branch_time / n, server, down, up))
    return stats


def summation_throughput(length: int, branches: int, engine: he.SumEngine, repeats: int) -> float:
    pair = he.create_contexts()
    rng = np.random.default_rng(0)
    wires = [
        he.encrypt_update(pair.secret, rng.uniform(-1, 1, length), key_id=pair.key_id).to_bytes()
        for _ in range(branches)
    ]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        updates = [he.EncryptedUpdate.from_bytes(w) for w in wires]
        he.sum_encrypted(pair.public, updates, engine=engine)
        times.append(time.perf_counter() - t)
    return sum(len(w) for w in wires) / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--branches", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--quick", action="store_true", help="2 rounds, 10 branches")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.branches = 2, [10]
    logging.disable(logging.WARNING)  # Flower logs every sampling at INFO
    torch.set_num_threads(1)

    settings = parse_experiment(experiment(1)).settings
    params = sum(int(a.size) for a in get_task("churn").initial_arrays(settings, seed=0).values())
    print(f"# HE vs plaintext rounds ({platform.machine()}, {platform.python_version()})")
    print(
        f"churn MLP: {params} parameters ({4 * params} B as float32); "
        f"{ROWS_PER_BRANCH} synthetic rows per branch; medians of rounds 2..{args.rounds}\n"
    )
    print(
        "| branches | mode | down B/branch | up B/branch | up vs float32 | round s "
        "| per-branch | server | HE/plain round | parallel path | HE/plain parallel |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, in_process_identity():
        key_dir = Path(folder) / "keys"
        keys.init_keys(key_dir)
        for n in args.branches:
            fed = prepare(n, Path(folder) / f"n{n}")
            plain_round = plain_path = 0.0
            for mode, kd in (("plain", None), ("he", key_dir)):
                stats = run_rounds(fed, args.rounds, kd)[1:]
                med = {
                    f: statistics.median(getattr(s, f) for s in stats)
                    for f in (
                        "seconds",
                        "branch_seconds",
                        "server_seconds",
                        "down_bytes",
                        "up_bytes",
                    )
                }
                path = med["branch_seconds"] + med["server_seconds"]  # one branch + server
                if mode == "plain":
                    plain_round, plain_path = med["seconds"], path
                ratio = med["seconds"] / plain_round
                print(
                    f"| {n} | {mode} | {med['down_bytes']:,.0f} | {med['up_bytes']:,.0f} | "
                    f"{med['up_bytes'] / (4 * params):.2f}x | {med['seconds']:.3f} | "
                    f"{med['branch_seconds'] * 1e3:.1f} ms | {med['server_seconds'] * 1e3:.1f} ms"
                    f" | {ratio:.2f}x | {path * 1e3:.1f} ms | {path / plain_path:.2f}x |"
                )
    print("\n## Server-side ciphertext summation (parse + CRC + add), GB/s of ciphertext\n")
    print("| values | branches | numpy | tenseal |")
    print("|---|---|---|---|")
    cases = [(params, 10), (params, 100), (100_000, 10)] if not args.quick else [(params, 10)]
    for length, count in cases:
        row = [summation_throughput(length, count, e, 3) for e in ("numpy", "tenseal")]
        print(f"| {length:,} | {count} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
