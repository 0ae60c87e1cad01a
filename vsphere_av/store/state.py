"""Protection state in SQLite: VMs, scans, detections, the per-file index, quarantine records.

Called by ``scan.job`` (through the collaborator it is given), ``store.quarantine``,
``app`` and the CLI; later the controller adds its jobs table here. Calls only SQLite
(``<state_dir>/state.sqlite``, WAL, synchronous=FULL so an acknowledged write survives a
crash). One connection shared by threads behind a lock: writes are short.

The per-file index answers two questions: "was this exact file (path, size, mtime) already
found clean in this VM under this signature version?" (incremental scans) and the same
question across all VMs (clone sharing, used by the controller).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vsphere_av.errors import StoreError
from vsphere_av.files import open_database
from vsphere_av.models import (
    INFECTED,
    PROTECTED,
    STALE,
    UNPROTECTED,
    DetectionId,
    DetectionRecord,
    FileRecord,
    QuarantineId,
    QuarantineItem,
    ScanId,
    VmId,
    VmInfo,
    VmState,
)

SCHEMA_VERSION = 2         # 2: scans.via

# How a scan read the VM's files: Guest Operations or its virtual disks (``scan.sources.disk``).
VIA_GUEST = "guest"
VIA_DISK = "disk"

# A detection's action while its remediation runs: written before the guest is changed, so a
# crash in between leaves a row to finish (``scan.job`` resolves it on the VM's next scan).
PENDING = "pending"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    moref             TEXT PRIMARY KEY,
    instance_uuid     TEXT NOT NULL DEFAULT '',
    name              TEXT NOT NULL,
    host              TEXT NOT NULL DEFAULT '',
    host_moref        TEXT NOT NULL DEFAULT '',
    state             TEXT NOT NULL DEFAULT 'unprotected',
    reason            TEXT NOT NULL DEFAULT 'never scanned',
    last_scan         TEXT NOT NULL DEFAULT '',
    last_full_scan    TEXT NOT NULL DEFAULT '',
    clean_signature_version INTEGER,
    present           INTEGER NOT NULL DEFAULT 1,
    updated           TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS scans (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_moref          TEXT NOT NULL,
    vm_name           TEXT NOT NULL,
    host              TEXT NOT NULL DEFAULT '',
    started           TEXT NOT NULL,
    finished          TEXT NOT NULL DEFAULT '',
    full              INTEGER NOT NULL DEFAULT 0,
    status            TEXT NOT NULL DEFAULT 'running',
    reason            TEXT NOT NULL DEFAULT '',
    signature_version INTEGER,
    scanned           INTEGER NOT NULL DEFAULT 0,
    unchanged         INTEGER NOT NULL DEFAULT 0,
    skipped           INTEGER NOT NULL DEFAULT 0,
    errors            INTEGER NOT NULL DEFAULT 0,
    detections        INTEGER NOT NULL DEFAULT 0,
    bytes             INTEGER NOT NULL DEFAULT 0,
    via               TEXT NOT NULL DEFAULT 'guest'
);
CREATE INDEX IF NOT EXISTS scans_vm ON scans (vm_moref, id);
CREATE TABLE IF NOT EXISTS detections (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    scan_id           INTEGER NOT NULL,
    vm_moref          TEXT NOT NULL,
    vm_name           TEXT NOT NULL,
    path              TEXT NOT NULL,
    threat            TEXT NOT NULL,
    rule              TEXT NOT NULL DEFAULT '',
    source            TEXT NOT NULL DEFAULT '',
    member            TEXT NOT NULL DEFAULT '',
    sha256            TEXT NOT NULL DEFAULT '',
    size              INTEGER NOT NULL DEFAULT 0,
    action            TEXT NOT NULL DEFAULT 'reported',
    detail            TEXT NOT NULL DEFAULT '',
    quarantine_id     TEXT NOT NULL DEFAULT '',
    time              TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS detections_vm ON detections (vm_moref, id);
CREATE TABLE IF NOT EXISTS scan_files (
    scan_id           INTEGER NOT NULL,
    path              TEXT NOT NULL,
    kind              TEXT NOT NULL,
    reason            TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS scan_files_scan ON scan_files (scan_id);
CREATE TABLE IF NOT EXISTS files (
    vm_moref          TEXT NOT NULL,
    path              TEXT NOT NULL,
    size              INTEGER NOT NULL,
    mtime             TEXT NOT NULL,
    sha256            TEXT NOT NULL,
    signature_version INTEGER NOT NULL,
    verdict           TEXT NOT NULL,
    scanned_at        TEXT NOT NULL,
    PRIMARY KEY (vm_moref, path)
);
CREATE INDEX IF NOT EXISTS files_shared ON files (path, size, mtime, signature_version);
CREATE TABLE IF NOT EXISTS quarantine (
    id                TEXT PRIMARY KEY,
    vm_moref          TEXT NOT NULL,
    vm_name           TEXT NOT NULL,
    guest_path        TEXT NOT NULL,
    threat            TEXT NOT NULL,
    sha256            TEXT NOT NULL,
    size              INTEGER NOT NULL,
    time              TEXT NOT NULL,
    is_windows        INTEGER NOT NULL DEFAULT 0,
    permissions       INTEGER,
    key               BLOB NOT NULL,
    restored_at       TEXT NOT NULL DEFAULT '',
    purged_at         TEXT NOT NULL DEFAULT ''
);
"""


def now_iso() -> str:
    """Current UTC time, ISO 8601 with seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class StateStore:
    """The SQLite state of one state directory. Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._db = open_database(path, schema=_SCHEMA, what="state database", rows=True)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database written by an older version up to this schema.

        Version 2 adds ``scans.via``; every scan before it read through Guest Operations (the
        only path there was), so old rows get ``guest``. Checked inside the write
        transaction: two processes opening the same old file do not both add the column.
        """
        try:
            with self.transaction() as db:
                columns = {r["name"] for r in db.execute("PRAGMA table_info(scans)")}
                if "via" not in columns:
                    db.execute(f"ALTER TABLE scans ADD COLUMN via TEXT NOT NULL"
                               f" DEFAULT '{VIA_GUEST}'")
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                           (str(SCHEMA_VERSION),))
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema'"
                           " AND CAST(value AS INTEGER) < ?",
                           (str(SCHEMA_VERSION), SCHEMA_VERSION))
        except StoreError as exc:
            self._db.close()
            raise StoreError(f"cannot open state database {self.path}: "
                             f"{exc.__cause__ or exc}") from exc

    @classmethod
    def open(cls, state_dir: Path | str) -> StateStore:
        """Open (creating if needed) ``<state_dir>/state.sqlite``."""
        return cls(Path(state_dir) / "state.sqlite")

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r})"

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction under the store lock (other store modules use it too)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read query and return all rows."""
        with self._lock:
            try:
                return list(self._db.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from exc

    # --- VMs -------------------------------------------------------------------------------

    def sync_inventory(self, vms: Sequence[VmInfo]) -> None:
        """Upsert what vCenter reports; VMs no longer present are flagged, not forgotten.

        Our own appliances are not workloads: they are left out (and so never listed).
        """
        stamp = now_iso()
        with self.transaction() as db:
            db.execute("UPDATE vms SET present = 0")
            for vm in vms:
                if not vm.is_appliance:
                    self._upsert_vm(db, vm, stamp)

    def upsert_vm(self, vm: VmInfo) -> None:
        """Record (or refresh) one VM's identity and placement."""
        with self.transaction() as db:
            self._upsert_vm(db, vm, now_iso())

    @staticmethod
    def _upsert_vm(db: sqlite3.Connection, vm: VmInfo, stamp: str) -> None:
        db.execute(
            "INSERT INTO vms (moref, instance_uuid, name, host, host_moref, present, updated)"
            " VALUES (?, ?, ?, ?, ?, 1, ?)"
            " ON CONFLICT (moref) DO UPDATE SET instance_uuid = excluded.instance_uuid,"
            " name = excluded.name, host = excluded.host, host_moref = excluded.host_moref,"
            " present = 1, updated = excluded.updated",
            (vm.moref, vm.instance_uuid, vm.name, vm.host.name if vm.host else "",
             vm.host.moref if vm.host else "", stamp))

    def set_protection(self, vm_moref: VmId, *, state: str, reason: str,
                       clean_signature_version: int | None = None, scanned: bool = False,
                       full: bool = False) -> None:
        """Record a VM's protection state after a scan (or a failed attempt)."""
        stamp = now_iso()
        sets = ["state = ?", "reason = ?", "updated = ?"]
        params: list[Any] = [state, reason, stamp]
        if scanned:
            sets.append("last_scan = ?")
            params.append(stamp)
        if full:
            sets.append("last_full_scan = ?")
            params.append(stamp)
        if clean_signature_version is not None:
            sets.append("clean_signature_version = ?")
            params.append(clean_signature_version)
        with self.transaction() as db:
            db.execute(f"UPDATE vms SET {', '.join(sets)} WHERE moref = ?", (*params, vm_moref))

    def vm_states(self, *, current_version: int | None = None,
                  include_absent: bool = False) -> list[VmState]:
        """Every VM's protection record; ``protected`` turns ``stale`` under a newer version."""
        where = "" if include_absent else " WHERE present = 1"
        sql = f"SELECT * FROM vms{where} ORDER BY name"
        return [self._vm_state(r, current_version) for r in self.query(sql)]

    def vm_state(self, vm_moref: VmId, *, current_version: int | None = None) -> VmState | None:
        """One VM's protection record, or None."""
        rows = self.query("SELECT * FROM vms WHERE moref = ?", (vm_moref,))
        return self._vm_state(rows[0], current_version) if rows else None

    @staticmethod
    def _vm_state(r: sqlite3.Row, current_version: int | None) -> VmState:
        state, reason = r["state"], r["reason"]
        version = r["clean_signature_version"]
        if state == PROTECTED and current_version is not None and (
                version is None or version < current_version):
            state = STALE
            reason = (f"last clean scan used signature version {version}, "
                      f"active is {current_version}")
        return VmState(moref=VmId(r["moref"]), name=r["name"], instance_uuid=r["instance_uuid"],
                       host=r["host"], host_moref=r["host_moref"], state=state, reason=reason,
                       last_scan=r["last_scan"], last_full_scan=r["last_full_scan"],
                       signature_version=version, updated=r["updated"])

    # --- scans -----------------------------------------------------------------------------

    def begin_scan(self, vm: VmInfo, *, full: bool, signature_version: int | None,
                   via: str = VIA_GUEST) -> ScanId:
        """Open a scan record and return its id; ``via`` says how it reads the VM's files."""
        if via not in (VIA_GUEST, VIA_DISK):
            raise ValueError(f"scan via {via!r}: must be {VIA_GUEST!r} or {VIA_DISK!r}")
        with self.transaction() as db:
            self._upsert_vm(db, vm, now_iso())
            cur = db.execute(
                "INSERT INTO scans (vm_moref, vm_name, host, started, full, signature_version,"
                " via) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (vm.moref, vm.name, vm.host.name if vm.host else "", now_iso(), int(full),
                 signature_version, via))
            return ScanId(int(cur.lastrowid or 0))

    def finish_scan(self, scan_id: ScanId, *, status: str, reason: str,
                    counts: dict[str, int]) -> None:
        """Close a scan record with its outcome and counters."""
        cols = ("scanned", "unchanged", "skipped", "errors", "detections", "bytes")
        with self.transaction() as db:
            db.execute(
                f"UPDATE scans SET finished = ?, status = ?, reason = ?, "
                f"{', '.join(c + ' = ?' for c in cols)} WHERE id = ?",
                (now_iso(), status, reason, *(int(counts.get(c, 0)) for c in cols), scan_id))

    def scans(self, *, vm_moref: VmId | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Recent scan records, newest first."""
        if vm_moref:
            rows = self.query("SELECT * FROM scans WHERE vm_moref = ? ORDER BY id DESC LIMIT ?",
                              (vm_moref, limit))
        else:
            rows = self.query("SELECT * FROM scans ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def add_scan_file(self, scan_id: ScanId, *, path: str, kind: str, reason: str) -> None:
        """Record a path a scan did not fully check (``incomplete``) or ``skipped`` by policy."""
        with self.transaction() as db:
            db.execute("INSERT INTO scan_files (scan_id, path, kind, reason) VALUES (?, ?, ?, ?)",
                       (scan_id, path, kind, reason))

    def scan_files(self, scan_id: ScanId) -> list[dict[str, str]]:
        """Every path recorded by ``add_scan_file`` for one scan, in the order recorded."""
        rows = self.query("SELECT path, kind, reason FROM scan_files WHERE scan_id = ?"
                          " ORDER BY rowid", (scan_id,))
        return [dict(r) for r in rows]

    def last_finished_scan(self, vm_moref: VmId) -> dict[str, Any] | None:
        """The VM's newest finished scan record, or None."""
        rows = self.query("SELECT * FROM scans WHERE vm_moref = ? AND finished != ''"
                          " ORDER BY id DESC LIMIT 1", (vm_moref,))
        return dict(rows[0]) if rows else None

    # --- detections ------------------------------------------------------------------------

    def add_detection(self, *, scan_id: ScanId, vm_moref: VmId, vm_name: str, path: str,
                      threat: str, sha256: str, size: int, rule: str = "", source: str = "",
                      member: str = "", action: str = "reported", detail: str = "",
                      quarantine_id: str = "") -> DetectionId:
        """Record one detection and what was done about it."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO detections (scan_id, vm_moref, vm_name, path, threat, rule, source,"
                " member, sha256, size, action, detail, quarantine_id, time)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (scan_id, vm_moref, vm_name, path, threat, rule, source, member, sha256, size,
                 action, detail, quarantine_id, now_iso()))
            return DetectionId(int(cur.lastrowid or 0))

    def finish_detection(self, detection_id: DetectionId, *, action: str, detail: str = "",
                         quarantine_id: str = "") -> None:
        """Record the outcome of a detection written ahead as ``pending``."""
        with self.transaction() as db:
            db.execute("UPDATE detections SET action = ?, detail = ?, quarantine_id = ?"
                       " WHERE id = ?", (action, detail, quarantine_id, detection_id))

    def pending_detections(self, vm_moref: VmId) -> list[DetectionRecord]:
        """A VM's detections whose remediation was started but never recorded (a crash)."""
        return self.detections(vm_moref=vm_moref, action=PENDING)

    def detections(self, *, vm_moref: VmId | None = None, action: str | None = None,
                   limit: int = 10_000) -> list[DetectionRecord]:
        """Detections, oldest first (optionally one VM's, or only those with one action)."""
        conds: list[str] = []
        params: list[Any] = []
        if vm_moref:
            conds.append("vm_moref = ?")
            params.append(vm_moref)
        if action is not None:
            conds.append("action = ?")
            params.append(action)
        where = f"WHERE {' AND '.join(conds)}" if conds else ""
        rows = self.query(f"SELECT * FROM detections {where} ORDER BY id LIMIT ?", (*params, limit))
        return [DetectionRecord(
            id=DetectionId(r["id"]), scan_id=ScanId(r["scan_id"]), vm_moref=VmId(r["vm_moref"]),
            vm_name=r["vm_name"], path=r["path"], threat=r["threat"], sha256=r["sha256"],
            size=r["size"], action=r["action"], time=r["time"], member=r["member"], rule=r["rule"],
            source=r["source"], detail=r["detail"], quarantine_id=r["quarantine_id"]) for r in rows]

    # --- per-file index --------------------------------------------------------------------

    def file_record(self, vm_moref: VmId, path: str) -> FileRecord | None:
        """What is known about one guest file of one VM."""
        rows = self.query("SELECT * FROM files WHERE vm_moref = ? AND path = ?", (vm_moref, path))
        return _file(rows[0]) if rows else None

    def shared_record(self, *, path: str, size: int, mtime: str,
                      signature_version: int) -> FileRecord | None:
        """A clean record of the same file (path, size, mtime) in any VM under this version."""
        rows = self.query(
            "SELECT * FROM files WHERE path = ? AND size = ? AND mtime = ?"
            " AND signature_version = ? AND verdict = 'clean' LIMIT 1",
            (path, size, mtime, signature_version))
        return _file(rows[0]) if rows else None

    def record_files(self, records: Sequence[FileRecord]) -> None:
        """Upsert index rows (batched by the caller)."""
        if not records:
            return
        stamp = now_iso()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO files (vm_moref, path, size, mtime, sha256, signature_version,"
                " verdict, scanned_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (vm_moref, path) DO UPDATE SET size = excluded.size,"
                " mtime = excluded.mtime, sha256 = excluded.sha256,"
                " signature_version = excluded.signature_version, verdict = excluded.verdict,"
                " scanned_at = excluded.scanned_at",
                [(r.vm_moref, r.path, r.size, r.mtime, r.sha256, r.signature_version, r.verdict,
                  stamp) for r in records])

    def forget_file(self, vm_moref: VmId, path: str) -> None:
        """Drop one index row (the file was removed from the guest)."""
        with self.transaction() as db:
            db.execute("DELETE FROM files WHERE vm_moref = ? AND path = ?", (vm_moref, path))

    # --- quarantine records ----------------------------------------------------------------

    def add_quarantine(self, item: QuarantineItem) -> None:
        """Record one quarantined file (its bytes live in the quarantine directory)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO quarantine (id, vm_moref, vm_name, guest_path, threat, sha256, size,"
                " time, is_windows, permissions, key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.id, item.vm_moref, item.vm_name, item.guest_path, item.threat, item.sha256,
                 item.size, item.time, int(item.is_windows), item.permissions, item.key))

    def quarantine_items(self, *, include_purged: bool = False) -> list[QuarantineItem]:
        """Quarantine records, oldest first."""
        where = "" if include_purged else "WHERE purged_at = ''"
        rows = self.query(f"SELECT * FROM quarantine {where} ORDER BY time, id")
        return [_qitem(r) for r in rows]

    def quarantine_item(self, item_id: str) -> QuarantineItem | None:
        """One quarantine record by id, or None."""
        rows = self.query("SELECT * FROM quarantine WHERE id = ?", (item_id,))
        return _qitem(rows[0]) if rows else None

    def mark_quarantine(self, item_id: str, *, restored: bool = False,
                        purged: bool = False) -> None:
        """Stamp a quarantine record as restored and/or purged."""
        with self.transaction() as db:
            if restored:
                db.execute("UPDATE quarantine SET restored_at = ? WHERE id = ?",
                           (now_iso(), item_id))
            if purged:
                db.execute("UPDATE quarantine SET purged_at = ? WHERE id = ?", (now_iso(), item_id))

    def delete_quarantine(self, item_id: str) -> None:
        """Remove a record whose bytes could not be kept (quarantine aborted)."""
        with self.transaction() as db:
            db.execute("DELETE FROM quarantine WHERE id = ?", (item_id,))


def _file(r: sqlite3.Row) -> FileRecord:
    return FileRecord(vm_moref=VmId(r["vm_moref"]), path=r["path"], size=r["size"],
                      mtime=r["mtime"],
                      sha256=r["sha256"], signature_version=r["signature_version"],
                      verdict=r["verdict"])


def _qitem(r: sqlite3.Row) -> QuarantineItem:
    return QuarantineItem(
        id=QuarantineId(r["id"]), vm_moref=VmId(r["vm_moref"]), vm_name=r["vm_name"],
        guest_path=r["guest_path"], threat=r["threat"], sha256=r["sha256"], size=r["size"],
        time=r["time"], is_windows=bool(r["is_windows"]), permissions=r["permissions"],
        key=bytes(r["key"]), restored_at=r["restored_at"], purged_at=r["purged_at"])


__all__ = ["INFECTED", "PENDING", "PROTECTED", "STALE", "UNPROTECTED", "VIA_DISK", "VIA_GUEST",
           "StateStore", "now_iso"]
