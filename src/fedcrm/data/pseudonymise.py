"""Keyed pseudonymisation of customer identifiers (HMAC-SHA-256 with a per-branch key).

Notes:
    A plain hash of a customer number can be reversed by hashing every possible number; a keyed
    HMAC cannot without the key, which never leaves the branch. The same key always maps the
    same id to the same pseudonym, so consent records, manifests and erasure requests keyed by
    pseudonym stay joinable on the branch. Different branches (different keys) give unrelated
    pseudonyms for the same raw id.
"""

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import pandas as pd

KEY_BYTES = 32
PSEUDONYM_PREFIX = "p_"
_PSEUDONYM_HEX = 32  # 128 bits: collisions are negligible for any CRM size


def pseudonymise(customer_id: str, key: bytes) -> str:
    """Return the pseudonym of one raw customer id under ``key``."""
    if len(key) < KEY_BYTES:
        raise ValueError(f"pseudonymisation key must be at least {KEY_BYTES} bytes")
    digest = hmac.new(key, customer_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:_PSEUDONYM_HEX]


def pseudonymise_series(ids: "pd.Series[str]", key: bytes) -> "pd.Series[str]":
    """Pseudonymise a column of raw customer ids."""
    return ids.astype(str).map(lambda raw: pseudonymise(raw, key))


def load_or_create_key(path: Path) -> bytes:
    """Load the branch's pseudonymisation key, creating it (mode 0600) on first use.

    Raises:
        ValueError: The file exists but does not hold a key of the right length.
    """
    if path.exists():
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValueError(
                f"{path}: expected a {KEY_BYTES}-byte key, found {len(key)} bytes; "
                "restore the branch key from its backup (a new key breaks every pseudonym)"
            )
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key
