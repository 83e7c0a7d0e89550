"""Where a branch's data, keys, accountants and consent live: resolved from its node.

A deployed SuperNode names everything in its node config (``data-path``, ``key-path``,
``branch-name``, ``privacy-dir``, ``consent-db``, ...); a simulated branch has its own folder
``branches/NNN/`` of the run (by ``partition-id``), with its ``branch.json`` and HMAC key.
"""

import json
from datetime import timedelta
from pathlib import Path

from flwr.app import Context

from fedcrm import wire as k
from fedcrm.client.consent_gate import BranchConsent, consent_url, parse_purposes
from fedcrm.client.dp_round import BranchPrivacy, accountant_key
from fedcrm.data.pseudonymise import load_or_create_key
from fedcrm.exceptions import ConfigError
from fedcrm.tasks import BranchSource

KEY_FILE = "hmac.key"
"""A branch's HMAC key in its folder, when the node config names no ``key-path``."""


def branch_dir(root: Path, partition_id: int) -> Path:
    """Folder of simulated branch number ``partition_id`` under a run's ``branches/``."""
    return root / f"{partition_id:03d}"


def _info(folder: Path) -> dict[str, object]:
    """A simulated branch's ``branch.json`` (empty when there is none)."""
    path = folder / "branch.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def resolve_source(
    context: Context, branches_root: Path | None, simulation: object | None
) -> BranchSource:
    """The branch a node serves: its export and key (deployment) or its simulated folder.

    Raises:
        ConfigError: The node has neither a ``data-path`` nor a simulated partition.
    """
    node = context.node_config
    partition = node.get(k.NODE_PARTITION_ID)
    if k.NODE_DATA_PATH in node:
        data_path = Path(str(node[k.NODE_DATA_PATH]))
        folder = data_path.parent
        key_path = Path(str(node[k.NODE_KEY_PATH])) if k.NODE_KEY_PATH in node else None
        info: dict[str, object] = {}
        number = context.node_id
    elif branches_root is not None and isinstance(partition, int):
        data_path = None
        folder = branch_dir(branches_root, partition)
        key_path = folder / KEY_FILE if (folder / KEY_FILE).is_file() else None
        info = _info(folder)
        number = partition
    else:
        raise ConfigError(
            "this SuperNode has no data: start it with --node-config "
            '\'data-path="/path/export.csv" key-path="/path/branch.key"\''
        )
    name = node.get(k.NODE_BRANCH_NAME) or info.get("name") or f"node-{context.node_id}"
    return BranchSource(
        folder=folder,
        name=str(name),
        number=number,
        data_path=data_path,
        key=None if key_path is None else load_or_create_key(key_path),
        node_config=dict(node),
        simulation=None if data_path is not None else simulation,
    )


def resolve_consent(context: Context, source: BranchSource, url: str | None) -> BranchConsent:
    """Where this branch's consent registry, salts and manifests are, and what it collects for.

    Deployment: node config ``consent-db``, ``consent-dir`` (default ``consent/`` beside the
    export), ``purposes`` and ``retention-days``. Simulation: the run's compliance store
    (``url``), the branch's folder and the purposes in its ``branch.json``.

    Raises:
        ConfigError: The node has no consent registry, or a setting is invalid.
    """
    node = context.node_config
    if k.NODE_CONSENT_DB in node:
        url = consent_url(str(node[k.NODE_CONSENT_DB]))
    if url is None:
        raise ConfigError(
            "this run declares a purpose but the branch has no consent registry: start the "
            "SuperNode with --node-config 'consent-db=\"/srv/crm/consent.db\"'"
        )
    declared = None if source.data_path is not None else _info(source.folder).get("purposes")
    purposes = node.get(k.NODE_PURPOSES, declared)
    if isinstance(purposes, list):
        purposes = ",".join(str(p) for p in purposes)
    retention = node.get(k.NODE_RETENTION_DAYS)
    if retention is not None and (not isinstance(retention, int | float) or retention <= 0):
        raise ConfigError(f"retention-days must be a positive number, got {retention!r}")
    return BranchConsent(
        url=url,
        branch=source.name,
        folder=Path(str(node.get(k.NODE_CONSENT_DIR, source.folder / "consent"))),
        collected=None if purposes is None else parse_purposes(str(purposes)),
        retention=None if retention is None else timedelta(days=float(retention)),
    )


PRIVACY_KEY_FILE = "accountant.key"
"""The HMAC key of a simulated branch's accountants in a shared privacy store (runs come and
go with their own branch keys; the store's accountants stay)."""


def branch_privacy(context: Context, source: BranchSource) -> BranchPrivacy:
    """Where the branch keeps its persistent accountants, and their HMAC key.

    Deployment: node config ``privacy-dir`` (default ``privacy/`` beside the export), keyed by
    the branch key. Simulation: the shared privacy store its ``branch.json`` names
    (``privacy-dir``, with its own ``accountant.key``), else ``privacy/`` in the run's branch
    folder (that run only).
    """
    node = context.node_config
    if k.NODE_PRIVACY_DIR in node:
        folder = Path(str(node[k.NODE_PRIVACY_DIR]))
    elif source.data_path is None and isinstance(
        store := _info(source.folder).get("privacy-dir"), str
    ):
        folder = Path(store)
        key = load_or_create_key(folder / PRIVACY_KEY_FILE)
        return BranchPrivacy(folder, source.name, accountant_key(key))
    else:
        folder = source.folder / "privacy"
    return BranchPrivacy(folder, source.name, accountant_key(source.key))
