"""Benchmark: membership-inference leakage of the churn model, without DP and at ε = 1, 3, 8.

Usage:
    .venv/bin/python bench/membership_inference.py [--dataset mlc] [--local-epochs 10]

Attack: the loss-threshold attack of Yeom et al. 2018 ("Privacy Risk in Machine Learning",
arXiv:1709.01604): score every row by minus its log-loss under the released global model; a
row is guessed to be a training member when its loss is low. Members are the branches' training
rows, non-members their held-out (validation + test) rows, same distribution. Reported: the
attack's ROC-AUC (0.5 = no leakage) and its TPR at 1 % FPR (1 % = chance), on all rows and on
the rows of the attacker's best case, the smallest branches (their data is seen most often per
row and is the easiest to memorise).

Targets (``--target``): ``global`` attacks the released global model; ``update`` attacks what
the coordinator receives, each branch's last local model, on that branch's own rows (members:
its training rows, non-members: its held-out rows; scores of all branches pooled). Record-level
DP-SGD protects both: the update is the DP-SGD output, the global model a post-processing of it.

Models: trained exactly as in ``bench/churn_dp_utility.py`` (in-process FedAvg over the branch
code; record-level DP-SGD at ε per branch, δ = 1/(10n), RDP), with the example's settings, and the
global model of the round with the best validation AUC (as the product releases it), or with
``--last-round`` the last round's model. ``--local-epochs`` / ``--rounds`` raise local training
so that the non-private model overfits (a stress test of the attack, not the product setting).
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _churn_federation import prepare, roc_auc, torch_state
from churn_dp_utility import EXAMPLES, federate
from fedcrm.data.preprocess import encode
from fedcrm.models.churn import model_from_state, predict_proba
from fedcrm.tasks import Arrays

EPS = 1e-7


def losses(state: Arrays, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(predict_proba(model_from_state(torch_state(state)), x), EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def attack(member_loss: np.ndarray, other_loss: np.ndarray) -> tuple[float, float]:
    """Loss-threshold attack: ROC-AUC and TPR at 1 % FPR (members = positives)."""
    truth = np.r_[np.ones(len(member_loss)), np.zeros(len(other_loss))]
    score = -np.r_[member_loss, other_loss]
    auc = float(roc_auc_score(truth, score))
    fpr, tpr, _ = roc_curve(truth, score)
    return auc, float(np.interp(0.01, fpr, tpr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mlc", choices=["telco", "mlc"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 3.0, 1.0])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--local-epochs", type=int, help="override local-epochs (stress test)")
    parser.add_argument("--rounds", type=int, help="override num-rounds")
    parser.add_argument(
        "--last-round", action="store_true", help="attack the last round's model, not the best"
    )
    parser.add_argument("--target", choices=["global", "update"], default="global")
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides: dict[str, object] = {}
    if args.local_epochs is not None:
        overrides["local_epochs"] = args.local_epochs
    if args.rounds is not None:
        overrides["num_rounds"] = args.rounds
    with tempfile.TemporaryDirectory(prefix="fedcrm-mia-") as tmp:
        fed = prepare(EXAMPLES[args.dataset], Path(tmp) / args.dataset, overrides)
        f, settings = fed.cfg.federation, fed.settings
        splits = [d.split for d in fed.data]
        sizes = np.array([len(s.train) for s in splits])
        small = sizes <= np.quantile(sizes, 0.25)

        def rows(indices: list[int], part: str) -> tuple[np.ndarray, np.ndarray]:
            frames = [getattr(splits[i], part) for i in indices]
            xs, ys = zip(*(encode(fr, fed.schema, fed.scaler) for fr in frames), strict=True)
            return np.concatenate(xs), np.concatenate(ys)

        everyone = list(range(len(splits)))
        smallest = [i for i in everyone if small[i]]
        print(
            f"# loss-threshold membership inference (Yeom et al. 2018) on {args.dataset}: "
            f"{len(splits)} branches, {f.num_rounds} rounds x {settings.local_epochs} local "
            f"epoch(s), batch {settings.batch_size}, C = {args.clip}, delta = 1/(10n) per branch, "
            f"attacked: {args.target} "
            f"({'last round' if args.last_round else 'best validation round'})"
        )
        print(
            "# members = training rows, non-members = validation + test rows of the same branches"
        )
        print(
            "| model | ε reached | test AUC | attack AUC (all) | TPR@1%FPR (all) "
            f"| attack AUC ({len(smallest)} smallest branches) | TPR@1%FPR (smallest) |"
        )
        print("|---|---|---|---|---|---|---|")
        for eps in args.epsilons:
            out = federate(fed, eps, clip=args.clip, tag="mia")
            released = out.last_state if args.last_round else out.state
            cells = []
            for group in (everyone, smallest):
                member_losses, other_losses = [], []
                for i in group:
                    model_state = out.last_updates[i] if args.target == "update" else released
                    x_in, y_in = rows([i], "train")
                    x_va, y_va = rows([i], "val")
                    x_te, y_te = rows([i], "test")
                    member_losses.append(losses(model_state, x_in, y_in))
                    other_losses += [
                        losses(model_state, x_va, y_va),
                        losses(model_state, x_te, y_te),
                    ]
                auc, tpr = attack(np.concatenate(member_losses), np.concatenate(other_losses))
                cells += [f"{auc:.4f}", f"{tpr:.4f}"]
            label = "no DP" if math.isinf(eps) else f"DP ε={eps:g}"
            reached = "∞" if math.isinf(eps) else f"{out.epsilon:.3f}"
            test_auc = roc_auc(released, fed.test)
            print(f"| {label} | {reached} | {test_auc:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
