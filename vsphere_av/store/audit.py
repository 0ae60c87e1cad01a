"""Tamper-evident audit log: append-only, every entry chained to the previous by SHA-256.

Called by everything that changes protection (scans, remediation, quarantine, signatures,
appliances, configuration), by ``store.siem`` (checkpoints) and by ``cli`` (``audit verify``
/ ``head`` / ``export``). Calls SQLite (``<state_dir>/audit.sqlite``; ``state.sqlite`` read
only, to tell an emptied log from a new one) and ``files`` (files 0600).

Each entry stores ``hash = sha256(prev_hash || canonical JSON of seq, time, actor, action,
details)``. Altering, removing or reordering any entry breaks the chain from that entry on;
truncating the tail is caught by the head record kept in a second table and in the file
``audit.head`` beside the database (moved forward after every append, under a file lock,
by whichever process appends), so an attacker must rewrite three places consistently. The
file may lag by the entries of a crash between commit and its write, but it must always
name a real entry of the chain.

Whoever holds the service account can still rewrite all three places, or the whole log: the
head is anchored off the box too. Every SIEM forward ends with a checkpoint entry
(``audit.checkpoint``, naming the chain head it follows) that is forwarded itself, and
``audit head`` prints the head for an operator or a scheduler to keep; ``verify(head=...)``
fails when that entry is gone or differs. An empty (or missing) log in a state directory
with history (VMs, scans, quarantine items in ``state.sqlite``, quarantined files, a SIEM
cursor past entry 0) does not verify either. Writes are durable (WAL, synchronous=FULL) before
``append`` returns, so a crash never loses an acknowledged entry.

Secrets never reach this module: callers pass only names and identifiers. As a second
line of defence, keys that look like secrets are refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vsphere_av.errors import AuditIntegrityError, ConfigError, StoreError
from vsphere_av.files import open_database, private_file

GENESIS = "0" * 64
CHECKPOINT = "audit.checkpoint"      # forwarded last in each SIEM round: names the chain head
SIEM_CURSOR_FILE = "siem-cursor.json"
_SECRET_KEYS = ("password", "secret", "token", "private_key")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq       INTEGER PRIMARY KEY,
    time      TEXT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    details   TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class AuditEntry:
    """One audit record."""

    seq: int
    time: str
    actor: str
    action: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON export."""
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class Verification:
    """Result of walking the chain."""

    ok: bool
    entries: int
    first_bad_seq: int | None = None
    message: str = ""


def caller(*, state_dir: Path | None = None) -> str:
    """The person acting: SUDO_USER when the command runs as root or as the owner of
    ``state_dir`` (accounts reached through sudo), else the account's own name. "root"
    when root used sudo (Ansible's become does): root holds everything anyway."""
    own = account()
    sudo_user = os.environ.get("SUDO_USER", "")
    if sudo_user and sudo_user != own and privileged(state_dir):
        return sudo_user
    return own


def account() -> str:
    """The name of the effective user (from the uid, never from USER or LOGNAME)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid:{os.geteuid()}"


def privileged(state_dir: Path | None) -> bool:
    """Running as root or as the state directory's owner (the service account)."""
    if os.geteuid() == 0:
        return True
    if state_dir is None:
        return False
    try:
        return Path(state_dir).stat().st_uid == os.geteuid()
    except OSError:
        return False


def current_actor(*, state_dir: Path | str | None = None) -> str:
    """Who is acting: VSPHERE_AV_ACTOR if set (the controller names itself), else the person
    (``access.caller``: SUDO_USER when running as root or as the owner of ``state_dir``)."""
    person = caller(state_dir=Path(state_dir) if state_dir is not None else None)
    actor = os.environ.get("VSPHERE_AV_ACTOR")
    if actor and "SUDO_USER" not in os.environ:   # a person through sudo cannot rename
        return actor
    return person


def entry_hash(
    *, prev_hash: str, seq: int, time: str, actor: str, action: str, details: Mapping[str, Any]
) -> str:
    """The chained hash of one entry."""
    body = json.dumps(
        {"seq": seq, "time": time, "actor": actor, "action": action, "details": details},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _check_no_secrets(details: Mapping[str, Any], where: str = "details") -> None:
    for key, value in details.items():
        if any(s in key.lower() for s in _SECRET_KEYS):
            raise StoreError(f"audit {where} must not carry secrets (key {key!r})")
        if isinstance(value, Mapping):
            _check_no_secrets(value, f"{where}.{key}")


class AuditLog:
    """The hash-chained audit log of one state directory. Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.head_path = path.with_name("audit.head")
        self._lock = threading.Lock()
        self._was_missing = not path.exists()
        self._db = open_database(path, schema=_SCHEMA, what="audit log")
        private_file(self.head_path)

    @classmethod
    def open(cls, state_dir: Path | str) -> AuditLog:
        """Open (creating if needed) ``<state_dir>/audit.sqlite``."""
        return cls(Path(state_dir) / "audit.sqlite")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(
        self, *, actor: str, action: str, details: Mapping[str, Any] | None = None
    ) -> AuditEntry:
        """Append one entry durably and return it."""
        return self._append(actor=actor, action=action, details=details)

    def checkpoint(self, *, actor: str) -> AuditEntry:
        """Append a checkpoint naming the current head (seq and hash), unless the last entry
        already is one (then return it): checkpoints never follow only checkpoints."""
        return self._append(actor=actor, action=CHECKPOINT, details=None, checkpoint=True)

    def _append(self, *, actor: str, action: str, details: Mapping[str, Any] | None,
                checkpoint: bool = False) -> AuditEntry:
        details = dict(details or {})
        _check_no_secrets(details)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute(
                    "SELECT seq, hash, action FROM audit ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                seq, prev = (row[0] + 1, row[1]) if row else (1, GENESIS)
                if checkpoint and row and row[2] == CHECKPOINT:
                    self._db.execute("ROLLBACK")
                    return next(self.entries(after=row[0] - 1, limit=1))
                if checkpoint:
                    details = {"head_seq": seq - 1, "head_hash": prev}
                now = datetime.now(UTC).isoformat(timespec="microseconds")
                digest = entry_hash(
                    prev_hash=prev, seq=seq, time=now, actor=actor, action=action, details=details
                )
                self._db.execute(
                    "INSERT INTO audit (seq, time, actor, action, details, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        seq,
                        now,
                        actor,
                        action,
                        json.dumps(details, sort_keys=True, default=str),
                        prev,
                        digest,
                    ),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, ?, ?)",
                    (seq, digest),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot write audit log {self.path}: {exc}") from exc
            self._write_head(seq, digest)
        return AuditEntry(seq, now, actor, action, details, prev, digest)

    def _write_head(self, seq: int, digest: str) -> None:
        # Several processes append (serve and CLI commands): the file is only ever moved
        # forward, under an inter-process lock, and written through a private temporary
        # file, so a slower writer never puts an older head back.
        lock_path = self.head_path.with_suffix(".lock")
        private_file(lock_path, create=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read_head_file()
            if current is not None and current[0] >= seq:
                return
            tmp = self.head_path.with_suffix(f".tmp.{os.getpid()}.{threading.get_ident()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(f"{seq} {digest}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.head_path)

    def _read_head_file(self) -> tuple[int, str] | None:
        """(seq, hash) from ``audit.head``; None when absent; (-1, "") when malformed."""
        try:
            parts = self.head_path.read_text(encoding="ascii", errors="replace").split()
        except FileNotFoundError:
            return None
        if len(parts) == 2 and parts[0].isdigit():
            return int(parts[0]), parts[1]
        return -1, ""

    def head(self) -> tuple[int, str]:
        """The last entry's (seq, hash); (0, GENESIS) when the log is empty."""
        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def news_after(self, seq: int) -> bool:
        """True when an entry other than a checkpoint follows entry ``seq``."""
        return self._db.execute("SELECT 1 FROM audit WHERE seq > ? AND action != ? LIMIT 1",
                                (seq, CHECKPOINT)).fetchone() is not None

    def entries(self, *, after: int = 0, limit: int | None = None,
                until: int | None = None) -> Iterator[AuditEntry]:
        """Entries in stored order (by seq): those after ``after`` and up to ``until``, at
        most ``limit``."""
        cur = self._db.execute(
            "SELECT seq, time, actor, action, details, prev_hash, hash FROM audit"
            " WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            (after, 2**63 - 1 if until is None else until, -1 if limit is None else limit)
        )
        for seq, time, actor, action, details, prev, digest in cur:
            try:
                parsed = json.loads(details)
            except json.JSONDecodeError:
                parsed = {"_unparseable": details}
            yield AuditEntry(seq, time, actor, action, parsed, prev, digest)

    def verify(self, *, head: tuple[int, str] | None = None) -> Verification:
        """Walk the chain; report the first entry that does not verify. ``head`` is a
        (seq, hash) kept from ``audit head`` or a checkpoint at the SIEM: that entry must
        still be in the log, unchanged."""
        prev = GENESIS
        expected_seq = 1
        count = 0
        for entry in self.entries():
            count += 1
            if entry.seq != expected_seq:
                return Verification(
                    False,
                    count,
                    expected_seq,
                    f"entry {expected_seq} is missing (next stored entry is {entry.seq})",
                )
            if entry.prev_hash != prev:
                return Verification(
                    False,
                    count,
                    entry.seq,
                    f"entry {entry.seq} does not chain to entry {entry.seq - 1}",
                )
            digest = entry_hash(
                prev_hash=entry.prev_hash,
                seq=entry.seq,
                time=entry.time,
                actor=entry.actor,
                action=entry.action,
                details=entry.details,
            )
            if digest != entry.hash:
                return Verification(False, count, entry.seq, f"entry {entry.seq} was altered")
            prev = entry.hash
            expected_seq += 1
        last_seq = expected_seq - 1
        if head is not None and head[0] > last_seq:
            return Verification(False, count, last_seq + 1,
                                f"the kept head names entry {head[0]}, but the log ends at "
                                f"entry {last_seq}: entries were removed")
        if head is not None and head[0] and self._stored_hash(head[0]) != head[1].lower():
            return Verification(False, count, head[0],
                                f"entry {head[0]} differs from the kept head: the log was "
                                "rewritten")
        if not count and (history := self._history()):
            what = "missing" if self._was_missing else "empty"
            return Verification(False, 0, 1, f"the log is {what} but the state directory has "
                                f"history ({history})")
        row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        if row and (int(row[0]) != last_seq or (last_seq and str(row[1]) != prev)):
            # Written in the same transaction as the entry: it must match exactly.
            return Verification(
                False, count, min(int(row[0]), last_seq) + 1,
                f"head record says the log ends at entry {row[0]}, but it ends at {last_seq}")
        head = self._read_head_file()
        if head is None:
            if last_seq:
                return Verification(False, count, last_seq + 1,
                                    f"{self.head_path.name} is missing")
        elif head[0] < 0:
            return Verification(False, count, last_seq + 1, f"{self.head_path.name} is malformed")
        elif head[0] > last_seq:
            # Entries the file saw are gone: the tail was cut.
            return Verification(
                False, count, last_seq + 1,
                f"head file says the log ends at entry {head[0]}, but it ends at {last_seq}")
        elif head[0] and self._stored_hash(head[0]) != head[1]:
            # The file may lag (a crash between commit and its write) but must name a real entry.
            return Verification(False, count, head[0],
                                f"entry {head[0]} does not match the head file")
        return Verification(True, count)

    def _history(self) -> str:
        """What in the state directory shows that entries were written ("" when nothing)."""
        state_dir = self.path.parent
        found: list[str] = []
        head = self._read_head_file()
        if head is not None and head[0] != 0:
            found.append(f"{self.head_path.name} names entry {head[0]}")
        try:
            cursor = json.loads((state_dir / SIEM_CURSOR_FILE).read_text(encoding="utf-8"))
            if int(cursor.get("seq", 0)):
                found.append(f"{SIEM_CURSOR_FILE} says entry {cursor['seq']} was forwarded")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError):
            found.append(f"{SIEM_CURSOR_FILE} exists")
        state = state_dir / "state.sqlite"
        if state.exists():
            found += _state_history(state)
        quarantine = state_dir / "quarantine"
        if quarantine.is_dir() and any(quarantine.glob("*.qbin")):
            found.append("quarantined files")
        return ", ".join(found)

    def _stored_hash(self, seq: int) -> str | None:
        row = self._db.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
        return str(row[0]) if row else None

    def require_intact(self) -> None:
        """Raise AuditIntegrityError when the chain does not verify."""
        result = self.verify()
        if not result.ok:
            raise AuditIntegrityError(
                f"audit log broken at entry {result.first_bad_seq}: {result.message}"
            )


def _state_history(path: Path) -> list[str]:
    """Rows that only exist after audited work, counted read-only in ``state.sqlite``."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return [f"{path.name} cannot be read: {exc}"]
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        found = []
        for table, what in (("vms", "VMs"), ("scans", "scans"), ("detections", "detections"),
                            ("quarantine", "quarantine items")):
            if table in tables:
                n = int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
                if n:
                    found.append(f"{n} {what}")
        return [f"{path.name} holds {', '.join(found)}"] if found else []
    except sqlite3.Error as exc:
        return [f"{path.name} cannot be read: {exc}"]
    finally:
        db.close()


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` as ``audit head`` prints it; ConfigError when it is not that."""
    seq, _, digest = text.strip().partition(":")
    if not (seq.isascii() and seq.isdigit()) or len(digest) != 64 or any(
            c not in "0123456789abcdef" for c in digest.lower()):
        raise ConfigError(f"--head must be SEQ:HASH as 'audit head' prints it (a number, a colon "
                         f"and 64 hex digits), not {text!r}")
    return int(seq), digest.lower()


_CEF_SEVERITY = {
    "detection": 8,
    "remediation": 6,
    "quarantine": 5,
    "isolation": 7,
    "signatures": 3,
    "scan": 2,
    "appliance": 4,
    "config": 5,
    "tag": 4,
    "access": 6,
}


def _cef_escape_header(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|")


def _cef_escape_ext(value: str) -> str:
    return value.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r").replace("\n", "\\n")


def cef_severity(action: str) -> int:
    """CEF severity (0-10) of an audit action, by its family ("detection", "scan", ...)."""
    return _CEF_SEVERITY.get(action.split(".", 1)[0], 3)


def to_cef(entry: AuditEntry, *, version: str) -> str:
    """One entry as an ArcSight CEF:0 line, the form SIEMs take from antivirus products."""
    severity = cef_severity(entry.action)
    details = entry.details
    name = entry.action
    if details.get("threat"):
        name = f"{entry.action}: {details['threat']}"
    ext: dict[str, Any] = {
        "rt": entry.time,
        "suser": entry.actor,
        "act": entry.action,
        "cs1Label": "auditSeq",
        "cs1": entry.seq,
        "cs2Label": "auditHash",
        "cs2": entry.hash,
    }
    mapping = {
        "vm": "dhost",
        "path": "filePath",
        "sha256": "fileHash",
        "host": "dvchost",
        "threat": "cs3",
        "action_taken": "outcome",
    }
    for key, cef_key in mapping.items():
        if key in details and details[key] not in (None, ""):
            ext[cef_key] = details[key]
    if "cs3" in ext:
        ext["cs3Label"] = "threat"
    rest = {k: v for k, v in details.items() if k not in mapping}
    if rest:
        ext["msg"] = json.dumps(rest, sort_keys=True, default=str)
    header = "|".join(
        _cef_escape_header(str(x))
        for x in ("CEF:0", "vsphere-av", "vsphere-av", version, entry.action, name, severity)
    )
    return header + "|" + " ".join(f"{k}={_cef_escape_ext(str(v))}" for k, v in ext.items())


def to_jsonl(entry: AuditEntry) -> str:
    """One entry as a JSON line."""
    return json.dumps(entry.as_dict(), sort_keys=True, default=str)


class AuditOnUse:
    """The audit log of a state directory, opened for each entry and closed again: a
    ``models.Audit`` for short commands that usually record nothing (``signatures list``,
    ``scan-files``, ``engine serve``: the signature store records through it)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)

    def __repr__(self) -> str:
        return f"AuditOnUse({str(self.state_dir)!r})"

    def append(self, *, actor: str, action: str,
               details: Mapping[str, Any] | None = None) -> AuditEntry:
        """Append one entry durably (see :meth:`AuditLog.append`)."""
        with AuditLog.open(self.state_dir) as log:
            return log.append(actor=actor, action=action, details=details)
