"""``fedcrm recommend``: a branch's top-N items for one of its customers, from a finished run.

The branch scores with its own user factors (``branches/NNN/user_factors.npz``) and the run's
released item arrays (``items.npz``), excluding every item the customer already interacted
with; a history model also reads the customer's latest items, which the branch holds anyway.
"""

import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import numpy as np
import typer
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table

from fedcrm import wire as k
from fedcrm.exceptions import ConfigError, DataError, FedCrmError
from fedcrm.settings import from_mapping, keys

console = Console()
err = Console(stderr=True)


@dataclass(frozen=True)
class Recommendation:
    """A top-N list for one customer.

    Attributes:
        branch: Branch name.
        customer: Customer id.
        items: Item ids, best first.
        scores: Score of each item (model logit, or interaction count in the fallback).
        fallback: True when the customer has no history and the list is the branch's most
            popular items.
    """

    branch: str
    customer: str
    items: tuple[str, ...]
    scores: tuple[float, ...]
    fallback: bool


def branch_folder(run_dir: Path, name: str) -> Path:
    """The folder of the branch called ``name`` in a run (``branches/NNN/branch.json``).

    Raises:
        DataError: No branch of the run has that name.
    """
    known = []
    for info in sorted((run_dir / "branches").glob("*/branch.json")):
        found = json.loads(info.read_text(encoding="utf-8")).get("name")
        if found == name:
            return info.parent
        known.append(str(found))
    raise DataError(f"unknown branch {name!r}; known branches: {', '.join(known)}")


def recommend_for(run_dir: Path, branch: str, customer: str, n: int) -> Recommendation:
    """Return a customer's top-``n`` items from a finished recommendation run.

    A customer of the branch without history gets the branch's most popular items instead.

    Raises:
        ConfigError: ``n < 1`` or the run directory is not a finished recommendation run.
        DataError: The branch or the customer is unknown.
    """
    import torch

    from fedcrm.data.interactions import latest_items
    from fedcrm.models.rec_training import top_n
    from fedcrm.models.recommender import (
        MatrixFactorisation,
        context_length_of,
        load_local_state,
        load_shared_state,
    )
    from fedcrm.tasks.recommendation.data import RecSpec, experiment_data
    from fedcrm.tasks.recommendation.task import load_arrays

    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    config_path, items_path = run_dir / "config.toml", run_dir / k.REC_ITEMS_FILE
    if not (config_path.is_file() and items_path.is_file()):
        raise ConfigError(f"{run_dir} is not a finished recommendation run (no {k.REC_ITEMS_FILE})")
    raw: dict[str, Any] = tomllib.loads(config_path.read_text(encoding="utf-8"))
    spec = from_mapping(
        RecSpec, {key: v for key, v in raw.items() if key in keys(RecSpec)}, where=str(config_path)
    )
    data, _, _ = experiment_data(spec, int(raw.get("seed", 0)))
    found = data.branch(branch)
    users = data.branch_users(found.branch_id)
    local = {data.user_ids[u]: i for i, u in enumerate(users)}
    if customer not in local:
        raise DataError(f"unknown customer {customer!r} in branch {found.name}")
    log = data.interactions.restrict_users(users)
    seen = log.item[log.user == local[customer]]
    if len(seen) == 0:
        best, scores = top_n(log.counts_per_item().astype(np.float64), exclude=seen, n=n)
        fallback = True
    else:
        item_arrays = load_arrays(items_path)
        factors_path = branch_folder(run_dir, found.name) / k.REC_USER_FACTORS_FILE
        if not factors_path.is_file():
            raise ConfigError(f"branch {found.name} has no user factors in {run_dir}")
        factors = int(item_arrays["items.embedding.weight"].shape[1])
        history = context_length_of(item_arrays)
        model = MatrixFactorisation(len(users), data.n_items, factors, context=history)
        load_shared_state(model, item_arrays)
        load_local_state(model, load_arrays(factors_path))
        index = torch.as_tensor([local[customer]], dtype=torch.long)
        recent = torch.from_numpy(latest_items(log, history))[index] if history else None
        all_scores: NDArray[np.float64] = (
            model.score_all(index, recent).detach().numpy()[0].astype(np.float64)
        )
        best, scores = top_n(all_scores, exclude=seen, n=n)
        fallback = False
    return Recommendation(
        branch=found.name,
        customer=customer,
        items=tuple(data.item_ids[i] for i in best),
        scores=tuple(float(s) for s in scores),
        fallback=fallback,
    )


def recommend(
    run: Annotated[Path, typer.Option("--run", help="A finished recommendation run directory.")],
    branch: Annotated[str, typer.Option("--branch", help="Branch name, e.g. zip-9.")],
    customer: Annotated[str, typer.Option("--customer", help="The branch's customer id.")],
    n: Annotated[int, typer.Option("-n", help="List length.")] = 10,
) -> None:
    """Top-N items with scores for a branch's customer, excluding items already seen."""
    import torch

    torch.set_num_threads(1)
    try:
        rec = recommend_for(run, branch, customer, n)
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if rec.fallback:
        console.print(
            f"customer {rec.customer} has no history in {rec.branch}: "
            "showing the branch's most popular items (popularity fallback)"
        )
    kind = "interactions" if rec.fallback else "score"
    table = Table(title=f"top {len(rec.items)} for customer {rec.customer} ({rec.branch})")
    for col in ("rank", "item", kind):
        table.add_column(col, justify="left" if col == "item" else "right")
    for rank, (item, score) in enumerate(zip(rec.items, rec.scores, strict=True), start=1):
        table.add_row(str(rank), item, f"{score:.0f}" if rec.fallback else f"{score:.4f}")
    console.print(table)


def results_tables(summaries: Sequence[Mapping[str, Any]]) -> list[Table]:
    """Per run: HR@k / NDCG@k of the federated model beside the centralised baselines."""
    from fedcrm.tasks.recommendation.experiment import model_label

    tables = []
    for summary in summaries:
        fed = summary["federated"]
        at = int(fed["k"])
        dp = summary.get("privacy")
        name = f"federated {model_label(int(fed.get('history_length', 0)))}" + (
            f" (DP, ε ≤ {dp['epsilon_max']:.2f})" if dp else ""
        )
        table = Table(
            title=f"{summary['name']}: federated vs centralised, same split (test, k={at})"
        )
        for col in ("method", f"HR@{at}", f"NDCG@{at}", f"HR@{at} full", f"NDCG@{at} full"):
            table.add_column(col, justify="left" if col == "method" else "right")
        rows = {name: fed, **{f"centralised {n}": m for n, m in summary["centralised"].items()}}
        for label, m in rows.items():
            table.add_row(
                label,
                *(
                    f"{m[key]:.4f}"
                    for key in ("hr_sampled", "ndcg_sampled", "hr_full", "ndcg_full")
                ),
            )
        tables.append(table)
    return tables


COMMANDS: Final = (recommend,)
"""The commands this task adds to ``fedcrm``."""
