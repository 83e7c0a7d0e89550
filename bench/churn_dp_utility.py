"""Benchmark: churn ROC-AUC under record-level DP at ε ∈ {1, 3, 8, ∞}, beside the centralised
non-private baseline on the same split.

Usage:
    .venv/bin/python bench/churn_dp_utility.py [--datasets telco mlc] [--epsilons 1 3 8 inf]

How it is measured (printed with the results):

* Data, branches and splits are those of ``examples/telco_dirichlet.toml`` (10 branches,
  Dirichlet(0.5) label skew) and ``examples/mlc_by_state.toml`` (51 branches, one per state),
  written and read back exactly as ``fedcrm simulate`` does (``write_branches`` /
  ``pooled_splits``), with the federated scaler.
* The federation runs **in process** (no Ray): a FedAvg loop (weighted by training rows) over
  the branch code that the ClientApp runs, ``fedcrm.client.dp_round.private_round`` (plan σ once
  per federation and branch, budget check, DP-SGD with fast-linear clipping, persistent JSON
  accountant) and, at ε = ∞, ``fedcrm.client.branch.train``. The model of the round with the
  best pooled validation ROC-AUC is scored on the pooled test rows, as ``run_federation`` does.
* Privacy: record-level (= customer-level: one row per customer), ε per branch for all rounds,
  δ = 1/n with n the branch's training rows, RDP accountant, add/remove-one neighbours. The
  ε column is the largest cumulative ε any branch reached. Not covered by the guarantee (as in
  the product): the federated scaler's moments and validation-based model selection.
* Centralised baselines (non-private) are trained on the pooled training rows of the same split:
  logistic regression and the same MLP (``pooled_torch``, early-stopped on validation).
* DP noise uses fixed seeds here so that the figures are reproducible; the product seeds DP
  noise from the OS CSPRNG.
"""

import argparse
import math
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from fedcrm.client import branch, dp_round
from fedcrm.data.preprocess import Scaler, encode
from fedcrm.data.schema import ChurnSchema
from fedcrm.data.split import Split
from fedcrm.models.churn import TrainSettings, build_model, model_from_state, predict_proba
from fedcrm.privacy.dp_sgd import InsecureRNGWarning
from fedcrm.privacy.federated import FederatedDPConfig
from fedcrm.simulation.baselines import PooledData, logistic_regression, pooled_torch
from fedcrm.simulation.config import ExperimentConfig, load_experiment
from fedcrm.simulation.runner import pooled_splits, write_branches

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "telco": ROOT / "examples" / "telco_dirichlet.toml",
    "mlc": ROOT / "examples" / "mlc_by_state.toml",
}
TARGETS = {"telco": {3.0: 0.835, 1.0: 0.82}}


@dataclass
class Federation:
    """Everything the in-process federation needs, encoded once."""

    cfg: ExperimentConfig
    schema: ChurnSchema
    splits: list[Split]
    names: list[str]
    scaler: Scaler
    pooled: PooledData
    workdir: Path


def prepare(name: str, workdir: Path, overrides: dict[str, object]) -> Federation:
    cfg = load_experiment(EXAMPLES[name])
    if overrides:
        cfg = replace(cfg, federation=replace(cfg.federation, **overrides))
    run_dir = workdir / name
    run_dir.mkdir(parents=True)
    schema, infos = write_branches(cfg, run_dir)
    splits, scaler = pooled_splits(run_dir, schema, infos, cfg.federation.seed)

    def enc(frames: list[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
        return encode(pd.concat(frames, ignore_index=True), schema, scaler)

    x_tr, y_tr = enc([s.train for s in splits])
    x_va, y_va = enc([s.val for s in splits])
    x_te, y_te = enc([s.test for s in splits])
    pooled = PooledData(x_tr, y_tr, x_va, y_va, x_te, y_te)
    return Federation(cfg, schema, splits, [b.name for b in infos], scaler, pooled, run_dir)


def settings_of(fed: Federation) -> TrainSettings:
    f = fed.cfg.federation
    return TrainSettings(
        epochs=f.local_epochs,
        batch_size=f.batch_size,
        lr=f.lr,
        weight_decay=f.weight_decay,
        optimizer="adam" if f.optimizer == "adam" else "sgd",
        momentum=f.momentum,
    )


@dataclass
class Outcome:
    epsilon: float  # largest cumulative ε reached by a branch (inf: no DP)
    val_auc: float
    test_auc: float
    best_round: int
    seconds: float
    state: dict[str, torch.Tensor]  # the round chosen on validation
    sigma_range: tuple[float, float]
    last_state: dict[str, torch.Tensor]  # the last round's global model
    last_updates: list[dict[str, torch.Tensor]]  # each branch's update in the last round


def federate(
    fed: Federation, epsilon: float, *, clip: float, seed: int = 0, tag: str = ""
) -> Outcome:
    """FedAvg over the branch code; record-level DP-SGD on every branch unless ε = ∞."""
    f = fed.cfg.federation
    settings = settings_of(fed)
    model = build_model(fed.schema.input_dim, seed=f.seed, hidden=f.hidden)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dp = (
        None
        if math.isinf(epsilon)
        else FederatedDPConfig(target_epsilon=epsilon, max_grad_norm=clip)
    )
    plans = []
    if dp is not None:
        for split in fed.splits:
            plans.append(
                dp_round.plan_branch(
                    dp, num_rows=len(split.train), settings=settings, rounds=f.num_rounds
                )
            )
    best = (-np.inf, 0, state)
    spent = 0.0
    start = time.perf_counter()
    for rnd in range(1, f.num_rounds + 1):
        updates: list[tuple[dict[str, torch.Tensor], int]] = []
        for pid, split in enumerate(fed.splits):
            round_seed = seed + 1000 * rnd + pid
            if dp is None:
                out = branch.train(split, fed.schema, fed.scaler, state, settings, seed=round_seed)
                updates.append((out.state_dict, out.num_examples))
                continue
            config, plan = plans[pid]
            where = dp_round.BranchDPContext(
                fed.workdir / f"privacy-{tag}-eps{epsilon:g}" / f"{pid:03d}", fed.names[pid]
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InsecureRNGWarning)
                res = dp_round.private_round(
                    split,
                    fed.schema,
                    fed.scaler,
                    state,
                    settings,
                    dp=dp,
                    config=config,
                    plan=plan,
                    where=where,
                    seed=round_seed,
                )
            if not res.report.admitted or res.state_dict is None:
                raise SystemExit(f"unexpected refusal: {res.report.reason}")
            spent = max(spent, res.report.epsilon)
            updates.append((res.state_dict, res.num_examples))
        total = sum(n for _, n in updates)
        state = {key: sum(s[key] * (n / total) for s, n in updates) for key in updates[0][0]}  # type: ignore[misc]
        val_auc = float(
            roc_auc_score(
                fed.pooled.y_val, predict_proba(model_from_state(state), fed.pooled.x_val)
            )
        )
        if val_auc > best[0]:
            best = (val_auc, rnd, state)
    seconds = time.perf_counter() - start
    val_auc, best_round, best_state = best
    test_auc = float(
        roc_auc_score(
            fed.pooled.y_test, predict_proba(model_from_state(best_state), fed.pooled.x_test)
        )
    )
    sigmas = [p.noise_multiplier for _, p in plans] or [0.0]
    return Outcome(
        spent if dp is not None else math.inf,
        val_auc,
        test_auc,
        best_round,
        seconds,
        best_state,
        (min(sigmas), max(sigmas)),
        state,
        [u for u, _ in updates],
    )


def baselines(fed: Federation) -> dict[str, float]:
    f = fed.cfg.federation
    settings = replace(settings_of(fed), epochs=fed.cfg.baselines.torch_epochs)
    return {
        "logistic regression": logistic_regression(fed.pooled, seed=f.seed).roc_auc,
        "same MLP (pooled_torch)": pooled_torch(
            fed.pooled, settings, seed=f.seed, hidden=f.hidden
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
    overrides = {
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
    print("# in-process FedAvg over fedcrm.client.dp_round / branch code (not Ray); see docstring")
    with tempfile.TemporaryDirectory(prefix="fedcrm-dp-bench-") as tmp:
        for name in args.datasets:
            fed = prepare(name, Path(tmp), overrides)
            f = fed.cfg.federation
            sizes = [len(s.train) for s in fed.splits]
            print(
                f"\n## {name}: {len(fed.splits)} branches "
                f"({min(sizes)}-{max(sizes)} training rows), "
                f"{f.num_rounds} rounds x {f.local_epochs} local epoch(s), batch {f.batch_size}, "
                f"lr {f.lr}, {f.optimizer} momentum {f.momentum}, hidden '{f.hidden_layers}', "
                f"C = {args.clip}, delta = 1/n per branch, RDP"
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
