"""Federated MF on MovieLens 100K (ZIP-zone branches) beside centralised MF on the same split.

Protocol: leave-one-out by time, HR@10 / NDCG@10 against 99 fixed sampled negatives (seed
given) and against the full catalogue. The federated rounds run the ServerApp's round loop
(`fedcrm.server.run_federation` with the recommendation task: Flower's FedAvg over the item
arrays) and the real ClientApp, *in process* through `InProcessGrid` (no Ray, one node per
branch, branches trained one after another on one thread; ``bench/_rec_federation.py``), so the
bench fits in minutes on a shared 2-core machine. Round time is therefore the sum of all
branches' local work, not the parallel wall time of a deployment. Bytes are the serialised item
arrays of one branch's train reply and message (`ArrayRecord.count_bytes`), and Flower's wire
bytes of every train and evaluate message.

The federated model is reported twice: after the last round, and at the round with the best
pooled *validation* HR@10 (test items are never used for selection). Centralised MF uses the
same hyper-parameters, early-stopped on validation.

Two protocols:

* selection (default): branches train on the training items only; the round with the best
  pooled validation HR@10 is reported beside the last one, and centralised MF is early-stopped
  on validation. This is where settings and the number of rounds / epochs are chosen.
* final fit (``--train-on-validation``): the validation items join the training data (He et
  al. 2017 train on everything but the test item), the federation runs the number of rounds
  chosen above and centralised MF the number of epochs chosen above (``--mf-epochs``), and the
  test items are measured once.

Usage:
    .venv/bin/python bench/rec_federated.py [--rounds 12] [--local-epochs 2] [--seed 0]
    .venv/bin/python bench/rec_federated.py --train-on-validation --rounds 12 --mf-epochs 9

MovieLens is read from the installed ``recbole`` package; the negatives file goes to
``~/.cache/fedcrm``, never into the repository.
"""

import argparse
import logging
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rec_federation import Traffic, run_in_process
from fedcrm.models.rec_training import MFSettings, RankingMetrics, evaluate_branch, evaluate_scores
from fedcrm.server import RoundRecord
from fedcrm.simulation import parse_experiment
from fedcrm.tasks.recommendation.baselines import (
    HISTORY_MF,
    item_knn_scorer,
    popularity_scorer,
    train_centralised_mf,
)
from fedcrm.tasks.recommendation.data import experiment_data
from fedcrm.tasks.recommendation.metrics import comparison_table


def _metrics(values: dict[str, float], at: int = 10) -> RankingMetrics:
    n = int(values["users"])
    return RankingMetrics(
        k=at,
        count=n,
        hr_sampled_sum=values[f"hr{at}-sampled"] * n,
        ndcg_sampled_sum=values[f"ndcg{at}-sampled"] * n,
        hr_full_sum=values[f"hr{at}-full"] * n,
        ndcg_full_sum=values[f"ndcg{at}-full"] * n,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--weight-decay", type=float, default=0.003)
    parser.add_argument("--recency-halflife", type=float, default=20.0)
    parser.add_argument("--history-length", type=int, default=0, help="0: plain MF")
    parser.add_argument("--train-on-validation", action="store_true")
    parser.add_argument("--mf-epochs", type=int, default=15, help="centralised MF epochs (max)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-centralised", action="store_true")
    parser.add_argument(
        "--dataset",
        choices=["movielens-100k", "synthetic"],
        default="movielens-100k",
        help="synthetic: a small smoke run (the [synthetic] defaults)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    raw: dict[str, Any] = {
        "task": "recommendation",
        "name": "bench",
        "dataset": args.dataset,
        "seed": args.seed,
        "federation": {
            "num-rounds": args.rounds,
            "local-epochs": args.local_epochs,
            "lr": args.lr,
            "factors": args.factors,
            "batch-size": args.batch_size,
            "weight-decay": args.weight_decay,
            "recency-halflife": args.recency_halflife,
            "train-on-validation": args.train_on_validation,
            "history-length": args.history_length,
        },
    }
    cfg = parse_experiment(raw)
    fed, settings = cfg.federation, cfg.settings
    at = settings.top_k
    started = time.perf_counter()
    data, split, negatives = experiment_data(cfg.spec, cfg.seed)  # what the branches hold
    sizes = [len(data.branch_users(b.branch_id)) for b in data.branches]
    print(
        f"{args.dataset}: {data.n_users} users, {data.n_items} items, {len(split.train)} "
        f"training interactions; {len(data.branches)} branches, users {sizes}"
    )
    print(
        f"federated: {fed.num_rounds} rounds x {settings.local_epochs} local epoch(s), "
        f"d={settings.factors}, lr {settings.lr}, {settings.negatives_per_positive} negatives, "
        f"L2 {settings.weight_decay}, batch {settings.batch_size}, {settings.loss}, recency "
        f"half-life {settings.recency_halflife}, history {settings.history_length}; "
        + (
            "final fit (validation items trained on)"
            if settings.train_on_validation
            else "selection"
        )
        + "; in process (no Ray), 1 torch thread, "
        f"{platform.processor() or platform.machine()}"
    )

    def on_round(r: RoundRecord, traffic: Traffic) -> None:
        e = r.evaluate
        print(
            f"round {r.round:3d}: HR@{at} {e[f'hr{at}-sampled']:.4f} NDCG@{at} "
            f"{e[f'ndcg{at}-sampled']:.4f} | full HR@{at} {e[f'hr{at}-full']:.4f} NDCG@{at} "
            f"{e[f'ndcg{at}-full']:.4f} | val HR@{at} {e[f'val-hr{at}-sampled']:.4f} | "
            f"{r.seconds:.2f} s | {traffic.payload_up / 1e3:.1f} kB up per branch",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="fedcrm-rec-bench-") as tmp:
        run = run_in_process(cfg, Path(tmp), on_round=on_round)
    rounds = run.result.rounds
    best = max(rounds, key=lambda r: r.evaluate[f"val-hr{at}-sampled"])
    label = f"federated {'MF+history' if settings.history_length else 'MF'}"
    results = {f"{label}, last round ({fed.num_rounds})": _metrics(rounds[-1].evaluate, at)}
    if not settings.train_on_validation:
        results[f"{label}, best val round ({best.round})"] = _metrics(best.evaluate, at)
    base: dict[str, RankingMetrics] = {}
    if not args.no_centralised:
        mf = replace(
            MFSettings(),
            epochs=args.mf_epochs,
            eval_every=1,
            recency_halflife=settings.recency_halflife,
            factors=settings.factors,
            lr=settings.lr,
            negatives_per_positive=settings.negatives_per_positive,
            weight_decay=settings.weight_decay,
            batch_size=settings.batch_size,
            loss=settings.loss,
        )
        pooled = split.with_validation_in_train() if settings.train_on_validation else split
        base = {
            "popularity": evaluate_scores(popularity_scorer(pooled.train), pooled, negatives),
            "item-knn (50)": evaluate_scores(
                item_knn_scorer(pooled.train, neighbours=50), pooled, negatives
            ),
        }
        mf_settings = {"mf": mf}
        if settings.history_length:
            mf_settings[HISTORY_MF] = replace(mf, history_length=settings.history_length)
        for name, chosen_settings in mf_settings.items():
            fit = train_centralised_mf(
                pooled,
                chosen_settings,
                seed=fed.seed,
                negatives=None if settings.train_on_validation else negatives,
            )
            base[name] = evaluate_branch(fit.model, pooled, negatives)
            if fit.val_history:
                history = " ".join(f"{e}:{hr:.3f}" for e, hr in fit.val_history)
                print(
                    f"centralised {name} validation HR@10 by epoch {history}; kept {fit.best_epoch}"
                )
        results.update({f"centralised {name}": m for name, m in base.items()})
    print()
    print(comparison_table(results, data="ML-100K" if args.dataset != "synthetic" else "synth"))
    seconds = [r.seconds for r in rounds]
    up = [t.payload_up for t in run.traffic]
    down = [t.payload_down for t in run.traffic]
    print(
        f"\nround time: mean {np.mean(seconds):.2f} s, median {np.median(seconds):.2f} s "
        f"(train + evaluate, all {len(data.branches)} branches sequentially, in process)"
    )
    print(
        f"item bytes per branch per round: {np.mean(up):,.0f} up, {np.mean(down):,.0f} down "
        f"(item factors {data.n_items}x{settings.factors} + biases"
        + (
            f", context factors {data.n_items}x{settings.factors} + "
            f"{settings.history_length} weights"
            if settings.history_length
            else ""
        )
        + ", float32); user factors and histories: 0"
    )
    wire_up = np.mean([t.wire_up for t in run.traffic])
    wire_down = np.mean([t.wire_down for t in run.traffic])
    print(
        f"wire bytes per branch per round (train + evaluate): {wire_up:,.0f} up, "
        f"{wire_down:,.0f} down"
    )
    if base:
        chosen = rounds[-1] if settings.train_on_validation else best
        reference = HISTORY_MF if settings.history_length else "mf"
        gap = _metrics(chosen.evaluate, at).hr_sampled - base[reference].hr_sampled
        which = "last round" if settings.train_on_validation else "best val round"
        print(f"federated ({which}) minus centralised {reference}, HR@10: {gap:+.4f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
