"""Benchmark: churn ROC-AUC under branch-level (central) DP at a few ε, beside the non-private
federated run, in one process.

Usage:
    .venv/bin/python bench/churn_central_dp.py [--datasets telco mlc] [--epsilons 8 64 512]
        [--modes server-fixed server-adaptive] [--clip 0.5] [--repeats 2] [--rounds R]

How it is measured (printed with the results):

* Data, branches and splits are those of ``examples/telco_dirichlet.toml`` (10 branches,
  Dirichlet(0.5) label skew) and ``examples/mlc_by_state.toml`` (51 branches), written and read
  back as ``fedcrm simulate`` does, with the federated scaler.
* The federation runs **in process** (no Ray) through the product's server path:
  ``ValidatedStrategy(CentralDPStrategy(FedAvg))`` from ``fedcrm.strategies`` with Flower's
  ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`` inside, configure_train /
  aggregate_train each round; branches train with ``fedcrm.client.branch.train`` (the
  ClientApp's code). The non-private row is the same loop with plain FedAvg (weighted by rows).
* The model of the round with the best pooled validation ROC-AUC is scored on the pooled test
  rows, as ``run_federation`` does (validation-based selection is not covered by the DP
  guarantee, as in the product).
* Privacy: branch-level (unit = one branch's whole data), add/remove one branch, Gaussian
  mechanism on the sum of clipped updates, no sampling amplification (q = 1), δ = 1e-5, RDP
  accountant (Opacus); ε is planned for all rounds of the run. Noise is drawn from NumPy's
  generator reseeded from the OS CSPRNG, so every repeat differs.
"""

import argparse
import logging
import math
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import roc_auc_score

from fedcrm import constants as k
from fedcrm.client import branch
from fedcrm.data.preprocess import Scaler, encode
from fedcrm.data.schema import ChurnSchema
from fedcrm.data.split import Split
from fedcrm.models.churn import TrainSettings, build_model, model_from_state, predict_proba
from fedcrm.privacy.branch_accounting import CentralDPConfig, CentralDPMode
from fedcrm.simulation.config import ExperimentConfig, load_experiment
from fedcrm.strategies.central_dp import CentralDPStrategy
from fedcrm.strategies.factory import build_strategy
from fedcrm.strategies.validated import ValidatedStrategy

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "telco": ROOT / "examples" / "telco_dirichlet.toml",
    "mlc": ROOT / "examples" / "mlc_by_state.toml",
}
DELTA = 1e-5


@dataclass
class Federation:
    cfg: ExperimentConfig
    schema: ChurnSchema
    splits: list[Split]
    scaler: Scaler
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def prepare(name: str, workdir: Path, rounds: int | None) -> Federation:
    from fedcrm.simulation.runner import pooled_splits, write_branches

    cfg = load_experiment(EXAMPLES[name])
    if rounds is not None:
        cfg = replace(cfg, federation=replace(cfg.federation, num_rounds=rounds))
    run_dir = workdir / name
    run_dir.mkdir(parents=True)
    schema, infos = write_branches(cfg, run_dir)
    splits, scaler = pooled_splits(run_dir, schema, infos, cfg.federation.seed)

    def enc(frames: list[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
        return encode(pd.concat(frames, ignore_index=True), schema, scaler)

    x_val, y_val = enc([s.val for s in splits])
    x_test, y_test = enc([s.test for s in splits])
    return Federation(cfg, schema, splits, scaler, x_val, y_val, x_test, y_test)


def _reply(arrays: ArrayRecord, n: int, node: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict({k.ARRAYS: arrays, k.METRICS: MetricRecord({k.KEY_NUM_EXAMPLES: n})})
    reply: Message = Message(metadata=metadata, content=content)  # type: ignore[call-overload]
    return reply


@dataclass
class Outcome:
    test_auc: float
    val_auc: float
    best_round: int
    epsilon: float
    final_clip: float
    seconds: float
    median_update_norm: float


def federate(fed: Federation, central: CentralDPConfig | None, *, seed: int) -> Outcome:
    f = fed.cfg.federation
    settings = TrainSettings(
        epochs=f.local_epochs,
        batch_size=f.batch_size,
        lr=f.lr,
        weight_decay=f.weight_decay,
        optimizer="adam" if f.optimizer == "adam" else "sgd",
        momentum=f.momentum,
    )
    nodes = list(range(1, len(fed.splits) + 1))
    inner = build_strategy(f.strategy, num_nodes=len(nodes), fraction_train=f.fraction_train)
    dp: CentralDPStrategy | None = None
    core: Strategy = inner
    if central is not None:
        dp = CentralDPStrategy(inner, central, rounds=f.num_rounds)
        core = dp
    strategy = ValidatedStrategy(core)
    model = build_model(fed.schema.input_dim, seed=f.seed, hidden=f.hidden)
    arrays = ArrayRecord(model.state_dict())
    best = (-np.inf, 0, arrays)
    norms: list[float] = []
    start = time.perf_counter()
    for rnd in range(1, f.num_rounds + 1):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), _Grid(nodes)))  # type: ignore[arg-type]
        state = arrays.to_torch_state_dict()
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            split = fed.splits[node - 1]
            out = branch.train(
                split, fed.schema, fed.scaler, state, settings, seed=seed + 1000 * rnd + node
            )
            if rnd == 1:
                norms.append(
                    math.sqrt(
                        sum(float(((out.state_dict[n] - state[n]) ** 2).sum()) for n in state)
                    )
                )
            replies.append(_reply(ArrayRecord(out.state_dict), out.num_examples, node))
        new, _ = strategy.aggregate_train(rnd, replies)
        if new is None:
            raise SystemExit(f"round {rnd}: no aggregate")
        arrays = new
        val = float(
            roc_auc_score(
                fed.y_val, predict_proba(model_from_state(arrays.to_torch_state_dict()), fed.x_val)
            )
        )
        if np.isfinite(val) and val > best[0]:
            best = (val, rnd, arrays)
    seconds = time.perf_counter() - start
    val_auc, best_round, best_arrays = best
    test_auc = float(
        roc_auc_score(
            fed.y_test,
            predict_proba(model_from_state(best_arrays.to_torch_state_dict()), fed.x_test),
        )
    )
    return Outcome(
        test_auc,
        float(val_auc),
        best_round,
        dp.accountant.epsilon() if dp is not None else math.inf,
        dp.clipping_norm if dp is not None else math.nan,
        seconds,
        statistics.median(norms),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["telco"], choices=EXAMPLES)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[8.0, 64.0, 512.0])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["server-fixed", "server-adaptive"],
        choices=["server-fixed", "server-adaptive"],
    )
    parser.add_argument("--clip", type=float, default=0.5, help="(initial) clipping norm C")
    parser.add_argument("--repeats", type=int, default=2, help="noise draws per setting")
    parser.add_argument("--rounds", type=int, help="override num-rounds of the example")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per clip and noise otherwise
    for name in ("_run_id", "_task_id", "_node_id"):  # messages built in process need one
        setattr(TaskIdentity, name, 1)
    print(f"# churn ROC-AUC under branch-level central DP ({platform.node()}, torch 1 thread)")
    print("# in-process ValidatedStrategy(CentralDPStrategy(FedAvg)), Flower DP wrappers; no Ray")
    with tempfile.TemporaryDirectory(prefix="fedcrm-central-dp-bench-") as tmp:
        for name in args.datasets:
            fed = prepare(name, Path(tmp), args.rounds)
            f = fed.cfg.federation
            sizes = [len(s.train) for s in fed.splits]
            print(
                f"\n## {name}: {len(fed.splits)} branches ({min(sizes)}-{max(sizes)} training "
                f"rows), {f.num_rounds} rounds x {f.local_epochs} local epoch(s), batch "
                f"{f.batch_size}, lr {f.lr}, {f.optimizer} momentum {f.momentum}, hidden "
                f"'{f.hidden_layers}'; branch-level, delta {DELTA:g}, RDP, q = 1"
            )
            print("| mode | ε (branch) | z_eff | C (final) | best round | val AUC | test AUC | s |")
            print("|---|---|---|---|---|---|---|---|")
            base = federate(fed, None, seed=0)
            print(
                f"| non-private FedAvg | ∞ | - | - | {base.best_round} | {base.val_auc:.4f} | "
                f"{base.test_auc:.4f} | {base.seconds:.0f} |",
                flush=True,
            )
            print(f"# median branch update norm in round 1: {base.median_update_norm:.3f}")
            for mode in args.modes:
                for eps in args.epsilons:
                    cfg = CentralDPConfig(
                        mode=CentralDPMode(mode),
                        target_epsilon=eps,
                        delta=DELTA,
                        clipping_norm=args.clip if mode == "server-fixed" else 0.1,
                    )
                    z = cfg.plan(f.num_rounds).effective_noise_multiplier
                    aucs = []
                    for rep in range(args.repeats):
                        out = federate(fed, cfg, seed=rep)
                        aucs.append(out.test_auc)
                        print(
                            f"| {mode} | {out.epsilon:.3f} (target {eps:g}) | {z:.3f} | "
                            f"{out.final_clip:.3f} | {out.best_round} | {out.val_auc:.4f} | "
                            f"{out.test_auc:.4f} | {out.seconds:.0f} |",
                            flush=True,
                        )
                    print(
                        f"# {mode} ε {eps:g}: mean test AUC {statistics.mean(aucs):.4f} over "
                        f"{len(aucs)} noise draws"
                    )


if __name__ == "__main__":
    main()
