"""Benchmark: churn ROC-AUC under branch-level (central) DP at a few ε, beside the non-private
federated run, in one process.

Usage:
    .venv/bin/python bench/churn_central_dp.py [--datasets telco mlc] [--epsilons 8 64 512]
        [--modes server-fixed server-adaptive] [--clip 0.5] [--repeats 2] [--rounds R]

How it is measured (printed with the results):

* Data, branches and splits are those of ``examples/telco_dirichlet.toml`` (10 branches,
  Dirichlet(0.5) label skew) and ``examples/mlc_by_state.toml`` (51 branches), written by the
  churn task's experiment and read back through the task as ``fedcrm simulate`` does, with the
  federated scaler (``bench/_churn_federation.py``).
* The federation runs **in process** (no Ray) through the product's server path:
  ``ValidatedStrategy(CentralDPStrategy(FedAvg))`` from ``fedcrm.strategies`` with Flower's
  ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping`` inside, configure_train /
  aggregate_train each round; branches train with the churn task's ``train`` (the ClientApp's
  code). The non-private row is the same loop with plain FedAvg (weighted by rows).
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
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _churn_federation import ChurnFederation, prepare, roc_auc
from fedcrm import wire as k
from fedcrm.privacy import CentralDPConfig, CentralDPMode
from fedcrm.simulation import in_process_identity
from fedcrm.strategies import CentralDPStrategy, ValidatedStrategy, build_strategy
from fedcrm.tasks import Arrays

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "telco": ROOT / "examples" / "telco_dirichlet.toml",
    "mlc": ROOT / "examples" / "mlc_by_state.toml",
}
DELTA = 1e-5


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def _arrays(record: ArrayRecord) -> Arrays:
    return {name: record[name].numpy() for name in record}


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


def federate(fed: ChurnFederation, central: CentralDPConfig | None, *, seed: int) -> Outcome:
    f, task = fed.cfg.federation, fed.task
    nodes = list(range(1, len(fed.data) + 1))
    inner = build_strategy(
        f.strategy,
        num_nodes=len(nodes),
        evaluate_metrics=partial(task.aggregate_evaluation, fed.settings),
        fraction_train=f.fraction_train,
    )
    dp: CentralDPStrategy | None = None
    core: Strategy = inner
    if central is not None:
        dp = CentralDPStrategy(inner, central, rounds=f.num_rounds)
        core = dp
    strategy = ValidatedStrategy(core)
    arrays = _record(fed.initial())
    best: tuple[float, int, Arrays] = (-np.inf, 0, _arrays(arrays))
    norms: list[float] = []
    node_states = {node: RecordDict() for node in nodes}
    start = time.perf_counter()
    for rnd in range(1, f.num_rounds + 1):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), _Grid(nodes)))  # type: ignore[arg-type]
        state = _arrays(arrays)
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            pid = node - 1
            ctx = fed.context(pid, rnd, seed=seed, state=node_states[node])
            out = task.train(fed.data[pid], state, fed.settings, ctx)
            if rnd == 1:
                norms.append(
                    math.sqrt(
                        sum(
                            float(((out.arrays[n].astype(np.float64) - state[n]) ** 2).sum())
                            for n in state
                        )
                    )
                )
            replies.append(_reply(_record(out.arrays), out.num_examples, node))
        new, _ = strategy.aggregate_train(rnd, replies)
        if new is None:
            raise SystemExit(f"round {rnd}: no aggregate")
        arrays = new
        current = _arrays(arrays)
        val = roc_auc(current, fed.val)
        if np.isfinite(val) and val > best[0]:
            best = (val, rnd, current)
    seconds = time.perf_counter() - start
    val_auc, best_round, best_arrays = best
    return Outcome(
        roc_auc(best_arrays, fed.test),
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
    print(f"# churn ROC-AUC under branch-level central DP ({platform.node()}, torch 1 thread)")
    print("# in-process ValidatedStrategy(CentralDPStrategy(FedAvg)), Flower DP wrappers; no Ray")
    overrides = {} if args.rounds is None else {"num_rounds": args.rounds}
    with (
        tempfile.TemporaryDirectory(prefix="fedcrm-central-dp-bench-") as tmp,
        in_process_identity(),  # messages built in process need one
    ):
        for name in args.datasets:
            fed = prepare(EXAMPLES[name], Path(tmp) / name, overrides)
            f, s = fed.cfg.federation, fed.settings
            sizes = [d.num_examples for d in fed.data]
            print(
                f"\n## {name}: {len(fed.data)} branches ({min(sizes)}-{max(sizes)} training "
                f"rows), {f.num_rounds} rounds x {s.local_epochs} local epoch(s), batch "
                f"{s.batch_size}, lr {s.lr}, {s.optimizer} momentum {s.momentum}, hidden "
                f"'{s.hidden_layers}'; branch-level, delta {DELTA:g}, RDP, q = 1"
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
