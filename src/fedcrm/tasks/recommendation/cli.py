"""``fedcrm`` recommendation commands: ``simulate-rec`` and ``recommend``.

A typer sub-app. Mount its commands at the top level of the main CLI (``fedcrm recommend``,
``fedcrm simulate-rec``) with ``app.registered_commands.extend(rec_app.registered_commands)``,
or as a group with ``app.add_typer(rec_app, name="rec")``.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcrm import constants as k
from fedcrm.exceptions import ConfigError, DataError, FedCrmError

logger = logging.getLogger(__name__)

rec_app = typer.Typer(
    help="Federated recommendations: run the simulation, recommend for a branch's customer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
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


def recommend_for(run_dir: Path, branch: str, customer: str, n: int) -> Recommendation:
    """Return a customer's top-``n`` items from a finished recommendation run.

    The branch scores with its own user factors (``branches/<branch>/user_factors.npz``) and the
    run's final item arrays (``items.npz``), excluding every item the customer already
    interacted with; a history model also reads the customer's latest items on the branch. A
    customer of the branch without history gets the branch's most popular items instead.

    Raises:
        ConfigError: ``n < 1`` or the run directory is incomplete.
        DataError: The branch or the customer is unknown.
    """
    import torch

    from fedcrm.client.rec_app import load_user_factors, user_factors_path
    from fedcrm.data.interactions import latest_items
    from fedcrm.models.rec_training import top_n
    from fedcrm.models.recommender import (
        MatrixFactorisation,
        context_length_of,
        load_local_state,
        load_shared_state,
    )
    from fedcrm.simulation.rec_config import load_rec_experiment
    from fedcrm.simulation.rec_runner import load_rec_data

    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    config_path = run_dir / "config.toml"
    items_path = run_dir / k.REC_ITEMS_FILE
    if not (config_path.is_file() and items_path.is_file()):
        raise ConfigError(f"{run_dir} is not a finished recommendation run (no {k.REC_ITEMS_FILE})")
    cfg = load_rec_experiment(config_path)
    data = load_rec_data(cfg)
    found = data.branch(branch)
    users = data.branch_users(found.branch_id)
    local = {data.user_ids[u]: i for i, u in enumerate(users)}
    if customer not in local:
        raise DataError(f"unknown customer {customer!r} in branch {found.name}")
    log = data.interactions.restrict_users(users)
    seen = log.item[log.user == local[customer]]
    if len(seen) == 0:
        counts = log.counts_per_item().astype(np.float64)
        best, scores = top_n(counts, exclude=seen, n=n)
        fallback = True
    else:
        with np.load(items_path, allow_pickle=False) as stored:
            item_arrays = {key: stored[key] for key in stored.files}
        factors_path = user_factors_path(run_dir / "branches", found.name)
        if not factors_path.is_file():
            raise ConfigError(f"branch {found.name} has no user factors in {run_dir}")
        user_arrays = load_user_factors(factors_path)
        factors = int(item_arrays["items.embedding.weight"].shape[1])
        history = context_length_of(item_arrays)
        model = MatrixFactorisation(len(users), data.n_items, factors, context=history)
        load_shared_state(model, item_arrays)
        load_local_state(model, user_arrays)
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


@rec_app.command("recommend")
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


def run_rec_with_progress(config: Path, runs_dir: Path) -> Path:
    """Run a recommendation experiment with a progress bar; return its run directory.

    Raises:
        FedCrmError: The configuration is invalid or the run failed.
    """
    from fedcrm.server.rec_federation import RecRoundRecord
    from fedcrm.simulation.rec_config import load_rec_experiment
    from fedcrm.simulation.rec_runner import run_rec_experiment

    cfg = load_rec_experiment(config)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("HR@10 {task.fields[hr]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{cfg.name}: starting", total=cfg.federation.num_rounds, hr="–")

        def on_round(record: RecRoundRecord) -> None:
            hr = record.test.get(f"hr{cfg.federation.top_k}-sampled", float("nan"))
            progress.update(
                task, advance=1, hr=f"{hr:.4f}", description=f"{cfg.name}: round {record.round}"
            )

        def on_phase(message: str) -> None:
            progress.console.print(f"[dim]{cfg.name}: {message}[/dim]")

        return run_rec_experiment(cfg, runs_dir, on_round=on_round, on_phase=on_phase)


def rec_results_table(run_dir: Path) -> Table:
    """HR@10 / NDCG@10 of the federated model beside the run's centralised baselines."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    fed = summary["federated"]
    dp = summary.get("privacy")
    from fedcrm.simulation.rec_runner import model_label

    label = model_label(int(fed.get("history_length", 0)))
    name = f"federated {label}" + (f" (DP, ε ≤ {dp['epsilon_max']:.2f})" if dp else "")
    table = Table(title=f"{summary['name']}: federated vs centralised, same split (test, k=10)")
    for col in ("method", "HR@10", "NDCG@10", "HR@10 full", "NDCG@10 full"):
        table.add_column(col, justify="left" if col == "method" else "right")
    rows = {name: fed, **{f"centralised {n}": m for n, m in summary["centralised"].items()}}
    for label, m in rows.items():
        table.add_row(
            label,
            *(
                f"{m[key]:.4f}"
                for key in ("hr10_sampled", "ndcg10_sampled", "hr10_full", "ndcg10_full")
            ),
        )
    return table


@rec_app.command("simulate-rec")
def simulate_rec(
    config: Annotated[Path, typer.Argument(help="Recommendation experiment TOML.")],
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path(
        "runs"
    ),
) -> None:
    """Run federated recommendations on Flower's simulation engine and write a run directory."""
    try:
        run_dir = run_rec_with_progress(config, runs_dir)
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(rec_results_table(run_dir))
    console.print(f"run directory: {run_dir}")
