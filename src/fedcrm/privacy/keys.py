"""Key custody for CKKS aggregation: key files, key ids, generations and rotation.

The key authority runs ``fedcrm keys init DIR`` once, and ``fedcrm keys rotate DIR`` to move
the federation to a new key. Each generation is a folder with two files and their JSON
sidecars (never pickle)::

    DIR/                          mode 0700
      keyring.json                every generation: id, creation time, parameters, status
      gen-0001/
        secret.tenseal            secret context, mode 0600: give to branches only
        secret.json               its metadata (kind, generation, key id, params, retired ids)
        public.tenseal            public context: give to the server
        public.json

The key id is the SHA-256 of ``public.tenseal``; every encrypted update carries it. A context
loaded from generation *g* knows the key ids of generations 1..g-1, so an update under one of
them fails with :class:`~fedcrm.privacy.he.StaleKeyError` ("old generation") rather than
:class:`~fedcrm.privacy.he.UnknownKeyError`.

All TenSEAL work goes through :mod:`fedcrm.privacy.he`; this module handles files only.
"""

import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import typer

from fedcrm.privacy.he import (
    DEFAULT_PARAMETERS,
    CKKSParameters,
    ContextKindError,
    HEContext,
    HEError,
    StaleKeyError,
    create_contexts,
    load_context,
)

__all__ = [
    "InsecureKeyFileError",
    "KeyFileError",
    "KeyGeneration",
    "app",
    "current_generation",
    "init_keys",
    "list_generations",
    "load_public_context",
    "load_secret_context",
    "rotate_keys",
]

logger = logging.getLogger(__name__)

KEYRING: Final = "keyring.json"
SECRET_FILE: Final = "secret.tenseal"
PUBLIC_FILE: Final = "public.tenseal"
_FORMAT_KEYRING: Final = "fedcrm-he-keyring"
_FORMAT_SIDECAR: Final = "fedcrm-he-key"
_FORMAT_VERSION: Final = 1
_SECRET_MODE: Final = 0o600
_PUBLIC_MODE: Final = 0o644
_DIR_MODE: Final = 0o700

Kind = Literal["secret", "public"]


class KeyFileError(HEError):
    """A key file or its metadata is missing, malformed, or does not match."""


class InsecureKeyFileError(KeyFileError):
    """A secret key file is readable or writable by users other than its owner."""


@dataclass(frozen=True, slots=True)
class KeyGeneration:
    """One key generation as recorded in the keyring.

    Attributes:
        generation: 1 for the first key, then 2, 3, ... after each rotation.
        key_id: SHA-256 (hex) of the public context file.
        created_at: ISO-8601 UTC creation time.
        params: The CKKS parameters of this generation.
        secret_path: The secret context (mode 0600), for branches.
        public_path: The public context, for the server.
        retired: Whether a later generation replaced it.
    """

    generation: int
    key_id: str
    created_at: str
    params: CKKSParameters
    secret_path: Path
    public_path: Path
    retired: bool = False


# --------------------------------------------------------------------------------------------
# File helpers
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a same-folder temp file created with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # exact mode, whatever the umask
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such file (key metadata missing)") from exc
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: unreadable or not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise KeyFileError(f"{path}: expected a JSON object")
    return data


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _gen_dir(directory: Path, generation: int) -> Path:
    return directory / f"gen-{generation:04d}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _field(data: Mapping[str, Any], name: str, kind: type, where: Path) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KeyFileError(f"{where}: field {name!r} missing or not {kind.__name__}")
    return value


# --------------------------------------------------------------------------------------------
# Keyring
# --------------------------------------------------------------------------------------------


def _read_keyring(directory: Path) -> dict[str, Any]:
    path = directory / KEYRING
    if not path.is_file():
        raise KeyFileError(f"{directory}: no {KEYRING}; run `fedcrm keys init {directory}` first")
    ring = _read_json(path)
    if ring.get("format") != _FORMAT_KEYRING or ring.get("version") != _FORMAT_VERSION:
        raise KeyFileError(f"{path}: not a fedcrm keyring (format/version)")
    if not isinstance(ring.get("generations"), list) or not ring["generations"]:
        raise KeyFileError(f"{path}: no generations recorded")
    return ring


def _generation_from(directory: Path, entry: Mapping[str, Any], current: int) -> KeyGeneration:
    where = directory / KEYRING
    generation = _field(entry, "generation", int, where)
    params_data = _field(entry, "params", dict, where)
    gen_dir = _gen_dir(directory, generation)
    return KeyGeneration(
        generation=generation,
        key_id=_field(entry, "key_id", str, where),
        created_at=_field(entry, "created_at", str, where),
        params=CKKSParameters.from_dict(params_data),
        secret_path=gen_dir / SECRET_FILE,
        public_path=gen_dir / PUBLIC_FILE,
        retired=generation != current,
    )


def list_generations(directory: Path) -> list[KeyGeneration]:
    """Every key generation recorded in ``directory``'s keyring, oldest first.

    Raises:
        KeyFileError: The keyring is missing or malformed.
    """
    ring = _read_keyring(directory)
    current = _field(ring, "current", int, directory / KEYRING)
    return [_generation_from(directory, e, current) for e in ring["generations"]]


def current_generation(directory: Path) -> KeyGeneration:
    """The generation branches and server should use now.

    Raises:
        KeyFileError: The keyring is missing or malformed.
    """
    gens = [g for g in list_generations(directory) if not g.retired]
    if len(gens) != 1:
        raise KeyFileError(f"{directory / KEYRING}: expected one current generation")
    return gens[0]


def _write_generation(
    directory: Path, generation: int, params: CKKSParameters, retired: Mapping[str, int]
) -> KeyGeneration:
    pair = create_contexts(params=params)
    gen_dir = _gen_dir(directory, generation)
    try:
        gen_dir.mkdir(mode=_DIR_MODE)  # fails if present: no two writers of one generation
    except FileExistsError as exc:
        raise KeyFileError(f"{gen_dir} already exists; is another rotation running?") from exc
    created = _now()
    meta: dict[str, Any] = {
        "format": _FORMAT_SIDECAR,
        "version": _FORMAT_VERSION,
        "generation": generation,
        "key_id": pair.key_id,
        "created_at": created,
        "params": params.to_dict(),
        "retired": [{"generation": g, "key_id": k} for k, g in sorted(retired.items())],
    }
    secret_path, public_path = gen_dir / SECRET_FILE, gen_dir / PUBLIC_FILE
    _write_atomic(secret_path, pair.secret.serialize_secret(), _SECRET_MODE)
    _write_atomic(_sidecar(secret_path), _json_bytes({**meta, "kind": "secret"}), _SECRET_MODE)
    _write_atomic(public_path, pair.public.serialize_public(), _PUBLIC_MODE)
    _write_atomic(_sidecar(public_path), _json_bytes({**meta, "kind": "public"}), _PUBLIC_MODE)
    logger.info("wrote key generation %d (key id %s...)", generation, pair.key_id[:12])
    return KeyGeneration(generation, pair.key_id, created, params, secret_path, public_path)


def _ring_entry(gen: KeyGeneration) -> dict[str, Any]:
    return {
        "generation": gen.generation,
        "key_id": gen.key_id,
        "created_at": gen.created_at,
        "params": gen.params.to_dict(),
    }


def init_keys(directory: Path, *, params: CKKSParameters = DEFAULT_PARAMETERS) -> KeyGeneration:
    """Create a key directory with its first key generation.

    Args:
        directory: Folder to create (mode 0700) or an empty existing one.
        params: CKKS parameters of the federation.

    Returns:
        Generation 1.

    Raises:
        KeyFileError: ``directory`` already holds a keyring (use :func:`rotate_keys`).

    Notes:
        Run on the key authority's machine. Copy ``secret.tenseal`` and its sidecar to the
        branches over a confidential channel, keeping mode 0600; copy only ``public.tenseal``
        and its sidecar to the server.
    """
    if (directory / KEYRING).exists():
        raise KeyFileError(
            f"{directory} already holds a keyring; use `fedcrm keys rotate {directory}`"
        )
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    gen = _write_generation(directory, 1, params, {})
    ring = {
        "format": _FORMAT_KEYRING,
        "version": _FORMAT_VERSION,
        "current": 1,
        "generations": [_ring_entry(gen)],
    }
    _write_atomic(directory / KEYRING, _json_bytes(ring), _PUBLIC_MODE)
    return gen


def rotate_keys(directory: Path, *, params: CKKSParameters | None = None) -> KeyGeneration:
    """Make a new key generation the current one; earlier ones become retired.

    Args:
        directory: A key directory made by :func:`init_keys`.
        params: Parameters of the new generation; by default those of the current one.

    Returns:
        The new generation.

    Raises:
        KeyFileError: The keyring is missing or malformed.

    Notes:
        Earlier generations' files are kept (the secret ones still mode 0600) so that
        ciphertext checkpoints made under them can be decrypted by the key authority;
        delete ``gen-NNNN/secret.tenseal`` to crypto-shred them. Their key ids go into the new
        sidecars, so updates still made under them are refused as "old generation".
    """
    ring = _read_keyring(directory)
    gens = list_generations(directory)
    current = max(g.generation for g in gens)
    chosen = (
        params if params is not None else next(g for g in gens if g.generation == current).params
    )
    retired = {g.key_id: g.generation for g in gens}
    new = _write_generation(directory, current + 1, chosen, retired)
    ring["current"] = new.generation
    ring["generations"].append(_ring_entry(new))
    _write_atomic(directory / KEYRING, _json_bytes(ring), _PUBLIC_MODE)
    logger.info("rotated keys: generation %d -> %d", current, new.generation)
    return new


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _read_meta(path: Path, kind: Kind) -> tuple[CKKSParameters, str, int, dict[str, int]]:
    sidecar = _sidecar(path)
    meta = _read_json(sidecar)
    if meta.get("format") != _FORMAT_SIDECAR or meta.get("version") != _FORMAT_VERSION:
        raise KeyFileError(f"{sidecar}: not fedcrm key metadata (format/version)")
    if meta.get("kind") != kind:
        raise ContextKindError(
            f"{path} is a {meta.get('kind')!r} key file but a {kind!r} one is required"
            + (" (the server must only ever load the public context)" if kind == "public" else "")
        )
    params = CKKSParameters.from_dict(_field(meta, "params", dict, sidecar))
    key_id = _field(meta, "key_id", str, sidecar)
    generation = _field(meta, "generation", int, sidecar)
    retired: dict[str, int] = {}
    for item in _field(meta, "retired", list, sidecar):
        if not isinstance(item, dict):
            raise KeyFileError(f"{sidecar}: malformed 'retired' entry")
        retired[_field(item, "key_id", str, sidecar)] = _field(item, "generation", int, sidecar)
    return params, key_id, generation, retired


def _check_not_retired(path: Path, key_id: str, generation: int) -> None:
    """If the key directory's keyring is beside the file, refuse a rotated-out generation."""
    keyring_dir = path.parent.parent
    if not (keyring_dir / KEYRING).is_file():
        return  # a copy distributed without the keyring: the sidecar is all we know
    for gen in list_generations(keyring_dir):
        if gen.key_id == key_id and gen.retired:
            current = current_generation(keyring_dir)
            raise StaleKeyError(
                f"{path}: key generation {generation} has been rotated out; load generation "
                f"{current.generation} ({current.public_path.parent.name}) instead"
            )


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc}") from exc


def load_public_context(path: Path) -> HEContext:
    """Load the server's public context, refusing anything that holds a secret key.

    Args:
        path: A ``public.tenseal`` file (its ``public.json`` sidecar beside it).

    Returns:
        The public-only context, tagged with its generation and the retired key ids.

    Raises:
        KeyFileError: The file or sidecar is missing or malformed.
        ContextKindError: The file (or its sidecar) is a secret context.
        UnknownKeyError: The file's key id differs from its sidecar's.
        StaleKeyError: The keyring beside it says this generation was rotated out.
        ParameterMismatchError: The context's parameters differ from the sidecar's.
    """
    params, key_id, generation, retired = _read_meta(path, "public")
    ctx = load_context(
        _read_key_file(path), params=params, require="public", expected_key_id=key_id
    )
    _check_not_retired(path, key_id, generation)
    return ctx.with_history(generation=generation, retired_key_ids=retired)


def load_secret_context(path: Path) -> HEContext:
    """Load a branch's secret context, refusing a file others can read.

    Args:
        path: A ``secret.tenseal`` file (its ``secret.json`` sidecar beside it).

    Returns:
        The secret context, tagged with its generation and the retired key ids.

    Raises:
        InsecureKeyFileError: The file's mode gives group or others any access.
        KeyFileError: The file or sidecar is missing or malformed.
        ContextKindError: The file is a public-only context.
        UnknownKeyError: The file's key id differs from its sidecar's.
        StaleKeyError: The keyring beside it says this generation was rotated out.
        ParameterMismatchError: The context's parameters differ from the sidecar's.

    Notes:
        Like OpenSSH with private keys, any group or other permission bit is refused, not only
        world-readability: whoever can read the file can decrypt every branch's update.
    """
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file") from exc
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise InsecureKeyFileError(
            f"{path}: the secret key file has mode {mode:04o}, accessible to group/others; "
            f"whoever reads it can decrypt every update. Run `chmod 600 {path}`"
        )
    params, key_id, generation, retired = _read_meta(path, "secret")
    ctx = load_context(
        _read_key_file(path), params=params, require="secret", expected_key_id=key_id
    )
    _check_not_retired(path, key_id, generation)
    return ctx.with_history(generation=generation, retired_key_ids=retired)


# --------------------------------------------------------------------------------------------
# CLI: mounted by fedcrm.cli as `fedcrm keys`
# --------------------------------------------------------------------------------------------

app = typer.Typer(
    name="keys",
    help="Key authority: create, rotate and inspect the federation's CKKS keys.",
    no_args_is_help=True,
)

DirectoryArg = Annotated[
    Path, typer.Argument(help="Key directory (holds keyring.json and gen-NNNN/ folders).")
]


def _describe(gen: KeyGeneration) -> str:
    p = gen.params
    status = "retired" if gen.retired else "current"
    return (
        f"generation {gen.generation} ({status}), key id {gen.key_id}\n"
        f"  created {gen.created_at}; CKKS N={p.poly_modulus_degree}, "
        f"primes={list(p.coeff_mod_bit_sizes)}, scale=2^{p.scale_bits}, "
        f"|value|<={p.max_abs_value:g}, <= {p.max_summands} summands\n"
        f"  secret (branches only, mode 0600): {gen.secret_path}\n"
        f"  public (server): {gen.public_path}"
    )


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=1)


@app.command("init")
def init_command(directory: DirectoryArg) -> None:
    """Create the key directory and generation 1 (secret context: branches; public: server)."""
    try:
        gen = init_keys(directory)
    except (HEError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(_describe(gen))


@app.command("rotate")
def rotate_command(directory: DirectoryArg) -> None:
    """Make a new key generation current; updates under older key ids are then refused."""
    try:
        gen = rotate_keys(directory)
    except (HEError, OSError) as exc:
        raise _fail(exc) from exc
    typer.echo(_describe(gen))


@app.command("show")
def show_command(directory: DirectoryArg) -> None:
    """List the key generations (ids, parameters, file paths); never prints key material."""
    try:
        gens = list_generations(directory)
    except (HEError, OSError) as exc:
        raise _fail(exc) from exc
    for gen in gens:
        typer.echo(_describe(gen))
