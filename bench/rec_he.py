"""Federated MF on MovieLens 100K in plaintext and under CKKS HE: HR@10 and bytes per branch.

Both runs use one experiment's settings (default ``examples/movielens_zip_he.toml``: the
example's final fit) and the ServerApp's round loop and ClientApp *in process*
(`InProcessGrid`, as ``bench/rec_federated.py``: no Ray, branches one after another on one torch
thread). The HE run creates its keys in a temporary folder, wraps FedAvg in
`fedcrm.strategies.HEAggregation` (`fedcrm.server.Wiring`, as the ServerApp does) and every
branch's ClientApp in `HEMod`, exactly as ``fedcrm simulate`` does; its final item arrays are
decrypted from the server's ciphertext checkpoints (`fedcrm.strategies.replay_global_model`).

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
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rec_federation import Traffic, run_in_process
from fedcrm.client import HEMod
from fedcrm.compliance import sqlite_url
from fedcrm.privacy.keys import init_keys, load_public_context, load_secret_context
from fedcrm.server import AggregationConfig, RoundRecord, Wiring
from fedcrm.simulation import load_experiment
from fedcrm.strategies import AggregationMode, replay_global_model

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, mode: AggregationMode, rounds: int | None) -> dict[str, float]:
    """One in-process federation; returns the figures of the table."""
    cfg = load_experiment(config)
    if rounds is not None:
        cfg = replace(cfg, federation=replace(cfg.federation, num_rounds=rounds))
    cfg = replace(cfg, aggregation=AggregationConfig(mode=mode))
    at = cfg.settings.top_k
    with tempfile.TemporaryDirectory(prefix="fedcrm-rec-he-") as tmp:
        root = Path(tmp)
        keys = init_keys(root / "keys") if mode is AggregationMode.HE else None
        wiring = Wiring(
            cfg.aggregation,
            None,
            rounds=cfg.federation.num_rounds,
            run_id="bench",
            ledger_url=sqlite_url(root / "ledger.db"),
            round_timeout=cfg.federation.round_timeout,
            public_context=None if keys is None else load_public_context(keys.public_path),
            checkpoint_dir=None if keys is None else root / "checkpoints",
        )
        cpu: list[float] = []
        last = [time.process_time()]

        def on_round(r: RoundRecord, traffic: Traffic) -> None:
            now = time.process_time()
            cpu.append(now - last[0])
            last[0] = now
            print(
                f"  {mode} round {r.round}: HR@{at} {r.evaluate[f'hr{at}-sampled']:.4f} "
                f"NDCG@{at} {r.evaluate[f'ndcg{at}-sampled']:.4f} | "
                f"{traffic.payload_up:,.0f} B up | {r.seconds:.1f} s",
                flush=True,
            )

        out = run_in_process(
            cfg,
            root / "run",
            mods=() if keys is None else (HEMod(root / "keys"),),
            wrap_strategy=wiring.wrap if wiring.wraps else None,
            on_round=on_round,
        )
        items = out.result.arrays
        server = wiring.he
        if keys is not None and server is not None and server.initial is not None:
            items = replay_global_model(
                server.initial, server.checkpoints, load_secret_context(keys.secret_path)
            )
    rs, traffic = out.result.rounds, out.traffic
    later = traffic[1:] or traffic  # round 1 sends the plaintext initial items down in both modes
    return {
        "hr10": rs[-1].evaluate[f"hr{at}-sampled"],
        "ndcg10": rs[-1].evaluate[f"ndcg{at}-sampled"],
        "hr10_full": rs[-1].evaluate[f"hr{at}-full"],
        "params": float(sum(np.asarray(a).size for a in items.values())),
        "payload_up": float(np.mean([t.payload_up for t in traffic])),
        "payload_down": float(np.mean([t.payload_down for t in later])),
        "wire_down": float(np.mean([t.wire_down for t in later])),
        "wire_up": float(np.mean([t.wire_up for t in traffic])),
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
        mode: run(args.config, mode, args.rounds)
        for mode in (AggregationMode.PLAIN, AggregationMode.HE)
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
