"""``fedcrm compliance``: serve the officer's service, administer consent and API keys.

``serve --run RUN_DIR`` and ``ropa --run RUN_DIR`` generate the Art. 30 records (and, with
``ropa --dpia``, a DPIA skeleton) from the run directory's real configuration.

Mount with ``app.add_typer(fedcrm.compliance.cli.app, name="compliance")``.

Exit codes: 0 done, 1 refused (a bad consent file, a change that does not follow from the
status), 2 unusable input (unreachable store, malformed arguments).
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedcrm.compliance.apikeys import ApiKeyStore
from fedcrm.compliance.audit._log import AuditLog
from fedcrm.compliance.consent import ConsentRegistry
from fedcrm.compliance.db import open_store, sqlite_url, store_url
from fedcrm.compliance.enums import Channel, Purpose, Role
from fedcrm.compliance.errors import (
    ApiKeyError,
    ComplianceError,
    ConsentImportError,
    ConsentNotFound,
    ConsentStateError,
    ManifestError,
)
from fedcrm.compliance.lineage import LineageStore, customer_lineage
from fedcrm.compliance.manifest import ManifestArchive

if TYPE_CHECKING:
    from fedcrm.compliance.core.config import Settings

EXIT_REFUSED = 1
EXIT_UNUSABLE = 2

app = typer.Typer(
    name="compliance",
    help="The compliance officer's service: consent registry, ledger, audit log, Art. 30.",
    no_args_is_help=True,
    add_completion=False,
)
consent_app = typer.Typer(help="Import, withdraw and show consent.", no_args_is_help=True)
apikey_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(consent_app, name="consent")
app.add_typer(apikey_app, name="apikey")

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Compliance store: a SQLAlchemy URL or a SQLite file path "
        "(default: FEDCRM_COMPLIANCE_DATABASE_URL, else ./compliance.db).",
    ),
]


RunOption = Annotated[
    Path | None,
    typer.Option(
        "--run",
        help="A run directory of `fedcrm simulate`: the Art. 30 records are generated from its "
        "config.toml and summary.json (and its compliance.db is the store unless --db is given).",
        file_okay=False,
        dir_okay=True,
    ),
]
RopaFileOption = Annotated[
    Path | None,
    typer.Option(
        help="JSON configuration of the Art. 30 records (RopaConfig); with --run, only its "
        "controller is used."
    ),
]


class RopaFormat(StrEnum):
    """Output formats of ``fedcrm compliance ropa``."""

    JSON = "json"
    MD = "md"


def _ropa_settings(db: str | None, ropa_file: Path | None, run: Path | None) -> Settings:
    """The service's settings with the command line's store, RoPA file and run directory."""
    from pydantic import ValidationError

    from fedcrm.compliance.core.config import Settings
    from fedcrm.compliance.core.ropa_from_run import COMPLIANCE_DB

    overrides: dict[str, object] = {}
    if db is not None:
        overrides["database_url"] = _url(db)
    elif run is not None and (run / COMPLIANCE_DB).is_file():
        overrides["database_url"] = sqlite_url(run / COMPLIANCE_DB)
    if ropa_file is not None:
        overrides["ropa_file"] = ropa_file
    if run is not None:
        overrides["run_dir"] = run
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise _fail(f"invalid settings: {exc}") from exc


def _url(db: str | None) -> str:
    if db is None:
        from fedcrm.compliance.core.config import Settings

        return Settings().database_url
    return store_url(db)


def _fail(message: str, code: int = EXIT_UNUSABLE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _registry(db: str | None) -> ConsentRegistry:
    try:
        factory = open_store(_url(db))
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    return ConsentRegistry(factory, audit=AuditLog(factory))


@app.command()
def serve(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    ropa_file: RopaFileOption = None,
    run: RunOption = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the compliance API (OpenAPI docs at /docs) with uvicorn.

    With ``--run``, ``GET /ropa`` serves the records generated from that run's configuration;
    without it (and without a RoPA file), records that say no run configuration was loaded.
    """
    import uvicorn

    from fedcrm.compliance.api.main import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = _ropa_settings(db, ropa_file, run)
    logging.getLogger(__name__).info(
        "records of processing: %s; store: %s", settings.ropa.source.detail, settings.database_url
    )
    try:
        application = create_app(settings)
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    uvicorn.run(application, host=host, port=port, log_level=log_level, ws="none")


@app.command("ropa")
def ropa_command(
    run: RunOption = None,
    output_format: Annotated[
        RopaFormat, typer.Option("--format", help="json (as GET /ropa) or md (Markdown).")
    ] = RopaFormat.JSON,
    dpia: Annotated[
        bool,
        typer.Option(
            "--dpia", help="Print a DPIA skeleton (Markdown) from the same configuration instead."
        ),
    ] = False,
    ropa_file: RopaFileOption = None,
    out: Annotated[Path | None, typer.Option(help="Write here (default: stdout).")] = None,
) -> None:
    """Print the Art. 30 records generated from a run's configuration, or a DPIA skeleton."""
    from fedcrm.compliance._types import utcnow
    from fedcrm.compliance.core.ropa_markdown import dpia_markdown, ropa_markdown
    from fedcrm.compliance.schemas import RopaPublic

    config = _ropa_settings(None, ropa_file, run).ropa
    if dpia:
        text = dpia_markdown(config)
    elif output_format is RopaFormat.MD:
        text = ropa_markdown(config)
    else:
        public = RopaPublic.from_config(config, list(config.branches), utcnow())
        text = json.dumps(public.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"written to {out}", err=True)


@consent_app.command("import")
def consent_import(
    branch: Annotated[str, typer.Argument(help="The branch the file comes from.")],
    csv_file: Annotated[Path, typer.Argument(help="The branch's consent CSV (UTF-8).")],
    db: DbOption = None,
    actor: Annotated[str, typer.Option(help="Who imports (recorded on every event).")] = (
        "branch-import"
    ),
) -> None:
    """Import a consent CSV, all or nothing; every bad row is listed with its line number."""
    registry = _registry(db)
    try:
        with csv_file.open(encoding="utf-8", newline="") as handle:
            summary = registry.import_csv(branch=branch, source=handle, actor=actor)
    except OSError as exc:
        raise _fail(f"cannot read {csv_file}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise _fail(f"{csv_file} is not UTF-8: {exc}") from exc
    except ConsentImportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_REFUSED) from exc
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(
        f"imported {summary.rows} row(s): {summary.events} event(s) for {summary.customers} "
        f"customer(s), {summary.records_created} new record(s) at branch {branch}"
    )


@consent_app.command("withdraw")
def consent_withdraw(
    branch: Annotated[str, typer.Argument(help="The customer's branch.")],
    customer_id: Annotated[str, typer.Argument(help="The customer's pseudonymous id.")],
    purpose: Annotated[
        list[Purpose] | None,
        typer.Option(help="Purpose to withdraw (repeatable); default: every given one."),
    ] = None,
    channel: Annotated[Channel, typer.Option(help="Where the customer withdrew.")] = (
        Channel.IN_BRANCH
    ),
    actor: Annotated[str, typer.Option(help="Who records it.")] = "customer",
    db: DbOption = None,
) -> None:
    """Withdraw a customer's consent, effective now (from the next round on)."""
    registry = _registry(db)
    try:
        view = registry.withdraw(
            branch=branch, subject=customer_id, channel=channel, actor=actor, purposes=purpose
        )
    except (ConsentNotFound, ConsentStateError) as exc:
        raise _fail(str(exc), EXIT_REFUSED) from exc
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    withdrawn = sorted(
        p.value for p, s in view.status_at().items() if s.status.value == "withdrawn"
    )
    typer.echo(f"withdrawn: {', '.join(withdrawn)}")


@consent_app.command("receipt")
def consent_receipt(
    branch: Annotated[str, typer.Argument(help="The customer's branch.")],
    customer_id: Annotated[str, typer.Argument(help="The customer's pseudonymous id.")],
    out: Annotated[Path | None, typer.Option(help="Write the JSON here (default: stdout).")] = (
        None
    ),
    db: DbOption = None,
) -> None:
    """Print (or write) the customer's JSON consent receipt."""
    registry = _registry(db)
    try:
        receipt = registry.receipt(branch=branch, subject=customer_id)
    except ConsentNotFound as exc:
        raise _fail(str(exc), EXIT_REFUSED) from exc
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    text = json.dumps(receipt, indent=2, ensure_ascii=False) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        typer.echo(f"receipt written to {out}")


@apikey_app.command("create")
def apikey_create(
    role: Annotated[Role, typer.Option(help="officer, branch or researcher.")],
    label: Annotated[str, typer.Option(help="Who holds it, e.g. dpo-laptop.")],
    branch: Annotated[str | None, typer.Option(help="The branch of a branch key.")] = None,
    db: DbOption = None,
) -> None:
    """Create an API key; its token is printed once and never stored (only its SHA-256)."""
    try:
        store = ApiKeyStore(open_store(_url(db)))
        info, token = store.create(role, label=label, branch=branch)
    except ApiKeyError as exc:
        raise _fail(str(exc)) from exc
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"key id: {info.key_id} (role {info.role.value})", err=True)
    typer.echo(token)


@apikey_app.command("list")
def apikey_list(db: DbOption = None) -> None:
    """List API keys (ids, roles, branches; never tokens)."""
    try:
        keys = ApiKeyStore(open_store(_url(db))).list()
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    for key in keys:
        state = "revoked" if key.revoked_at else "active"
        typer.echo(f"{key.key_id}\t{key.role.value}\t{key.branch or '-'}\t{state}\t{key.label}")


@apikey_app.command("revoke")
def apikey_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id to revoke.")],
    db: DbOption = None,
) -> None:
    """Revoke an API key."""
    try:
        revoked = ApiKeyStore(open_store(_url(db))).revoke(key_id)
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    if not revoked:
        raise _fail(f"no active key {key_id!r}", EXIT_REFUSED)
    typer.echo(f"revoked {key_id}")


@app.command()
def lineage(
    db: DbOption = None,
    branch: Annotated[str | None, typer.Option(help="Only this branch's manifests.")] = None,
    run: Annotated[str | None, typer.Option(help="Only this run.")] = None,
    customer: Annotated[
        str | None,
        typer.Option(help="A customer's pseudonymous id: which rounds and models it reached."),
    ] = None,
    branch_dir: Annotated[
        Path | None,
        typer.Option(
            help="The branch's consent folder (salts and archived manifests); with --customer."
        ),
    ] = None,
) -> None:
    """Show which runs, rounds and models used a branch's data, or one customer's.

    Without ``--customer``: the manifests the coordinator recorded (roots and counts). With
    ``--customer``, run on the branch: its salts recompute the customer's commitment, which is
    checked against every archived round (RFC 9162 inclusion proof) and the recorded root.
    Exits 1 when the customer has no commitment on this branch.
    """
    try:
        store = LineageStore(open_store(_url(db), migrate=False))
        if customer is None:
            uses = store.uses(branch=branch, run_id=run)
        else:
            if branch is None or branch_dir is None:
                raise _fail("--customer needs --branch and --branch-dir")
            folder = branch_dir / "consent" if (branch_dir / "consent").is_dir() else branch_dir
            rounds = customer_lineage(
                customer, ManifestArchive(folder), branch=branch, store=store, run_id=run
            )
    except ManifestError as exc:
        raise _fail(str(exc), EXIT_REFUSED) from exc
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    if customer is None:
        if not uses:
            typer.echo("no round manifest recorded for this selection")
        for use in uses:
            m = use.record.manifest
            excluded = ", ".join(f"{n} {r}" for r, n in sorted(m.excluded.items())) or "none"
            models = ", ".join(f"{r.model} {r.sha256[:12]}" for r in use.models) or "-"
            typer.echo(
                f"{use.record.run_id} round {use.record.round} {m.branch}: "
                f"{m.rows_after}/{m.rows_before} rows (excluded: {excluded}), "
                f"root {m.root[:16]}, consent snapshot {m.snapshot_version}, "
                f"audit #{use.record.audit_index}, models: {models}"
            )
        return
    for item in rounds:
        member = item.membership
        where = f"{member.run_id} round {member.round}"
        if member.included:
            models = ", ".join(f"{r.model} {r.sha256[:12]}" for r in item.models) or "-"
            verdict = (
                f"included (leaf {member.leaf_index} of {member.tree_size}, proof of "
                f"{len(member.proof)} hashes verified), models: {models}"
            )
        else:
            verdict = f"not included (not among the {member.tree_size} committed customers)"
        check = "root matches the coordinator's record"
        if not item.root_matches:
            check = "NO RECORD of this root at the coordinator"
        typer.echo(f"{where}: {verdict}; {check}")
