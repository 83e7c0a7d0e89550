"""``fedcrm audit``: verify and export the tamper-evident audit log.

Mount with ``app.add_typer(fedcrm.compliance.audit.cli.app, name="audit")``.

Exit codes: 0 verified (or done), 1 verification failed, 2 unusable input (missing or malformed
file, bad key, unreachable store).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedcrm.compliance.audit._log import AuditLog
from fedcrm.compliance.audit._signing import (
    generate_signing_key,
    load_public_key,
    load_signing_key,
)
from fedcrm.compliance.audit._verify import verify_export
from fedcrm.compliance.db import open_store, store_url
from fedcrm.compliance.errors import ComplianceError

EXIT_FAILED = 1
EXIT_UNUSABLE = 2

app = typer.Typer(
    name="audit",
    help="Verify and export the tamper-evident audit log (RFC 9162 Merkle tree, Ed25519).",
    no_args_is_help=True,
    add_completion=False,
)

_DB_HELP = (
    "Compliance store: a SQLAlchemy URL (sqlite:///FILE, postgresql+psycopg://...) or a path "
    "to a SQLite file."
)


def _fail(message: str, code: int = EXIT_UNUSABLE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def verify(
    log: Annotated[Path, typer.Argument(help="Exported audit log (JSON lines) to verify.")],
    since: Annotated[
        Path | None,
        typer.Option(
            "--since",
            help="A checkpoint file saved earlier: the log must still extend it (consistency "
            "proof, RFC 9162 §2.1.4).",
        ),
    ] = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--public-key",
            help="The log's Ed25519 public key (PEM), obtained out of band; repeatable. "
            "Without it only self-consistency is proven.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Verify an exported audit log offline: leaves, tree, signatures and consistency.

    Exits 0 when everything verifies, 1 when any check fails (each failure names the entry index
    or checkpoint), 2 when the input is unusable.
    """
    try:
        trusted = {load_public_key(path) for path in public_key} if public_key else None
        report = verify_export(log, since, trusted_keys=trusted)
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "source": report.source,
                    "tree_size": report.tree_size,
                    "root_hash": report.root_hash.hex(),
                    "checkpoints_total": report.checkpoints_total,
                    "checkpoints_valid": report.checkpoints_valid,
                    "keys_trusted": report.keys_trusted,
                    "issues": [
                        {
                            "kind": str(issue.kind),
                            "message": issue.message,
                            "entry_index": issue.entry_index,
                            "checkpoint": issue.checkpoint,
                            "line": issue.line,
                        }
                        for issue in report.issues
                    ],
                    "warnings": list(report.warnings),
                },
                indent=2,
            )
        )
    else:
        typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="File to write (JSON lines).")],
    db: Annotated[str, typer.Option("--db", help=_DB_HELP, envvar="FEDCRM_COMPLIANCE_DB")],
    sign_key: Annotated[
        Path | None,
        typer.Option(
            "--sign-key",
            help="Sign a fresh checkpoint of the whole log with this Ed25519 key first.",
        ),
    ] = None,
    checkpoint_out: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-out",
            help="Also save the latest checkpoint here (keep it apart, for a later --since).",
        ),
    ] = None,
) -> None:
    """Export the audit log to a self-contained file for offline verification."""
    try:
        log = AuditLog(open_store(store_url(db), migrate=False))
        if sign_key is not None:
            log.checkpoint(load_signing_key(sign_key))
        log.export(out)
        latest = log.latest_checkpoint()
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    if checkpoint_out is not None:
        if latest is None:
            raise _fail("the log has no checkpoint to save; pass --sign-key")
        latest.save(checkpoint_out)
    typer.echo(f"exported {log.size()} entries to {out}")


@app.command()
def checkpoint(
    db: Annotated[str, typer.Option("--db", help=_DB_HELP, envvar="FEDCRM_COMPLIANCE_DB")],
    key: Annotated[Path, typer.Option("--key", help="The log's Ed25519 signing key (mode 0600).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Also save the signed checkpoint to this file.")
    ] = None,
) -> None:
    """Sign a checkpoint (tree size, root hash, time) of the whole log."""
    try:
        signed = AuditLog(open_store(store_url(db), migrate=False)).checkpoint(
            load_signing_key(key)
        )
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    if out is not None:
        signed.save(out)
    typer.echo(f"checkpoint: size {signed.tree_size}, root {signed.root_hash.hex()}")


@app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="Private key file to create (mode 0600).")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing key (breaks continuity).")
    ] = False,
) -> None:
    """Create the log's Ed25519 signing key; the public key is written to PATH.pub."""
    try:
        generate_signing_key(path, overwrite=overwrite)
    except ComplianceError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(f"signing key written to {path}, public key to {path}.pub")
