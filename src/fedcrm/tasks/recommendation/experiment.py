"""A simulated recommendation experiment: ZIP-zone branches, centralised baselines, anchors.

The researcher's process holds the pooled interactions only to train the centralised baselines
on the same split; the federated model is trained by the branches' ClientApps, each over its
own share of the data set. Nothing of MovieLens is written to the run directory.
"""

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from fedcrm.data.pseudonymise import load_or_create_key
from fedcrm.exceptions import ConfigError
from fedcrm.models.rec_training import RankingMetrics
from fedcrm.tasks.base import (
    FinishedRun,
    SimulatedBranch,
    SimulatedFederation,
    TaskExperiment,
    TaskOutcome,
)
from fedcrm.tasks.recommendation.baselines import centralised_baselines
from fedcrm.tasks.recommendation.data import (
    RecBranch,
    RecSimulation,
    RecSpec,
    experiment_data,
    simulated_branch,
)
from fedcrm.tasks.recommendation.metrics import (
    PUBLISHED_ANCHORS,
    comparison_table,
    from_pooled,
    pooled_keys,
)
from fedcrm.tasks.recommendation.settings import RecSettings

KEY_FILE = "hmac.key"
"""A simulated branch's HMAC key (0600), in its folder."""


def model_label(history_length: int) -> str:
    """Name the recommender in tables: ``MF``, or ``MF+history`` with a history context."""
    return "MF+history" if history_length else "MF"


def metrics_summary(m: RankingMetrics) -> dict[str, float]:
    """Means at the run's cut-off (``hr_sampled`` ... ``users``) and the cut-off ``k``."""
    return {
        "k": float(m.k),
        "hr_sampled": m.hr_sampled,
        "ndcg_sampled": m.ndcg_sampled,
        "hr_full": m.hr_full,
        "ndcg_full": m.ndcg_full,
        "users": float(m.count),
    }


def _branch_key(folder: Path) -> bytes:
    return load_or_create_key(folder / KEY_FILE)


def _handle(federation: SimulatedFederation) -> RecSimulation:
    if not isinstance(federation.handle, RecSimulation):
        raise ConfigError("not a simulated recommendation federation")
    return federation.handle


class RecExperiment(TaskExperiment[RecSpec, RecSettings]):
    """MovieLens 100K by ZIP zone (11 branches) or synthetic interactions."""

    spec_type = RecSpec

    def prepare(
        self, spec: RecSpec, settings: RecSettings, run_dir: Path, *, seed: int
    ) -> SimulatedFederation:
        """One folder per branch (``branch.json`` and its HMAC key); the data stays in memory."""
        data, _, _ = experiment_data(spec, seed)
        branches = []
        for pid, found in enumerate(data.branches):
            users = data.branch_users(found.branch_id)
            folder = run_dir / "branches" / f"{pid:03d}"
            _branch_key(folder)
            info = {
                "partition_id": pid,
                "name": found.name,
                "region": found.region,
                "customers": len(users),
                "interactions": int(np.isin(data.interactions.user, users).sum()),
            }
            (folder / "branch.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
            branches.append(SimulatedBranch(pid, found.name, folder, info))
        return SimulatedFederation(
            branches,
            handle=RecSimulation(spec, seed),
            settings=replace(settings, num_items=data.n_items),
        )

    def customers(
        self,
        federation: SimulatedFederation,
        branch: SimulatedBranch,
        settings: RecSettings,
        *,
        seed: int,
    ) -> list[str]:
        """The branch's customers (pseudonyms), in local index order."""
        return list(self._branch(federation, branch).customers)

    def subjects(
        self,
        federation: SimulatedFederation,
        branch: SimulatedBranch,
        settings: RecSettings,
        *,
        seed: int,
    ) -> dict[str, list[str]]:
        """Customers trained on and evaluated."""
        return self._branch(federation, branch).subjects()

    def _branch(self, federation: SimulatedFederation, branch: SimulatedBranch) -> RecBranch:
        return simulated_branch(
            _handle(federation), branch.partition_id, _branch_key(branch.folder)
        )

    def finish(self, run: FinishedRun[RecSpec, RecSettings]) -> TaskOutcome:
        """The released round's pooled metrics beside centralised baselines on the same split."""
        settings, at = run.settings, run.settings.top_k
        handle = _handle(run.federation)
        data, split, negatives = experiment_data(handle.spec, handle.seed)
        if run.kept is not None:  # the baselines process only customers with valid consent
            keep = np.zeros(data.n_users, dtype=bool)
            for sim in run.federation.branches:
                kept = run.kept[sim.partition_id]
                customers = self._branch(run.federation, sim).customers
                keep[data.branch_users(sim.name)] = [c in kept for c in customers]
            split, negatives = split.keep_users(keep), negatives.keep_users(keep)
        released = from_pooled(run.rounds[run.best_round - 1], at)
        best_val = max(run.rounds, key=lambda r: r.get(f"val-hr{at}-sampled", -1.0))
        best_val_round = run.rounds.index(best_val) + 1
        results = {
            f"federated {model_label(settings.history_length)} (round {run.best_round})": released
        }
        centralised: dict[str, dict[str, float]] = {}
        if handle.spec.baselines.enabled:
            base = centralised_baselines(
                split.with_validation_in_train() if settings.train_on_validation else split,
                negatives,
                seed=run.seed,
                mf=settings.mf(epochs=handle.spec.baselines.mf_epochs),
                knn_neighbours=handle.spec.baselines.knn_neighbours or None,
                k=at,
                select_on_validation=not settings.train_on_validation,
            )
            centralised = {name: metrics_summary(m) for name, m in base.items()}
            results.update({f"centralised {name}": m for name, m in base.items()})
        table = comparison_table(
            results, data="ML-100K" if handle.spec.dataset != "synthetic" else "synth"
        )
        keys = pooled_keys(at)
        per_round = [
            f"| {i} | {r[keys['hr_sampled']]:.4f} | {r[keys['ndcg_sampled']]:.4f} "
            f"| {r[keys['hr_full']]:.4f} | {r[keys['ndcg_full']]:.4f} "
            f"| {r.get('val-' + keys['hr_sampled'], float('nan')):.4f} |"
            for i, r in enumerate(run.rounds, start=1)
        ]
        history = settings.history_length
        stayed = (
            f"and context factors; user factors and each customer's {history} latest items never "
            "left their branch."
            if history
            else "factors; user factors never left their branch."
        )
        report = [
            f"{len(run.federation.branches)} branches, {len(run.rounds)} rounds over the item "
            + stayed,
            f"Leave-one-out by time; HR@{at} / NDCG@{at} against 99 fixed sampled negatives and "
            "the full catalogue. Published anchors are on MovieLens-1M, a different and larger "
            "data set.",
            "",
            "```",
            table,
            "```",
            "",
            f"| round | HR@{at} | NDCG@{at} | HR@{at} full | NDCG@{at} full | val HR@{at} |",
            "|---|---|---|---|---|---|",
            *per_round,
            "",
        ]
        return TaskOutcome(
            summary={
                "dataset": handle.spec.dataset,
                "split": {
                    "train_interactions": len(split.train),
                    "evaluated_users": len(split.eval_users),
                    "items": data.n_items,
                    "negatives_seed": handle.seed,
                },
                "federated": {
                    **metrics_summary(released),
                    "model": "items.npz (item tower of the released round); user factors in "
                    "each branch folder",
                    "best_val_round": {
                        "round": best_val_round,
                        **metrics_summary(from_pooled(best_val, at)),
                        "note": "metrics only"
                        + (
                            " (validation items were trained on: not a held-out choice)"
                            if settings.train_on_validation
                            else ""
                        ),
                    },
                    "train_on_validation": settings.train_on_validation,
                    "history_length": history,
                },
                "centralised": centralised,
                "anchors": [{**asdict(a), "note": "published, ML-1M"} for a in PUBLISHED_ANCHORS],
            },
            report=report,
            plot=[float(r.get(keys["hr_sampled"], float("nan"))) for r in run.rounds],
            centralised={name: m["hr_sampled"] for name, m in centralised.items()},
        )
