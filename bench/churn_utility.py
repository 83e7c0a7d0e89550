"""Federated vs centralised churn ROC-AUC on the real data, same split, one run each.

Runs the example experiments on Flower's simulation engine (the same code path as
``fedcrm simulate``) and prints our federated figure beside the centralised baselines of the
same run and the published Telco anchor (AdaBoost / XGBoost, ROC-AUC 0.84, Lalwani et al. 2022,
doi 10.1007/s00607-021-00908-y; see shared/ANCHORS.md §1a).

Usage:
    .venv/bin/python bench/churn_utility.py [--runs-dir runs/bench] [CONFIG.toml ...]
"""

import argparse
import json
import time
from pathlib import Path

from fedcrm.simulation import load_experiment, run_experiment

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [
    ROOT / "examples" / "telco_dirichlet.toml",
    ROOT / "examples" / "mlc_by_state.toml",
    ROOT / "examples" / "mlc_by_region.toml",
]
ANCHORS = {"telco": ("AdaBoost/XGBoost, centralised (Lalwani et al. 2022)", 0.84)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench")
    args = parser.parse_args()

    rows = []
    for path in args.configs:
        cfg = load_experiment(path)
        start = time.perf_counter()
        run_dir = run_experiment(cfg, runs_root=args.runs_dir)
        seconds = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text())
        fed = summary["federated"]["roc_auc"]
        central = {k: v["roc_auc"] for k, v in summary["centralised"].items()}
        best = max(central, key=lambda name: central[name])
        rows.append(
            (cfg.name, cfg.spec.dataset, fed, best, central[best], central, seconds, run_dir)
        )

    header = ("experiment", "federated", "best centralised", "gap", "fed/best", "wall s")
    print("{:18} {:>9} {:>32} {:>8} {:>8} {:>7}".format(*header))
    for name, dataset, fed, best, best_auc, central, seconds, _ in rows:
        print(
            f"{name:18} {fed:9.4f} {best + ' ' + format(best_auc, '.4f'):>32} "
            f"{fed - best_auc:+8.4f} {fed / best_auc:8.3f} {seconds:7.0f}"
        )
        others = ", ".join(f"{k} {v:.4f}" for k, v in central.items())
        print(f"{'':18} centralised on the same split: {others}")
        if dataset in ANCHORS:
            label, value = ANCHORS[dataset]
            print(f"{'':18} anchor: {label} ROC-AUC {value:.2f}; ours/anchor {fed / value:.3f}")
    for row in rows:
        print(f"run directory: {row[-1]}")


if __name__ == "__main__":
    main()
