"""Upper bound of customer-level DP for the recommender: one pooled population, no federation.

Why a bench for something the product does not run: with DP at ε <= 8 the federated run stays
far below the HR@10 target of 0.65 (README). This bench asks whether *any* placement of the
noise could reach it on MovieLens 100K: all 943 customers in one DP-SGD population (as if a
trusted curator, or a perfect secure aggregation across branches, held them), the same
customer-level rows as the branches use (`fedcrm.models.rec_private.user_rows`: a customer's
latest ``--cap`` interactions are one clipped row), Poisson sampling at ``--batch`` customers
per step, σ planned by the project's accountant for the target ε after all steps, and a
near-noiseless reference (σ = 0.01, clipping kept) on the same schedule. Each round fits the
user factors locally (no noise: joint DP, as on a branch), then runs ``--epochs`` epochs of
DP-SGD on the item tower. Final fit protocol: validation items in training, test items once.

Usage:
    .venv/bin/python bench/rec_dp_central.py [--epsilon 8] [--rounds 10] [--batch 94]
"""

import argparse
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fedcrm.data.movielens import (
    LeaveOneOutSplit,
    SampledNegatives,
    leave_one_out,
    load_movielens_100k,
    load_or_sample_negatives,
)
from fedcrm.models.rec_private import fit_user_factors, train_items_private, user_rows
from fedcrm.models.rec_training import evaluate_branch
from fedcrm.models.recommender import MatrixFactorisation
from fedcrm.privacy import (
    InsecureRNGWarning,
    plan_noise_multiplier,
    poisson_sample_rate,
    steps_per_epoch,
)

NEAR_NOISELESS = 0.01


def run(
    split: LeaveOneOutSplit,
    negatives: SampledNegatives,
    sigma: float,
    *,
    rounds: int,
    epochs: int,
    batch: int,
    factors: int,
    cap: int,
    lr: float,
) -> list[float]:
    model = MatrixFactorisation(split.n_users, split.n_items, factors, seed=0)
    rng = np.random.default_rng(0)
    hr: list[float] = []
    for rnd in range(rounds):
        fit_user_factors(
            model,
            split.train,
            epochs=1,
            lr=0.005,
            negatives_per_positive=4,
            seed=rnd,
            weight_decay=0.003,
            batch_size=512,
            loss="bce",
            recency_halflife=20.0,
        )
        rows = user_rows(split.train, cap=cap, negatives_per_positive=4, rng=rng)
        rate = poisson_sample_rate(batch_size=batch, num_rows=len(rows))
        train_items_private(
            model,
            rows,
            lr=lr,
            batch_size=batch,
            epochs=epochs,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            max_steps=epochs * steps_per_epoch(rate),
            seed=rnd,
        )
        hr.append(evaluate_branch(model, split, negatives).hr_sampled)
    return hr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="DP-SGD epochs per round")
    parser.add_argument("--batch", type=int, default=94, help="expected customers per step")
    parser.add_argument("--factors", type=int, default=16)
    parser.add_argument("--cap", type=int, default=50)
    parser.add_argument("--lr", type=float, default=10.0, help="SGD learning rate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=InsecureRNGWarning)
    pooled = leave_one_out(load_movielens_100k().interactions)
    negatives = load_or_sample_negatives(Path.home() / ".cache" / "fedcrm", pooled, seed=0)
    split = pooled.with_validation_in_train()
    customers = int((split.train.counts_per_user() > 0).sum())  # one DP row each
    rate = poisson_sample_rate(batch_size=args.batch, num_rows=customers)
    steps = args.epochs * steps_per_epoch(rate)
    sigma = plan_noise_multiplier(
        target_epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=rate,
        steps_per_round=steps,
        rounds=args.rounds,
    )
    print(
        f"pooled customer-level DP-SGD: {customers} customers, q = {rate:.4f}, "
        f"{steps * args.rounds} steps, C = 1, d = {args.factors}, cap {args.cap}, "
        f"SGD lr {args.lr}; "
        f"σ = {sigma:.3f} for ε = {args.epsilon} at δ = {args.delta} (RDP, unit customer)"
    )
    for label, noise in ((f"ε = {args.epsilon}", sigma), ("σ = 0.01", NEAR_NOISELESS)):
        started = time.perf_counter()
        hr = run(
            split,
            negatives,
            noise,
            rounds=args.rounds,
            epochs=args.epochs,
            batch=args.batch,
            factors=args.factors,
            cap=args.cap,
            lr=args.lr,
        )
        print(
            f"{label:>10}: test HR@10 by round {' '.join(f'{h:.3f}' for h in hr)} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    print("target (issue 6): HR@10 >= 0.65 at ε <= 8; popularity scores 0.419 on this split")


if __name__ == "__main__":
    main()
