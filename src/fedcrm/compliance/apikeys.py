"""API keys of the compliance service: random tokens, stored only as SHA-256 hashes.

A token reads ``fcrm_<key id>_<secret>``: the key id (8 random bytes, hex) finds the row, the
secret (32 random bytes from :mod:`secrets`, URL-safe base64) makes it unguessable. Only
``SHA-256(token)`` is stored; a token is shown once, when created.

Notes:
    A fast hash is enough here (unlike passwords): the secret has 256 bits of entropy, so a
    stolen hash cannot be brute-forced. The comparison is constant-time
    (:func:`hmac.compare_digest`), and an unknown key id costs the same comparison, so response
    times do not reveal which key ids exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fedcrm.compliance._types import utcnow
from fedcrm.compliance.db import transaction
from fedcrm.compliance.enums import Role
from fedcrm.compliance.errors import ApiKeyError
from fedcrm.compliance.models import ApiKey

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "fcrm"
_TOKEN_PATTERN = re.compile(r"fcrm_([0-9a-f]{16})_([A-Za-z0-9_\-]{43})")
_BRANCH_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_DUMMY_HASH = hashlib.sha256(b"fedcrm-no-such-key").digest()


def hash_token(token: str) -> bytes:
    """Return the SHA-256 digest stored for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: key id, role and (for the branch role) its branch."""

    key_id: str
    role: Role
    branch: str | None

    def can_access_branch(self, branch: str) -> bool:
        """Whether this caller may see or change per-customer data of ``branch``."""
        if self.role is Role.OFFICER:
            return True
        return self.role is Role.BRANCH and self.branch == branch


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """An API key as listed (never its token or hash)."""

    key_id: str
    role: Role
    branch: str | None
    label: str
    created_at: datetime
    revoked_at: datetime | None


def _info(row: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        row.key_id, Role(row.role), row.branch, row.label, row.created_at, row.revoked_at
    )


class ApiKeyStore:
    """Create, check and revoke API keys.

    Args:
        session_factory: From :func:`fedcrm.compliance.db.open_store`.
    """

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def create(
        self, role: Role | str, *, label: str, branch: str | None = None
    ) -> tuple[ApiKeyInfo, str]:
        """Create a key and return it with its token (shown this once, never stored).

        Args:
            role: officer, branch or researcher.
            label: Who or what holds it (e.g. ``dpo-laptop``); no secrets.
            branch: The branch of a ``branch`` key; must be None for the other roles.

        Raises:
            ApiKeyError: Unknown role, a branch key without branch, or a branch on another role.
        """
        problems: list[str] = []
        try:
            chosen = Role(role)
        except ValueError:
            allowed = ", ".join(member.value for member in Role)
            raise ApiKeyError(f"role must be one of {allowed}; got {role!r}") from None
        if chosen is Role.BRANCH and (branch is None or not _BRANCH_PATTERN.fullmatch(branch)):
            problems.append("a branch key needs its branch (1-128 characters: letters, _.:-)")
        if chosen is not Role.BRANCH and branch is not None:
            problems.append(f"an {chosen} key is not bound to a branch")
        if not label.strip() or len(label) > 128:
            problems.append("label must be 1-128 characters")
        if problems:
            raise ApiKeyError("; ".join(problems))
        key_id = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        row = ApiKey(
            key_id=key_id,
            token_hash=hash_token(token),
            role=chosen,
            branch=branch,
            label=label,
            created_at=utcnow(),
            revoked_at=None,
        )
        with transaction(self._factory) as session:
            session.add(row)
        logger.info("api key %s created (role %s)", key_id, chosen)
        return _info(row), token

    def authenticate(self, token: str) -> Principal | None:
        """Return the caller of a token, or None if it is malformed, unknown or revoked."""
        match = _TOKEN_PATTERN.fullmatch(token)
        key_id = match.group(1) if match else ""
        with self._factory() as session:
            row = session.get(ApiKey, key_id) if match else None
        expected = _DUMMY_HASH if row is None else row.token_hash
        matches = hmac.compare_digest(hash_token(token), expected)
        if row is None or not matches or row.revoked_at is not None:
            return None
        return Principal(row.key_id, Role(row.role), row.branch)

    def revoke(self, key_id: str) -> bool:
        """Revoke a key; return False if there is no such active key.

        ``api_keys`` rows are updated only here (``revoked_at``); keys are never deleted, so the
        audit trail of who held which key stays.
        """
        with transaction(self._factory) as session:
            row = session.execute(
                select(ApiKey).where(ApiKey.key_id == key_id).with_for_update()
            ).scalar_one_or_none()
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
        logger.info("api key %s revoked", key_id)
        return True

    def list(self) -> list[ApiKeyInfo]:
        """Return every key, oldest first (without tokens or hashes)."""
        with self._factory() as session:
            rows = session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars()
            return [_info(row) for row in rows]
