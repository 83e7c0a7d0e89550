"""The ``fedcrm`` command.

Typer, because Flower's own CLI is built on it (no extra dependency), commands are plain typed
functions, and it renders ``--help`` and errors with rich.
"""

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcrm.compliance.audit.cli import app as audit_app
from fedcrm.compliance.cli import app as compliance_app
from fedcrm.exceptions import FedCrmError
from fedcrm.privacy.keys import app as keys_app
from fedcrm.tasks import TASKS, get_task

app = typer.Typer(
    name="fedcrm",
    help="Privacy-preserving federated learning for CRM data (churn and recommendations).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check and generate branch CRM exports.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(audit_app, name="audit", help="Export and verify the tamper-evident audit log.")
app.add_typer(keys_app, name="keys", help="CKKS key authority: create and rotate HE keys.")
app.add_typer(
    compliance_app,
    name="compliance",
    help="Compliance officer's service: consent, ledger, audit log, Art. 30 records.",
)
ledger_app = typer.Typer(help="Read the privacy ledger.", no_args_is_help=True)
app.add_typer(
    ledger_app, name="ledger", help="Privacy ledger: cumulative epsilon per branch, every round."
)

for _task in TASKS.values():  # the tasks' own commands (e.g. ``recommend``)
    for _command in _task.commands():
        app.command()(_command)

console = Console()
err = Console(stderr=True, soft_wrap=True)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
        force=True,
    )


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    _setup_logging(verbose)


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="The branch's CSV (UTF-8) or Parquet export.")],
    schema: Annotated[
        str, typer.Option(help="Declared schema to check against: telco or mlc.")
    ] = "mlc",
) -> None:
    """Validate a branch export against a declared churn schema; list every problem at once."""
    from fedcrm.data.check import read_export, validate_frame
    from fedcrm.data.schema import get_schema
    from fedcrm.exceptions import SchemaViolation

    try:
        declared = get_schema(schema)
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0]), param_hint="--schema") from exc
    try:
        problems = validate_frame(read_export(path), declared)
    except SchemaViolation as exc:
        problems = exc.problems
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if problems:
        err.print(f"[red]{path}: {len(problems)} problem(s) against schema {schema!r}:[/red]")
        for p in problems:
            err.print(f"  - {p}")
        raise typer.Exit(1)
    console.print(f"[green]{path}: valid {schema!r} export[/green]")


@data_app.command("pseudonymise")
def data_pseudonymise(
    source: Annotated[Path, typer.Argument(help="A branch CSV with raw customer ids.")],
    out: Annotated[Path, typer.Argument(help="The CSV to write, ids replaced by pseudonyms.")],
    key_path: Annotated[
        Path, typer.Option(help="The branch's HMAC key (the one its ClientApp uses, 0600).")
    ],
    column: Annotated[str, typer.Option(help="The customer id column.")] = "customer_id",
) -> None:
    """Replace raw customer ids by the branch's keyed pseudonyms (e.g. in a consent CSV).

    The same key gives the same pseudonyms as the branch's training rows, so consent records,
    round manifests and erasure requests match the data they govern.
    """
    import pandas as pd

    from fedcrm.data.pseudonymise import load_or_create_key, pseudonymise_series

    if not key_path.is_file():
        err.print(f"[red]error:[/red] no key at {key_path}: use the key your ClientApp uses")
        raise typer.Exit(2)
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        if column not in frame.columns:
            raise ValueError(f"no column {column!r} in {source}")
        frame[column] = pseudonymise_series(frame[column], load_or_create_key(key_path))
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    frame.to_csv(out, index=False)
    console.print(f"wrote {len(frame)} row(s) with pseudonymous {column!r} to {out}")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="CSV file to write.")],
    schema: Annotated[str, typer.Option(help="telco or mlc.")] = "mlc",
    rows: Annotated[int, typer.Option(min=1, help="Number of synthetic customers.")] = 200,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic export with a declared schema (a template for branch exports)."""
    from fedcrm.data.schema import get_schema
    from fedcrm.data.synthetic import synthetic_export

    synthetic_export(get_schema(schema), rows, seed=seed).to_csv(out, index=False)
    console.print(f"wrote {rows} synthetic {schema!r} customers to {out}")


def run_with_progress(config: Path, runs_dir: Path, *, resume: bool = False) -> Path:
    """Run an experiment of any task with a progress bar; return its run directory.

    Args:
        config: The experiment TOML, or with ``resume`` the run directory to go on with.
        runs_dir: Where run directories are created.
        resume: Resume the stopped run ``config`` after its last completed round.

    Raises:
        FedCrmError: The configuration is invalid or the run failed.
    """
    from fedcrm.server.result import RoundRecord
    from fedcrm.simulation import resume_experiment, run_experiment
    from fedcrm.simulation.config import load_experiment

    cfg = load_experiment(config / "config.toml" if resume else config)
    label, key = cfg.plugin.headline(cfg.settings)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(label + " {task.fields[metric]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(
            f"{cfg.name}: starting", total=cfg.federation.num_rounds, metric="–"
        )

        def on_round(record: RoundRecord) -> None:
            value = record.evaluate.get(key)
            shown = f"{float(value):.4f}" if value is not None else "–"
            progress.update(
                bar, advance=1, metric=shown, description=f"{cfg.name}: round {record.round}"
            )

        def on_phase(message: str) -> None:
            progress.console.print(f"[dim]{cfg.name}: {message}[/dim]")

        if resume:
            return resume_experiment(config, on_round=on_round, on_phase=on_phase)
        return run_experiment(cfg, runs_root=runs_dir, on_round=on_round, on_phase=on_phase)


def _results(run_dirs: list[Path]) -> None:
    """Each task's tables of the finished runs, in the order the tasks first appear."""
    by_task: dict[str, list[dict[str, object]]] = {}
    for d in run_dirs:
        summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        by_task.setdefault(str(summary["task"]), []).append(summary)
    for name, summaries in by_task.items():
        for table in get_task(name).results_tables(summaries):
            console.print(table)


def _traffic_table(run_dirs: list[Path]) -> Table:
    table = Table(title="Bytes per branch per round (train + evaluate), round time")
    for col in ("run", "aggregation", "bytes up", "bytes down", "median round s"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for d in run_dirs:
        s = json.loads((d / "summary.json").read_text())
        t = s.get("traffic")
        if t is None:
            continue
        table.add_row(
            s["name"],
            t["aggregation"],
            f"{t['bytes_up_per_branch_per_round']:,.0f}",
            f"{t['bytes_down_per_branch_per_round']:,.0f}",
            f"{t['median_round_seconds']:.2f}",
        )
    return table


@app.command()
def simulate(
    config: Annotated[Path, typer.Argument(help="Experiment TOML (see examples/).")],
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path(
        "runs"
    ),
) -> None:
    """Run a federated experiment on Flower's simulation engine and write a run directory.

    Any registered task: churn, or recommendations (``task = "recommendation"``).
    """
    try:
        run_dir = run_with_progress(config, runs_dir)
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _results([run_dir])
    if (run_dir / "compliance.db").is_file():
        _compliance_epilogue(run_dir)
    console.print(f"run directory: {run_dir}")


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="The run directory of a stopped run.")],
) -> None:
    """Resume a stopped simulation after its last completed round, in its own directory.

    The ledger is first reconciled with the branches' accountants (a spend made in the round
    that did not complete is recorded once); cumulative epsilon goes on from where it was.
    """
    try:
        run_with_progress(run_dir, run_dir.parent, resume=True)
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _results([run_dir])
    console.print(f"run directory: {run_dir}")


def _compliance_epilogue(run_dir: Path) -> None:
    """A consent-gated run: consent imported, rows gated, the audit log verified offline."""
    from fedcrm.compliance.audit import load_public_key, verify_export

    summary = json.loads((run_dir / "summary.json").read_text()).get("compliance", {})
    made_up: dict[str, int] = {}
    for counts in (summary.get("consent_imported") or {}).values():
        for state, n in counts.items():
            made_up[state] = made_up.get(state, 0) + n
    console.print(
        f"{run_dir.name}: consent imported for {sum(made_up.values())} customers ("
        + ", ".join(f"{n} {state}" for state, n in made_up.items())
        + f"); {summary.get('manifests', 0)} round manifests, "
        f"{summary.get('rows_excluded', 0)} training rows left out by the consent gate"
    )
    log, public = run_dir / "audit-log.jsonl", run_dir / "audit-key.pem.pub"
    report = verify_export(log, trusted_keys={load_public_key(public)})
    console.print(f"$ fedcrm audit verify {log} --public-key {public}")
    console.print(report.summary())
    db = run_dir / "compliance.db"
    console.print(
        "officer pages over this run's records:\n"
        f"  fedcrm compliance apikey create --role officer --label dpo --db {db}\n"
        f"  fedcrm compliance serve --db {db}   # then http://127.0.0.1:8000/pages/"
    )


@app.command()
def demo(
    runs_dir: Annotated[Path, typer.Option(help="Where run directories are created.")] = Path(
        "runs"
    ),
) -> None:
    """The main job: federated churn (MLC by state; Telco plain, DP, HE), then recommendations."""
    configs = [
        EXAMPLES / "mlc_by_state.toml",
        EXAMPLES / "telco_dirichlet.toml",
        # Record-level DP (customer-level: one row per customer), epsilon 3 per branch.
        EXAMPLES / "telco_dirichlet_dp.toml",
        # The same Telco run aggregated under CKKS encryption (bytes and round time beside it).
        EXAMPLES / "telco_dirichlet_he.toml",
        # Federated recommendations (MovieLens 100K, ZIP-zone branches) and their baselines.
        EXAMPLES / "movielens_zip.toml",
    ]
    try:
        run_dirs = [run_with_progress(c, runs_dir) for c in configs]
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    _results(run_dirs)
    console.print(_traffic_table(run_dirs))
    for d in run_dirs:
        console.print(f"report: {d / 'report.md'}")
    for d in run_dirs:
        if (d / "ledger.db").is_file():
            privacy = json.loads((d / "summary.json").read_text()).get("privacy", {})
            console.print(
                f"{d.name}: DP-SGD ({privacy.get('unit_note', '')}); largest "
                f"epsilon {privacy.get('epsilon_max', float('nan')):.3f} per branch, delta "
                f"{privacy.get('delta_rule', '?')}, {privacy.get('accountant', '?')} accountant"
            )
            ledger_show(db=str(d / "ledger.db"), run=None, branch=None, rounds=False)
            _customer_summary(d / "branches")
            console.print(f"$ fedcrm ledger recompute --db {d / 'ledger.db'}")
            ledger_recompute(db=str(d / "ledger.db"), run=None)
    for d in run_dirs:
        if (d / "compliance.db").is_file():  # consent-gated (telco_dirichlet.toml [compliance])
            _compliance_epilogue(d)


@ledger_app.command("show")
def ledger_show(
    db: Annotated[
        str,
        typer.Option(
            help="Ledger database: a SQLite file (a run's ledger.db) or a SQLAlchemy URL."
        ),
    ] = "fedcrm-ledger.db",
    run: Annotated[str | None, typer.Option(help="Only this run id.")] = None,
    branch: Annotated[str | None, typer.Option(help="Only this branch.")] = None,
    rounds: Annotated[
        bool, typer.Option("--rounds/--no-rounds", help="Also print the per-round table.")
    ] = True,
    customer: Annotated[
        str | None,
        typer.Option(
            help="A customer's pseudonym: print their own epsilon (individual accounting) from "
            "the branch's customers.db, or from every customers.db under a folder (--db)."
        ),
    ] = None,
) -> None:
    """Print the cumulative epsilon per branch and every round's privacy decision."""
    from fedcrm.compliance import LedgerEntry

    if customer is not None:
        _customer_show(db, customer, branch=branch)
        return
    entries = _ledger_entries(db, run=run, branch=branch)
    if not entries:
        console.print("the ledger holds no entry for this selection")
        return
    per_scope: dict[tuple[str, str, str], list[LedgerEntry]] = {}
    for e in entries:
        per_scope.setdefault((e.branch, e.model, e.purpose), []).append(e)
    scope = f"run {run}" if run else "all runs"
    totals = Table(title=f"Cumulative ε per branch ({scope}; ε at the stated δ)")
    for col in ("branch", "model", "purpose", "cumulative ε", "δ", "unit", "admitted", "refused"):
        totals.add_column(col, justify="left" if col in ("branch", "model", "purpose") else "right")
    for (name, model, purpose), rows in sorted(per_scope.items()):
        last = rows[-1]
        totals.add_row(
            name,
            model,
            purpose,
            f"{max(e.cumulative_epsilon for e in rows):.4f}",
            f"{last.delta:.2e}",
            str(last.privacy_unit),
            str(sum(e.decision == "admitted" for e in rows)),
            str(sum(e.decision == "refused" for e in rows)),
        )
    console.print(totals)
    if not rounds:
        return
    table = Table(title="Privacy decisions, round by round")
    columns = ("run", "round", "branch", "decision", "ε round", "cumulative ε", "δ", "σ", "q")
    for col in (*columns, "steps", "accountant", "reason"):
        table.add_column(col, overflow="fold")
    for e in entries:
        refused = e.decision == "refused"
        table.add_row(
            e.run_id,
            str(e.round),
            e.branch,
            f"[red]{e.decision}[/red]" if refused else str(e.decision),
            f"{e.epsilon:.4f}",
            f"{e.cumulative_epsilon:.4f}",
            f"{e.delta:.2e}",
            f"{e.noise_multiplier:.3f}",
            f"{e.sampling_rate:.4f}",
            str(e.steps),
            f"{e.accountant} ({e.library_version})",
            (e.reason or "") if refused else "",
        )
    console.print(table)


def _ledger_entries(db: str, *, run: str | None, branch: str | None) -> list[Any]:
    """The ledger's entries at ``db`` (a SQLite file or a URL); exit 2 when unreadable."""
    from fedcrm.compliance import PrivacyLedger, open_store, sqlite_url

    if "://" in db:
        url = db
    elif Path(db).is_file():
        url = sqlite_url(db)
    else:
        err.print(f"[red]error:[/red] no ledger at {db} (pass --db PATH or a URL)")
        raise typer.Exit(2)
    try:
        return PrivacyLedger(open_store(url, migrate=False)).entries(run_id=run, branch=branch)
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _customer_summary(root: Path) -> None:
    """Per branch: the spread of its customers' own ε (individual accounting)."""
    from statistics import median

    from fedcrm.client import CUSTOMER_LEDGER
    from fedcrm.compliance import CustomerLedger, open_store, sqlite_url

    table = Table(title="Per-customer ε (each customer's own spends; ε at the stated δ)")
    for col in ("branch", "customers", "min ε", "median ε", "max ε", "δ", "unit", "accountant"):
        table.add_column(col, justify="left" if col == "branch" else "right")
    for path in sorted(root.rglob(CUSTOMER_LEDGER)):
        totals = CustomerLedger(open_store(sqlite_url(path), migrate=False)).totals()
        if not totals:
            continue
        eps = [t.cumulative_epsilon for t in totals]
        table.add_row(
            totals[0].branch,
            str(len(totals)),
            f"{min(eps):.4f}",
            f"{median(eps):.4f}",
            f"{max(eps):.4f}",
            f"{totals[0].delta:.2e}",
            str(totals[0].privacy_unit),
            str(totals[0].accountant),
        )
    if table.row_count:
        console.print(table)


def _customer_show(db: str, customer: str, *, branch: str | None) -> None:
    """Print a customer's cumulative ε from the per-customer ledgers at ``db``."""
    from fedcrm.client import CUSTOMER_LEDGER
    from fedcrm.compliance import CustomerLedger, open_store, sqlite_url

    root = Path(db)
    stores = sorted(root.rglob(CUSTOMER_LEDGER)) if root.is_dir() else [root]
    if ("://" not in db and not all(p.is_file() for p in stores)) or not stores:
        err.print(
            f"[red]error:[/red] no per-customer ledger at {db}: pass a branch's "
            f"{CUSTOMER_LEDGER} (in its privacy folder) or a folder holding them"
        )
        raise typer.Exit(2)
    urls = [db] if "://" in db else [sqlite_url(p) for p in stores]
    table = Table(title=f"Cumulative ε of customer {customer} (individual accounting)")
    for col in ("branch", "model", "purpose", "ε", "δ", "unit", "accountant", "spends"):
        table.add_column(col, justify="left" if col in ("branch", "model", "purpose") else "right")
    found = 0
    try:
        for url in urls:
            for t in CustomerLedger(open_store(url, migrate=False)).customer(
                customer, branch=branch
            ):
                found += 1
                table.add_row(
                    t.branch,
                    t.model,
                    t.purpose,
                    f"{t.cumulative_epsilon:.4f}",
                    f"{t.delta:.2e}",
                    str(t.privacy_unit),
                    str(t.accountant),
                    str(t.spends),
                )
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not found:
        console.print(f"no DP-SGD spend recorded in {db} included customer {customer}")
        return
    console.print(table)


@ledger_app.command("recompute")
def ledger_recompute(
    db: Annotated[
        str,
        typer.Option(
            help="Ledger database: a SQLite file (a run's ledger.db) or a SQLAlchemy URL."
        ),
    ] = "fedcrm-ledger.db",
    run: Annotated[str | None, typer.Option(help="Only the branches of this run id.")] = None,
) -> None:
    """Recompute every admitted row with dp-accounting's RDP and PLD; exit 1 on a disagreement.

    Each (branch, model, purpose) is recomposed from its own ledger rows in order; a row whose
    recorded cumulative epsilon differs from the recomputed one by more than 1 %, or whose PLD
    epsilon exceeds RDP, is listed.
    """
    from fedcrm.server import recompute_ledger

    entries = _ledger_entries(db, run=None, branch=None)
    if run is not None:
        branches = {e.branch for e in entries if e.run_id == run}
        entries = [e for e in entries if e.branch in branches]
    try:
        checks = recompute_ledger(entries)
    except FedCrmError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    if not checks:
        console.print("the ledger holds no admitted entry to recompute")
        return
    table = Table(title="Ledger recomputed with dp-accounting (RDP every row, PLD last row)")
    for col in ("branch", "model", "rows", "recorded ε", "RDP ε", "PLD ε", "δ", "largest gap"):
        table.add_column(col, justify="left" if col in ("branch", "model") else "right")
    scopes: dict[tuple[str, str, str], list[Any]] = {}
    for check in checks:
        scopes.setdefault((check.entry.branch, check.entry.model, check.entry.purpose), []).append(
            check
        )
    for (name, model, _purpose), rows in sorted(scopes.items()):
        last = rows[-1]
        gap = max(abs(c.entry.cumulative_epsilon - c.rdp) / max(c.rdp, 1e-12) for c in rows)
        table.add_row(
            name,
            model,
            str(len(rows)),
            f"{last.entry.cumulative_epsilon:.4f}",
            f"{last.rdp:.4f}",
            "" if last.pld is None else f"{last.pld:.4f}",
            f"{last.entry.delta:.2e}",
            f"{100 * gap:.3f} %",
        )
    console.print(table)
    flagged = [c for c in checks if c.problem]
    for c in flagged:
        err.print(
            f"[red]disagreement:[/red] {c.entry.run_id} round {c.entry.round} "
            f"{c.entry.branch}: {c.problem}"
        )
    if flagged:
        raise typer.Exit(1)
    console.print(f"{len(checks)} admitted rows recomputed: no disagreement above 1 %, PLD <= RDP")


def main() -> None:
    """Entry point of the ``fedcrm`` console script."""
    app()
