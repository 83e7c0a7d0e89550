"""Federated MF on MovieLens 100K in plaintext and under CKKS HE: HR@10 and bytes per branch.

Both runs use one experiment's settings (default ``examples/movielens_zip_he.toml``: the
example's final fit) and the recommendation round loop and ClientApp *in process*
(`InProcessGrid`, as ``bench/rec_federated.py``: no Ray, branches one after another on one torch
thread). The HE run creates its keys in a temporary folder, wraps FedAvg in
`fedcrm.strategies.he.HEAggregation` and every branch's ClientApp in `HEMod`, exactly as
``fedcrm simulate`` does; its final item arrays are decrypted from the server's ciphertext
checkpoints.

Bytes per branch and round, two ways:

* item payload: the item arrays (float32) or the CKKS ciphertext that replaces them, up (train
  reply) and down (train message: the previous round's aggregate under HE);
* wire: Flower's protobuf size of every train and evaluate message's content
  (`fedcrm.server.traffic.wire_size`), down and up, as the churn traffic table counts them.

Round time is the sum of all branches' work (sequential), in CPU-bound process time, so it is
only a rough cost on the shared 2-core machine.

Usage:
    .venv/bin/python bench/rec_he.py [--config examples/movielens_zip_he.toml] [--rounds N]
"""

import argparse
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message

from fedcrm.client.rec_app import make_rec_client_app
from fedcrm.server.rec_federation import RecFederationResult, RecRoundRecord, run_rec_federation
from fedcrm.server.traffic import wire_size
from fedcrm.simulation.rec_config import load_rec_experiment
from fedcrm.simulation.rec_he import replay_items, setup_rec_he
from fedcrm.simulation.rec_runner import (
    InProcessGrid,
    RecBranches,
    in_process_identity,
    load_rec_data,
)
from fedcrm.strategies.guardrails import AggregationMode

ROOT = Path(__file__).resolve().parents[1]


class WireGrid(InProcessGrid):
    """`InProcessGrid` that adds up each round's protobuf bytes per node (down before delivery:
    a mod may replace a message's content in process)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.down: dict[int, int] = defaultdict(int)
        self.up: dict[int, int] = defaultdict(int)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        out = list(messages)
        for msg in out:
            self.down[msg.metadata.dst_node_id] += wire_size(msg.content)
        replies = list(super().send_and_receive(out, timeout=timeout))
        for reply in replies:
            self.up[reply.metadata.src_node_id] += wire_size(reply.content)
        return replies

    def take(self) -> tuple[float, float]:
        """Mean bytes per node since the last call (down, up)."""
        down = float(np.mean(list(self.down.values())))
        up = float(np.mean(list(self.up.values())))
        self.down.clear()
        self.up.clear()
        return down, up


def run(config: Path, mode: AggregationMode, rounds: int | None) -> dict[str, float]:
    """One in-process federation; returns the figures of the table."""
    cfg = load_rec_experiment(config)
    if rounds is not None:
        cfg = replace(cfg, federation=replace(cfg.federation, num_rounds=rounds))
    cfg = replace(cfg, aggregation=mode)
    data = load_rec_data(cfg)
    with tempfile.TemporaryDirectory(prefix="fedcrm-rec-he-") as tmp:
        he = setup_rec_he(Path(tmp)) if mode is AggregationMode.HE else None
        app = make_rec_client_app(RecBranches(cfg), mods=() if he is None else (he.mod,))
        grid = WireGrid(app, len(data.branches))
        wires: list[tuple[float, float]] = []
        cpu: list[float] = []
        last = [time.process_time()]

        def on_round(r: RecRoundRecord) -> None:
            wires.append(grid.take())
            now = time.process_time()
            cpu.append(now - last[0])
            last[0] = now
            print(
                f"  {mode} round {r.round}: HR@10 {r.test['hr10-sampled']:.4f} NDCG@10 "
                f"{r.test['ndcg10-sampled']:.4f} | {np.mean(list(r.bytes_up.values())):,.0f} B "
                f"up | {r.seconds:.1f} s",
                flush=True,
            )

        with in_process_identity():
            result: RecFederationResult = run_rec_federation(
                grid,
                cfg.federation,
                n_items=data.n_items,
                min_nodes=len(data.branches),
                on_round=on_round,
                he=None if he is None else he.server,
            )
        items = result.items if he is None else replay_items(result, he.keys.secret_path)
    rs = result.rounds
    later = rs[1:] or rs  # round 1 sends the plaintext initial items down in both modes
    return {
        "hr10": rs[-1].test["hr10-sampled"],
        "ndcg10": rs[-1].test["ndcg10-sampled"],
        "hr10_full": rs[-1].test["hr10-full"],
        "params": float(sum(a.size for a in items.values())),
        "payload_up": float(np.mean([v for r in rs for v in r.bytes_up.values()])),
        "payload_down": float(np.mean([v for r in later for v in r.bytes_down.values()])),
        "wire_down": float(np.mean([d for d, _ in wires[1:] or wires])),
        "wire_up": float(np.mean([u for _, u in wires])),
        "round_s": float(np.median([r.seconds for r in rs])),
        "round_cpu_s": float(np.median(cpu)),
        "rejected": float(sum(len(r.rejected) for r in rs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=ROOT / "examples/movielens_zip_he.toml")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    out = {
        mode: run(args.config, mode, args.rounds) for mode in AggregationMode if mode != "secagg"
    }
    plain, he = out[AggregationMode.PLAIN], out[AggregationMode.HE]
    print(f"\n{int(plain['params']):,} item-tower parameters (float32)")
    print(
        "| mode | HR@10 | NDCG@10 | HR@10 full | item bytes up | item bytes down (rounds 2+) "
        "| wire up | wire down (rounds 2+) | median round s | median round CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in (("plain", plain), ("HE", he)):
        print(
            f"| {name} | {r['hr10']:.4f} | {r['ndcg10']:.4f} | {r['hr10_full']:.4f} "
            f"| {r['payload_up']:,.0f} | {r['payload_down']:,.0f} | {r['wire_up']:,.0f} "
            f"| {r['wire_down']:,.0f} | {r['round_s']:.2f} | {r['round_cpu_s']:.2f} |"
        )
    print(
        f"HE / plain: item bytes up {he['payload_up'] / plain['payload_up']:.2f}x, wire up "
        f"{he['wire_up'] / plain['wire_up']:.2f}x, wire down "
        f"{he['wire_down'] / plain['wire_down']:.2f}x, round time "
        f"{he['round_s'] / plain['round_s']:.2f}x; HR@10 difference "
        f"{he['hr10'] - plain['hr10']:+.4f}; rejected replies {int(he['rejected'])}"
    )


if __name__ == "__main__":
    main()
