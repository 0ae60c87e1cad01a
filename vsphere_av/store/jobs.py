"""Durable controller state in ``<state_dir>/jobs.sqlite``: what must survive kill -9.

Called by ``scheduling.Scheduler`` (as its journal), ``controller`` and ``cli``
(``status --json`` reads hosts and isolation). Calls only SQLite.

Tables:
- ``jobs``: every queued or running scan job. After a crash, running rows are interrupted
  work and are queued again (:meth:`JobStore.pending_jobs`).
- ``cursor``: the last processed vCenter event key and its creation time, so a restarted
  controller resumes the event tail where it stopped.
- ``exposures``: per VM and trigger, the moment the stale VM started running and the moments
  it was isolated and found clean; the exposure window is the first of those minus the start.
- ``isolation``: the exact vNIC state before isolation, written *before* the NICs are cut, so
  a crash between the two never loses the state to restore, and a VM is never isolated twice
  (which would remember the disconnected state as the one to restore).
- ``hosts``: host moref -> name, and a controller heartbeat with per-host counts, so
  ``status --json`` and ``scan`` can see a running controller.
- ``requests``: on-demand scans handed over by ``vsphere-av scan`` to a running controller.
- ``audit_outbox``: audit entries of containment steps, written here in the same moment as
  the step (cheap) and moved to the fsynced audit log by one thread right after, so a storm
  of power-ons does not queue behind the audit log; a restart moves what is left first.

Writes use WAL with synchronous=NORMAL: a committed write survives the process dying
(kill -9, a crash), which is what restart safety needs; only a power loss can take the last
few commits. FULL would put an fsync on every containment step and a storm of power-ons
would wait on the disk (the audit log, which is evidence, stays FULL).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_av.errors import StoreError
from vsphere_av.files import open_database
from vsphere_av.models import EventCursor, Job, Priority, TimeWindow

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       INTEGER PRIMARY KEY,
    vm           TEXT NOT NULL,
    host         TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    full         INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    not_before   REAL NOT NULL,
    window       TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    resume_after TEXT NOT NULL,
    running      INTEGER NOT NULL,
    updated      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_vm ON jobs (vm);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursor (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    event_key  INTEGER NOT NULL,
    event_time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exposures (
    exposure_id INTEGER PRIMARY KEY,
    vm          TEXT NOT NULL,
    vm_name     TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    event_key   INTEGER,
    started     REAL NOT NULL,
    seen        REAL NOT NULL,
    isolated    REAL,
    clean       REAL,
    closed      REAL,
    outcome     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS exposures_vm ON exposures (vm);
CREATE TABLE IF NOT EXISTS isolation (
    vm        TEXT PRIMARY KEY,
    vm_name   TEXT NOT NULL,
    nics      TEXT NOT NULL,
    reason    TEXT NOT NULL,
    state     TEXT NOT NULL,          -- 'pending' (intent recorded) | 'isolated'
    since     REAL NOT NULL,
    held      TEXT NOT NULL DEFAULT ''   -- why a clean rescan alone does not release it
);
CREATE TABLE IF NOT EXISTS hosts (
    host   TEXT PRIMARY KEY,
    name   TEXT NOT NULL,
    queued INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS heartbeat (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    pid  INTEGER NOT NULL,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    request_id INTEGER PRIMARY KEY,
    vm         TEXT NOT NULL,
    full       INTEGER NOT NULL,
    created    REAL NOT NULL,
    taken      REAL
);
CREATE TABLE IF NOT EXISTS audit_outbox (
    outbox_id INTEGER PRIMARY KEY,
    action    TEXT NOT NULL,
    details   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_events (
    event_key INTEGER PRIMARY KEY,
    time      REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Exposure:
    """One stale VM's exposure: from ``started`` to isolation or a clean verdict."""

    exposure_id: int
    vm: str
    vm_name: str
    trigger: str
    event_key: int | None
    started: float       # when the VM began running (event time, or when we saw it)
    seen: float          # when the controller learned of it
    isolated: float | None
    clean: float | None
    closed: float | None
    outcome: str

    @property
    def window(self) -> float | None:
        """Seconds exposed: until isolation or a clean verdict, whichever came first."""
        ends = [t for t in (self.isolated, self.clean) if t is not None]
        return max(0.0, min(ends) - self.started) if ends else None


@dataclass(frozen=True)
class IsolationRecord:
    """A VM's vNIC state before isolation, kept until it is restored."""

    vm: str
    vm_name: str
    nics: tuple[Mapping[str, Any], ...]
    reason: str
    state: str
    since: float
    held: str = ""       # set on a detection: only the release rule's rescans release it


@dataclass(frozen=True)
class HostRow:
    """A host as the controller last published it."""

    moref: str
    name: str
    queued: int
    active_scans: int


class JobStore:
    """The controller's SQLite state. Safe to share between threads (one lock, one connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = open_database(path, schema=_SCHEMA, what="job store", synchronous="NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        """Add columns newer than a store written by an older version."""
        with self._tx() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(isolation)")}
            if "held" not in columns:
                db.execute("ALTER TABLE isolation ADD COLUMN held TEXT NOT NULL DEFAULT ''")

    @classmethod
    def open(cls, state_dir: Path | str) -> JobStore:
        """Open (creating if needed) ``<state_dir>/jobs.sqlite``."""
        return cls(Path(state_dir) / "jobs.sqlite")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot write job store {self.path}: {exc}") from exc
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read job store {self.path}: {exc}") from exc

    # -- jobs (scheduling.Journal) ----------------------------------------------------

    def next_ids(self) -> tuple[int, int]:
        """The next free (job_id, seq), never reused even after the rows are deleted."""
        rows = self._query("SELECT name, value FROM counters")
        counters = dict(rows)
        top = self._query("SELECT COALESCE(MAX(job_id), 0), COALESCE(MAX(seq), 0) FROM jobs")[0]
        return (max(int(counters.get("job_id", 0)), int(top[0])) + 1,
                max(int(counters.get("seq", 0)), int(top[1])) + 1)

    def save_job(self, job: Job, *, running: bool) -> None:
        """Insert or replace one job."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO jobs (job_id, vm, host, priority, seq, full, reason,"
                " not_before, window, attempts, resume_after, running, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, job.vm, job.host, int(job.priority), job.seq, int(job.full),
                 job.reason, job.not_before, str(job.window) if job.window else "",
                 job.attempts, job.resume_after, int(running), time.time()))
            for name, value in (("job_id", job.job_id), ("seq", job.seq)):
                db.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT(name)"
                           " DO UPDATE SET value = MAX(value, excluded.value)", (name, value))

    def delete_job(self, job_id: int) -> None:
        """Forget a finished or merged job."""
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def pending_jobs(self) -> list[tuple[Job, bool]]:
        """Every stored job with whether it was running (i.e. interrupted), in queue order."""
        rows = self._query(
            "SELECT job_id, vm, host, priority, seq, full, reason, not_before, window, attempts,"
            " resume_after, running FROM jobs ORDER BY priority, seq")
        return [(Job(job_id=r[0], vm=r[1], host=r[2], priority=Priority(r[3]), seq=r[4],
                     full=bool(r[5]), reason=r[6], not_before=r[7],
                     window=TimeWindow.parse(r[8]) if r[8] else None, attempts=r[9],
                     resume_after=r[10]), bool(r[11])) for r in rows]

    # -- event cursor -----------------------------------------------------------------

    def cursor(self) -> EventCursor | None:
        """The last processed event, or None before the first."""
        rows = self._query("SELECT event_key, event_time FROM cursor WHERE id = 1")
        return EventCursor(int(rows[0][0]), str(rows[0][1])) if rows else None

    def save_cursor(self, cursor: EventCursor) -> None:
        """Remember the last processed event (only moves forward)."""
        with self._tx() as db:
            db.execute("INSERT INTO cursor (id, event_key, event_time) VALUES (1, ?, ?)"
                       " ON CONFLICT(id) DO UPDATE SET event_key = excluded.event_key,"
                       " event_time = excluded.event_time WHERE excluded.event_key > event_key",
                       (cursor.key, cursor.time))

    # -- exposures --------------------------------------------------------------------

    def open_exposure(self, *, vm: str, vm_name: str, trigger: str, started: float, seen: float,
                      event_key: int | None = None) -> int:
        """Record that a stale VM started running; returns the exposure id (reuses an open one)."""
        with self._tx() as db:
            row = db.execute("SELECT exposure_id FROM exposures WHERE vm = ? AND closed IS NULL",
                             (vm,)).fetchone()
            if row:
                return int(row[0])
            cur = db.execute(
                "INSERT INTO exposures (vm, vm_name, trigger, event_key, started, seen)"
                " VALUES (?, ?, ?, ?, ?, ?)", (vm, vm_name, trigger, event_key, started, seen))
            return int(cur.lastrowid or 0)

    def mark_exposure(self, vm: str, *, isolated: float | None = None, clean: float | None = None,
                      outcome: str = "", close: bool = False) -> None:
        """Stamp the open exposure of a VM (first stamp of each kind wins)."""
        with self._tx() as db:
            if isolated is not None:
                db.execute("UPDATE exposures SET isolated = ? WHERE vm = ? AND closed IS NULL"
                           " AND isolated IS NULL", (isolated, vm))
            if clean is not None:
                db.execute("UPDATE exposures SET clean = ? WHERE vm = ? AND closed IS NULL"
                           " AND clean IS NULL", (clean, vm))
            if outcome:
                db.execute("UPDATE exposures SET outcome = ? WHERE vm = ? AND closed IS NULL",
                           (outcome, vm))
            if close:
                db.execute("UPDATE exposures SET closed = ? WHERE vm = ? AND closed IS NULL",
                           (time.time(), vm))

    def exposures(self, vm: str | None = None) -> list[Exposure]:
        """Exposures, oldest first (all, or one VM's)."""
        sql = ("SELECT exposure_id, vm, vm_name, trigger, event_key, started, seen, isolated,"
               " clean, closed, outcome FROM exposures")
        rows = self._query(sql + (" WHERE vm = ?" if vm else "") + " ORDER BY exposure_id",
                           (vm,) if vm else ())
        return [Exposure(*r) for r in rows]

    def open_exposure_for(self, vm: str) -> Exposure | None:
        """The VM's open exposure, if any."""
        rows = [e for e in self.exposures(vm) if e.closed is None]
        return rows[-1] if rows else None

    # -- isolation --------------------------------------------------------------------

    def record_isolation(self, *, vm: str, vm_name: str, nics: Sequence[Mapping[str, Any]],
                         reason: str, state: str) -> bool:
        """Save the pre-isolation NIC state; False (and nothing changed) if one is kept already."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM isolation WHERE vm = ?", (vm,)).fetchone()
            if row is not None:
                if state == "isolated" and row[0] == "pending":
                    db.execute("UPDATE isolation SET state = 'isolated' WHERE vm = ?", (vm,))
                return False
            db.execute("INSERT INTO isolation (vm, vm_name, nics, reason, state, since)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (vm, vm_name, json.dumps(list(nics), sort_keys=True), reason, state,
                        time.time()))
            return True

    def confirm_isolation(self, vm: str) -> None:
        """The NICs are down: the record is no longer only an intent."""
        with self._tx() as db:
            db.execute("UPDATE isolation SET state = 'isolated' WHERE vm = ?", (vm,))

    def isolation(self, vm: str) -> IsolationRecord | None:
        """The VM's kept NIC state, or None when it is not isolated."""
        rows = self._query("SELECT vm, vm_name, nics, reason, state, since, held"
                           " FROM isolation WHERE vm = ?", (vm,))
        return self._iso(rows[0]) if rows else None

    def isolations(self) -> list[IsolationRecord]:
        """Every isolated (or being isolated) VM."""
        rows = self._query("SELECT vm, vm_name, nics, reason, state, since, held"
                           " FROM isolation ORDER BY since")
        return [self._iso(r) for r in rows]

    @staticmethod
    def _iso(row: tuple[Any, ...]) -> IsolationRecord:
        return IsolationRecord(vm=row[0], vm_name=row[1], nics=tuple(json.loads(row[2])),
                               reason=row[3], state=row[4], since=row[5], held=row[6])

    def hold_isolation(self, vm: str, *, held: str) -> None:
        """A detection: the VM stays isolated until a rescan the release rule accepts."""
        with self._tx() as db:
            db.execute("UPDATE isolation SET held = ? WHERE vm = ?", (held, vm))

    def clear_isolation(self, vm: str) -> None:
        """The NICs were restored: forget the kept state."""
        with self._tx() as db:
            db.execute("DELETE FROM isolation WHERE vm = ?", (vm,))

    # -- hosts and heartbeat (for status --json and scan hand-over) ---------------------

    def publish_hosts(self, hosts: Mapping[str, tuple[str, int, int]]) -> None:
        """Replace the host table: moref -> (name, queued, active scans)."""
        with self._tx() as db:
            db.execute("DELETE FROM hosts")
            db.executemany("INSERT INTO hosts (host, name, queued, active) VALUES (?, ?, ?, ?)",
                           [(m, n, q, a) for m, (n, q, a) in hosts.items()])

    def hosts(self) -> list[HostRow]:
        """Hosts as last published, by name."""
        rows = self._query("SELECT host, name, queued, active FROM hosts ORDER BY name, host")
        return [HostRow(*r) for r in rows]

    def beat(self, pid: int) -> None:
        """The controller is alive."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO heartbeat (id, pid, time) VALUES (1, ?, ?)",
                       (pid, time.time()))

    def stop_beating(self, pid: int) -> None:
        """The controller stopped cleanly."""
        with self._tx() as db:
            db.execute("DELETE FROM heartbeat WHERE id = 1 AND pid = ?", (pid,))

    def controller_alive(self, *, max_age: float = 10.0) -> bool:
        """True when a controller beat within ``max_age`` seconds and its process exists."""
        rows = self._query("SELECT pid, time FROM heartbeat WHERE id = 1")
        if not rows or time.time() - float(rows[0][1]) > max_age:
            return False
        try:
            os.kill(int(rows[0][0]), 0)       # the state directory is local: same machine
        except ProcessLookupError:
            return False                      # killed (kill -9) since its last beat
        except PermissionError:
            return True
        return True

    # -- on-demand requests from `vsphere-av scan` ---------------------------------------

    def add_request(self, *, vm: str, full: bool) -> int:
        """Hand an on-demand scan of a VM (moref or name) to the running controller."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO requests (vm, full, created) VALUES (?, ?, ?)",
                             (vm, int(full), time.time()))
            return int(cur.lastrowid or 0)

    def take_requests(self) -> list[tuple[int, str, bool]]:
        """Requests not taken yet (id, vm, full); they are marked taken."""
        with self._tx() as db:
            rows = db.execute("SELECT request_id, vm, full FROM requests WHERE taken IS NULL"
                              " ORDER BY request_id").fetchall()
            db.execute("UPDATE requests SET taken = ? WHERE taken IS NULL", (time.time(),))
        return [(int(r[0]), str(r[1]), bool(r[2])) for r in rows]

    def request_taken(self, request_id: int) -> bool:
        """True once the controller picked the request up."""
        rows = self._query("SELECT taken FROM requests WHERE request_id = ?", (request_id,))
        return bool(rows) and rows[0][0] is not None

    def request(self, request_id: int) -> tuple[str, bool, float, float | None] | None:
        """One request as (vm, full, created, taken), or None: the API's ``GET /scans/ID``."""
        rows = self._query("SELECT vm, full, created, taken FROM requests WHERE request_id = ?",
                           (request_id,))
        if not rows:
            return None
        vm, full, created, taken = rows[0]
        return str(vm), bool(full), float(created), None if taken is None else float(taken)

    # -- audit outbox ---------------------------------------------------------------------

    def outbox_add(self, action: str, details: Mapping[str, Any]) -> int:
        """Queue one audit entry; returns its outbox id."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO audit_outbox (action, details) VALUES (?, ?)",
                             (action, json.dumps(dict(details), sort_keys=True, default=str)))
            return int(cur.lastrowid or 0)

    def outbox(self, *, limit: int = 500) -> list[tuple[int, str, dict[str, Any]]]:
        """Queued audit entries, oldest first."""
        rows = self._query("SELECT outbox_id, action, details FROM audit_outbox"
                           " ORDER BY outbox_id LIMIT ?", (limit,))
        return [(int(r[0]), str(r[1]), json.loads(r[2])) for r in rows]

    def outbox_done(self, outbox_id: int) -> None:
        """One queued entry is in the audit log now."""
        with self._tx() as db:
            db.execute("DELETE FROM audit_outbox WHERE outbox_id = ?", (outbox_id,))

    # -- small named values (e.g. the signature version last swept) ----------------------

    def get_meta(self, name: str) -> str | None:
        """A stored value, or None."""
        rows = self._query("SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, name: str, value: str) -> None:
        """Store a value."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    # -- processed events (so a replayed event is not handled twice) ---------------------

    def seen_event(self, key: int) -> bool:
        """True if this event key was handled before."""
        return bool(self._query("SELECT 1 FROM seen_events WHERE event_key = ?", (key,)))

    def mark_events(self, keys: Sequence[int]) -> None:
        """Remember handled event keys (kept for a day)."""
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO seen_events (event_key, time) VALUES (?, ?)",
                           [(k, now) for k in keys])
            db.execute("DELETE FROM seen_events WHERE time < ?", (now - 86400,))
