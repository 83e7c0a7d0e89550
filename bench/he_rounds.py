"""Benchmark: a federated churn round in plaintext vs with HE aggregation, 10 and 100 branches.

Run: ``.venv/bin/python bench/he_rounds.py`` (about 2-3 minutes on the 2-core VM; ``--quick``
for a smoke run).

What runs: the real code paths, in one process, without Ray: the server side is
``ValidatedStrategy(FedAvg)`` or ``ValidatedStrategy(HEAggregation(FedAvg))`` exactly as
``run_federation`` builds it; each branch is the ``HEMod`` (HE only) around a handler doing what
the ClientApp's train / evaluate handlers do (``fedcrm.client.branch.train`` / ``evaluate`` on
its synthetic MLC split, churn MLP 22-64-32-1). Branches run one after the other, so a round's
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
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedcrm.client import branch
from fedcrm.client.he_mod import HEMod
from fedcrm.data.check import coerce_frame
from fedcrm.data.preprocess import Scaler, combine_moments, local_moments
from fedcrm.data.schema import get_schema
from fedcrm.data.split import Split, split_frame
from fedcrm.data.synthetic import synthetic_export
from fedcrm.models.churn import TrainSettings, build_model
from fedcrm.privacy import he, keys
from fedcrm.strategies.he import HEAggregation
from fedcrm.strategies.validated import ValidatedStrategy

ROWS_PER_BRANCH = 120
SETTINGS = TrainSettings(epochs=1, batch_size=32, lr=0.01)


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


class Branch:
    def __init__(self, node: int, split: Split, scaler: Scaler, mod: HEMod | None) -> None:
        self.node, self.split, self.scaler, self.mod = node, split, scaler, mod
        self.schema = get_schema("mlc")
        self.context = Context(1, node, {}, RecordDict(), {})

    def _handler(self, msg: Message, _ctxt: Context) -> Message:
        state = msg.content.array_records["arrays"].to_torch_state_dict()
        if msg.metadata.message_type == "train":
            out = branch.train(
                self.split, self.schema, self.scaler, state, SETTINGS, seed=self.node
            )
            content = RecordDict(
                {
                    "arrays": ArrayRecord(out.state_dict),
                    "metrics": MetricRecord(
                        {"num-examples": out.num_examples, "train-loss": out.train_loss}
                    ),
                }
            )
        else:
            ev = branch.evaluate(self.split, self.schema, self.scaler, state)
            content = RecordDict(
                {"metrics": MetricRecord({"num-examples": ev.num_examples, "loss": ev.loss_sum})}
            )
        return Message(content, reply_to=msg)

    def handle(self, msg: Message) -> Message:
        if self.mod is None:
            return self._handler(msg, self.context)
        return self.mod(msg, self.context, self._handler)


def _branches(n: int, key_dir: Path | None) -> list[Branch]:
    schema = get_schema("mlc")
    frame = coerce_frame(synthetic_export(schema, n * ROWS_PER_BRANCH, seed=1), schema)
    splits = [
        split_frame(frame.iloc[i::n].reset_index(drop=True), label=schema.label, seed=i)
        for i in range(n)
    ]
    scaler = Scaler.from_moments(combine_moments(local_moments(s.train, schema) for s in splits))
    mod = HEMod(key_dir) if key_dir is not None else None
    return [Branch(i + 1, s, scaler, mod) for i, s in enumerate(splits)]


def run_rounds(n: int, rounds: int, key_dir: Path | None) -> list[RoundStats]:
    schema = get_schema("mlc")
    branches = {b.node: b for b in _branches(n, key_dir)}
    inner = FedAvg(min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n)
    if key_dir is not None:
        public = keys.load_public_context(keys.current_generation(key_dir).public_path)
        strategy = ValidatedStrategy(HEAggregation(inner, public_context=public))
    else:
        strategy = ValidatedStrategy(inner)
    arrays = ArrayRecord(build_model(schema.input_dim, seed=0).state_dict())
    grid = _Grid(n)
    stats = []
    for rnd in range(1, rounds + 1):
        start = time.perf_counter()
        server = branch_time = 0.0
        t = time.perf_counter()
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
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
        evals = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
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
    for name in ("_run_id", "_task_id", "_node_id"):  # Flower stamps messages with its task id
        setattr(TaskIdentity, name, 1)
    torch.set_num_threads(1)

    schema = get_schema("mlc")
    params = sum(t.numel() for t in build_model(schema.input_dim, seed=0).state_dict().values())
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
    with tempfile.TemporaryDirectory() as folder:
        key_dir = Path(folder) / "keys"
        keys.init_keys(key_dir)
        for n in args.branches:
            plain_round = plain_path = 0.0
            for mode, kd in (("plain", None), ("he", key_dir)):
                stats = run_rounds(n, args.rounds, kd)[1:]
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
    for length, k in cases:
        row = [summation_throughput(length, k, e, 3) for e in ("numpy", "tenseal")]
        print(f"| {length:,} | {k} | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
