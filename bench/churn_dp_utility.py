"""Benchmark: churn ROC-AUC under record-level DP at ε ∈ {1, 3, 8, ∞}, beside the centralised
non-private baseline on the same split.

Usage:
    .venv/bin/python bench/churn_dp_utility.py [--datasets telco mlc] [--epsilons 1 3 8 inf]

How it is measured (printed with the results):

* Data, branches and splits are those of ``examples/telco_dirichlet.toml`` (10 branches,
  Dirichlet(0.5) label skew) and ``examples/mlc_by_state.toml`` (51 branches, one per state),
  written by the churn task's experiment and read back through the task exactly as
  ``fedcrm simulate`` does, with the federated scaler (``bench/_churn_federation.py``).
* The federation runs **in process** (no Ray): a FedAvg loop (weighted by training rows) over
  the branch code that the ClientApp runs, ``fedcrm.client.dp_round.private_round`` with the
  churn task (plan σ once per federation and branch, cached in the node's state, budget check,
  DP-SGD with fast-linear clipping, persistent JSON accountant) and, at ε = ∞, the task's
  ``train``. The model of the round with the best pooled validation ROC-AUC is scored on the
  pooled test rows, as ``run_federation`` does.
* Privacy: record-level (= customer-level: one row per customer), ε per branch for all rounds,
  δ = 1/(10n) with n the branch's training rows, RDP accountant, add/remove-one neighbours. The
  ε column is the largest cumulative ε any branch reached. Not covered by the guarantee (as in
  the product): the federated scaler's moments and validation-based model selection.
* Centralised baselines (non-private) are trained on the pooled training rows of the same split:
  logistic regression and the same MLP (``pooled_torch``, early-stopped on validation).
* DP noise and Poisson sampling are seeded from the OS CSPRNG, as in the product (the branch
  code takes no noise seed), so every run of the DP rows differs slightly.
"""

import argparse
import math
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _churn_federation import ChurnFederation, prepare, roc_auc
from fedcrm.client import BranchPrivacy, private_round
from fedcrm.privacy import DPSGDConfig, InsecureRNGWarning
from fedcrm.tasks import Arrays
from fedcrm.tasks.churn.baselines import PooledData, logistic_regression, pooled_torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "telco": ROOT / "examples" / "telco_dirichlet.toml",
    "mlc": ROOT / "examples" / "mlc_by_state.toml",
}
TARGETS = {"telco": {3.0: 0.835, 1.0: 0.82}}


@dataclass
class Outcome:
    epsilon: float  # largest cumulative ε reached by a branch (inf: no DP)
    val_auc: float
    test_auc: float
    best_round: int
    seconds: float
    state: Arrays  # the round chosen on validation
    sigma_range: tuple[float, float]
    last_state: Arrays  # the last round's global model
    last_updates: list[Arrays]  # each branch's update in the last round


def federate(
    fed: ChurnFederation, epsilon: float, *, clip: float, seed: int = 0, tag: str = ""
) -> Outcome:
    """FedAvg over the branch code; record-level DP-SGD on every branch unless ε = ∞."""
    f, task = fed.cfg.federation, fed.task
    state = fed.initial()
    dp = None if math.isinf(epsilon) else DPSGDConfig(target_epsilon=epsilon, max_grad_norm=clip)
    node_states = [RecordDict() for _ in fed.branches]  # each branch's Context.state
    sigmas: set[float] = set()
    best: tuple[float, int, Arrays] = (-np.inf, 0, state)
    spent = 0.0
    updates: list[tuple[Arrays, int]] = []
    start = time.perf_counter()
    for rnd in range(1, f.num_rounds + 1):
        updates = []
        for pid, data in enumerate(fed.data):
            ctx = fed.context(pid, rnd, seed=seed, state=node_states[pid])
            if dp is None:
                update = task.train(data, state, fed.settings, ctx)
                updates.append((update.arrays, update.num_examples))
                continue
            where = BranchPrivacy(
                fed.workdir / f"privacy-{tag}-eps{epsilon:g}" / f"{pid:03d}", fed.names[pid]
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InsecureRNGWarning)
                res = private_round(
                    task,
                    data,
                    state,
                    fed.settings,
                    ctx,
                    dp=dp,
                    rounds=f.num_rounds,
                    where=where,
                    run_id="bench",
                )
            if res.update is None:
                raise SystemExit(f"unexpected refusal: {res.report.reason}")
            spent = max(spent, res.report.epsilon)
            sigmas.add(res.report.noise_multiplier)
            updates.append((res.update.arrays, res.update.num_examples))
        total = sum(n for _, n in updates)
        state = {
            key: sum(u[key].astype(np.float64) * (n / total) for u, n in updates).astype(np.float32)
            for key in updates[0][0]
        }
        val_auc = roc_auc(state, fed.val)
        if val_auc > best[0]:
            best = (val_auc, rnd, state)
    seconds = time.perf_counter() - start
    val_auc, best_round, best_state = best
    found = sorted(sigmas) or [0.0]
    return Outcome(
        spent if dp is not None else math.inf,
        val_auc,
        roc_auc(best_state, fed.test),
        best_round,
        seconds,
        best_state,
        (found[0], found[-1]),
        state,
        [u for u, _ in updates],
    )


def baselines(fed: ChurnFederation) -> dict[str, float]:
    f = fed.cfg.federation
    pooled = PooledData(fed.train.x, fed.train.y, fed.val.x, fed.val.y, fed.test.x, fed.test.y)
    settings = fed.settings.train_settings(epochs=fed.cfg.spec.baselines.torch_epochs)
    return {
        "logistic regression": logistic_regression(pooled, seed=f.seed).roc_auc,
        "same MLP (pooled_torch)": pooled_torch(
            pooled, settings, seed=f.seed, hidden=fed.settings.hidden
        ).roc_auc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["telco", "mlc"], choices=EXAMPLES)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--clip", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--rounds", type=int, help="override num-rounds of the example")
    parser.add_argument("--batch-size", type=int, help="override batch-size of the example")
    parser.add_argument("--lr", type=float, help="override lr of the example")
    parser.add_argument("--local-epochs", type=int, help="override local-epochs")
    parser.add_argument("--hidden-layers", help="override hidden-layers ('' = logistic)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("num_rounds", args.rounds),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            ("local_epochs", args.local_epochs),
            ("hidden_layers", args.hidden_layers),
        )
        if value is not None
    }
    print(f"# churn ROC-AUC under record-level DP ({platform.node()}, torch 1 thread)")
    print("# in-process FedAvg over fedcrm.client.private_round / the churn task (not Ray)")
    with tempfile.TemporaryDirectory(prefix="fedcrm-dp-bench-") as tmp:
        for name in args.datasets:
            fed = prepare(EXAMPLES[name], Path(tmp) / name, overrides)
            f, s = fed.cfg.federation, fed.settings
            sizes = [d.num_examples for d in fed.data]
            print(
                f"\n## {name}: {len(fed.data)} branches "
                f"({min(sizes)}-{max(sizes)} training rows), "
                f"{f.num_rounds} rounds x {s.local_epochs} local epoch(s), batch {s.batch_size}, "
                f"lr {s.lr}, {s.optimizer} momentum {s.momentum}, hidden '{s.hidden_layers}', "
                f"C = {args.clip}, delta = 1/(10n) per branch, RDP"
            )
            for label, auc in baselines(fed).items():
                print(f"centralised non-private {label:<28} test ROC-AUC {auc:.4f}")
            print(
                "| target ε | ε reached (max branch) | σ range | best round | val AUC "
                "| test AUC | target | s |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for eps in args.epsilons:
                out = federate(fed, eps, clip=args.clip, tag=name)
                target = TARGETS.get(name, {}).get(eps)
                verdict = (
                    ""
                    if target is None
                    else (f">= {target} {'met' if out.test_auc >= target else 'MISSED'}")
                )
                sig = (
                    "-" if math.isinf(eps) else f"{out.sigma_range[0]:.2f}-{out.sigma_range[1]:.2f}"
                )
                print(
                    f"| {eps:g} | {out.epsilon:.3f} | {sig} | {out.best_round} | "
                    f"{out.val_auc:.4f} | {out.test_auc:.4f} | {verdict} | {out.seconds:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
