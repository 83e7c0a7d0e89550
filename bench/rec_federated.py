"""Federated MF on MovieLens 100K (ZIP-zone branches) beside centralised MF on the same split.

Protocol: leave-one-out by time, HR@10 / NDCG@10 against 99 fixed sampled negatives (seed
given) and against the full catalogue. The federated rounds run the recommendation ServerApp
loop (`run_rec_federation`, Flower's FedAvg over the item arrays) and the ClientApp, *in
process* through `InProcessGrid` (no Ray, one node per branch, branches trained one after
another on one thread), so the bench fits in minutes on a shared 2-core machine. Round time is
therefore the sum of all branches' local work, not the parallel wall time of a deployment.
Bytes are the serialised item arrays of one branch's reply (`ArrayRecord.count_bytes`); the
server sends the same amount down.

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
import time
from dataclasses import replace

import numpy as np
import torch

from fedcrm.client.rec_app import make_rec_client_app
from fedcrm.models.rec_training import MFSettings, RankingMetrics, evaluate_branch, evaluate_scores
from fedcrm.server.rec_federation import RecFederationConfig, RecRoundRecord, run_rec_federation
from fedcrm.simulation.rec_baselines import (
    HISTORY_MF,
    item_knn_scorer,
    popularity_scorer,
    train_centralised_mf,
)
from fedcrm.simulation.rec_config import RecExperimentConfig
from fedcrm.simulation.rec_metrics import comparison_table
from fedcrm.simulation.rec_runner import (
    InProcessGrid,
    RecBranches,
    in_process_identity,
    load_rec_data,
    model_label,
    prepare_split,
)


def _metrics(values: dict[str, float]) -> RankingMetrics:
    n = int(values["users"])
    return RankingMetrics(
        k=10,
        count=n,
        hr_sampled_sum=values["hr10-sampled"] * n,
        ndcg_sampled_sum=values["ndcg10-sampled"] * n,
        hr_full_sum=values["hr10-full"] * n,
        ndcg_full_sum=values["ndcg10-full"] * n,
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    fed = RecFederationConfig(
        num_rounds=args.rounds,
        local_epochs=args.local_epochs,
        lr=args.lr,
        factors=args.factors,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        recency_halflife=args.recency_halflife,
        train_on_validation=args.train_on_validation,
        history_length=args.history_length,
        seed=args.seed,
    )
    cfg = RecExperimentConfig(name="bench", dataset="movielens-100k", federation=fed)
    started = time.perf_counter()
    data = load_rec_data(cfg)
    split, negatives = prepare_split(cfg, data)
    sizes = [len(data.branch_users(b.branch_id)) for b in data.branches]
    print(
        f"MovieLens 100K: {data.n_users} users, {data.n_items} items, {len(split.train)} "
        f"training interactions; {len(data.branches)} ZIP-zone branches, users {sizes}"
    )
    print(
        f"federated: {fed.num_rounds} rounds x {fed.local_epochs} local epoch(s), d={fed.factors},"
        f" lr {fed.lr}, {fed.negatives_per_positive} negatives, L2 {fed.weight_decay}, "
        f"batch {fed.batch_size}, {fed.loss}, recency half-life {fed.recency_halflife}, "
        f"history {fed.history_length}; "
        f"{'final fit (validation items trained on)' if fed.train_on_validation else 'selection'}"
        "; in process (no Ray), 1 torch thread, "
        f"{platform.processor() or platform.machine()}"
    )

    def on_round(r: RecRoundRecord) -> None:
        up = np.mean(list(r.bytes_up.values()))
        print(
            f"round {r.round:3d}: HR@10 {r.test['hr10-sampled']:.4f} NDCG@10 "
            f"{r.test['ndcg10-sampled']:.4f} | full HR@10 {r.test['hr10-full']:.4f} NDCG@10 "
            f"{r.test['ndcg10-full']:.4f} | val HR@10 {r.val['hr10-sampled']:.4f} | "
            f"{r.seconds:.2f} s | {up / 1e3:.1f} kB up per branch",
            flush=True,
        )

    grid = InProcessGrid(make_rec_client_app(RecBranches(cfg)), len(data.branches))
    with in_process_identity():
        result = run_rec_federation(
            grid, fed, n_items=data.n_items, min_nodes=len(data.branches), on_round=on_round
        )
    rounds = result.rounds
    best = max(rounds, key=lambda r: r.val["hr10-sampled"])
    label = f"federated {model_label(fed.history_length)}"
    results = {f"{label}, last round ({fed.num_rounds})": _metrics(rounds[-1].test)}
    if not fed.train_on_validation:
        results[f"{label}, best val round ({best.round})"] = _metrics(best.test)
    if not args.no_centralised:
        mf = replace(
            MFSettings(),
            epochs=args.mf_epochs,
            eval_every=1,
            recency_halflife=fed.recency_halflife,
            factors=fed.factors,
            lr=fed.lr,
            negatives_per_positive=fed.negatives_per_positive,
            weight_decay=fed.weight_decay,
            batch_size=fed.batch_size,
            loss=fed.loss,
        )
        pooled = split.with_validation_in_train() if fed.train_on_validation else split
        base = {
            "popularity": evaluate_scores(popularity_scorer(pooled.train), pooled, negatives),
            "item-knn (50)": evaluate_scores(
                item_knn_scorer(pooled.train, neighbours=50), pooled, negatives
            ),
        }
        settings = {"mf": mf}
        if fed.history_length:
            settings[HISTORY_MF] = replace(mf, history_length=fed.history_length)
        for name, mf_settings in settings.items():
            fit = train_centralised_mf(
                pooled,
                mf_settings,
                seed=fed.seed,
                negatives=None if fed.train_on_validation else negatives,
            )
            base[name] = evaluate_branch(fit.model, pooled, negatives)
            if fit.val_history:
                history = " ".join(f"{e}:{hr:.3f}" for e, hr in fit.val_history)
                print(
                    f"centralised {name} validation HR@10 by epoch {history}; kept {fit.best_epoch}"
                )
        results.update({f"centralised {name}": m for name, m in base.items()})
    print()
    print(comparison_table(results))
    seconds = [r.seconds for r in rounds]
    up = [v for r in rounds for v in r.bytes_up.values()]
    down = [v for r in rounds for v in r.bytes_down.values()]
    print(
        f"\nround time: mean {np.mean(seconds):.2f} s, median {np.median(seconds):.2f} s "
        f"(train + evaluate, all {len(data.branches)} branches sequentially, in process)"
    )
    print(
        f"bytes per branch per round: {np.mean(up):,.0f} up, {np.mean(down):,.0f} down "
        f"(item factors {data.n_items}x{fed.factors} + biases"
        + (
            f", context factors {data.n_items}x{fed.factors} + {fed.history_length} weights"
            if fed.history_length
            else ""
        )
        + ", float32); user factors and histories: 0"
    )
    if not args.no_centralised:
        chosen = rounds[-1] if fed.train_on_validation else best
        reference = HISTORY_MF if fed.history_length else "mf"
        gap = _metrics(chosen.test).hr_sampled - base[reference].hr_sampled
        which = "last round" if fed.train_on_validation else "best val round"
        print(f"federated ({which}) minus centralised {reference}, HR@10: {gap:+.4f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
