"""API bearer tokens: created once, stored only as SHA-256 hashes, each with a name and a role.

Called by ``cli`` (``api token create | list | revoke``) and by ``api.server`` (every
request's ``Authorization: Bearer`` or the dashboard's session cookie, through
:meth:`TokenStore.authenticate`). Calls ``files`` (``<state_dir>/api-tokens.sqlite``,
0600) and ``store.audit`` (creation and revocation are audited with the CLI caller as actor).

A token is ``vsav_`` + 43 URL-safe characters (256 random bits): hashing it with plain
SHA-256 is enough (there is nothing to brute-force, unlike a password), and lets a request
be checked with one indexed lookup. The token itself is returned once by :meth:`create` and
never stored, logged or audited.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_av.app import access
from vsphere_av.errors import ConfigError, NotFound
from vsphere_av.files import open_database
from vsphere_av.store.audit import AuditLog

TOKEN_PREFIX = "vsav_"
# The names a person types (--role) -> the access roles of ``app.access``.
ROLE_NAMES: dict[str, str] = {"security_admin": access.SECURITY,
                              "infrastructure_admin": access.INFRASTRUCTURE,
                              "auditor": access.AUDITOR}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    name     TEXT PRIMARY KEY,
    role     TEXT NOT NULL,
    hash     TEXT NOT NULL UNIQUE,
    created  REAL NOT NULL,
    creator  TEXT NOT NULL,
    revoked  REAL
);
"""


@dataclass(frozen=True)
class TokenInfo:
    """One token as stored (never the token itself)."""

    name: str
    role: str          # security_admin | infrastructure_admin | auditor
    created: float
    creator: str
    revoked: float | None

    @property
    def access_role(self) -> str:
        """The ``app.access`` role this token acts with."""
        return ROLE_NAMES[self.role]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``api token list --json``)."""
        from datetime import UTC, datetime

        def iso(t: float | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(
                timespec="seconds")

        return {"name": self.name, "role": self.role, "created": iso(self.created),
                "creator": self.creator, "revoked": iso(self.revoked)}


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The token table; safe to share between the server's threads."""

    def __init__(self, *, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._db = open_database(self.state_dir / "api-tokens.sqlite", schema=_SCHEMA,
                                 what="API token store")
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, *, name: str, role: str, actor: str) -> str:
        """Create a token; returns it (the only time it exists outside the caller's hands)."""
        if role not in ROLE_NAMES:
            raise ConfigError(f"role must be one of {', '.join(ROLE_NAMES)}, not {role!r}")
        if not _NAME.match(name):
            raise ConfigError(f"token name {name!r}: 1-64 letters, digits, . _ @ -, "
                              "starting with a letter or digit")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            if self._db.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).fetchone():
                raise ConfigError(f"a token named {name!r} exists (revoked ones keep their name"
                                  " in the audit trail; choose another)")
            self._db.execute("INSERT INTO tokens (name, role, hash, created, creator) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (name, role, token_hash(token), time.time(), actor))
        with AuditLog.open(self.state_dir) as log:
            log.append(actor=actor, action="api.token.create", details={"name": name,
                                                                         "role": role})
        return token

    def list(self) -> list[TokenInfo]:
        """Every token, revoked ones included, by name."""
        with self._lock:
            rows = self._db.execute("SELECT name, role, created, creator, revoked FROM tokens "
                                    "ORDER BY name").fetchall()
        return [TokenInfo(name=r[0], role=r[1], created=r[2], creator=r[3], revoked=r[4])
                for r in rows]

    def revoke(self, name: str, *, actor: str) -> TokenInfo:
        """Revoke a token by name (it stops working at once); NotFound when unknown."""
        with self._lock:
            cur = self._db.execute("UPDATE tokens SET revoked = ? WHERE name = ? AND "
                                   "revoked IS NULL", (time.time(), name))
            changed = cur.rowcount
        info = {t.name: t for t in self.list()}.get(name)
        if info is None:
            raise NotFound(f"no API token named {name!r}")
        if changed:
            with AuditLog.open(self.state_dir) as log:
                log.append(actor=actor, action="api.token.revoke",
                           details={"name": name, "role": info.role})
        return info

    def live(self, name: str) -> bool:
        """True while the token called ``name`` exists and is not revoked (open streams)."""
        with self._lock:
            row = self._db.execute("SELECT revoked FROM tokens WHERE name = ?",
                                   (name,)).fetchone()
        return row is not None and row[0] is None

    def authenticate(self, token: str) -> TokenInfo | None:
        """The live token ``token`` is, or None (unknown, malformed or revoked)."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        digest = token_hash(token)
        with self._lock:
            row = self._db.execute("SELECT name, role, created, creator, revoked, hash "
                                   "FROM tokens WHERE hash = ?", (digest,)).fetchone()
        if row is None or row[4] is not None or not hmac.compare_digest(row[5], digest):
            return None
        return TokenInfo(name=row[0], role=row[1], created=row[2], creator=row[3], revoked=None)
