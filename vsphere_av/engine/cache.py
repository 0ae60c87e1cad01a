"""Persistent verdict cache: (content SHA-256, signature version, context) -> verdict.

Called by ``engine.Session`` (and scan-files workers); calls sqlite3 only. One SQLite file,
``<state_dir>/verdicts.sqlite``, shared by every process that scans (WAL mode, busy timeout).

* ``context`` is "" unless the version's rules read the name externals or ``owner``: then it
  holds those values, so a cached verdict always equals what a full scan would say. It also
  carries a fingerprint of the engine limits (archive depth, sizes) that shape a verdict.
* Bounded: at most ``max_entries`` rows; least recently used rows go first. "Used" is
  refreshed at most once an hour per row so a warm pass does not turn into a write storm.
* Writes are buffered and committed in batches (``flush``), so a cold pass over thousands
  of small files is not one transaction per file.
* ``files`` memoises SHA-256 of local files by (device, inode, size, mtime, ctime); only
  used by ``scan-files`` on local paths, and only for files not modified in the last
  seconds (a write within the same timestamp tick would otherwise go unnoticed).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vsphere_av.errors import EngineError, StoreError
from vsphere_av.files import open_database

TOUCH_EVERY = 3600          # seconds between LRU refreshes of one row
FLUSH_EVERY = 512           # buffered writes before a commit
RACY_SECONDS = 3            # files changed this recently are not memoised

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    sha256 BLOB NOT NULL, version INTEGER NOT NULL, context TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT NOT NULL, detections TEXT NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (sha256, version, context)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS verdicts_lru ON verdicts (last_used);
CREATE TABLE IF NOT EXISTS files (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, sha256 BLOB NOT NULL,
    last_used INTEGER NOT NULL,
    PRIMARY KEY (dev, ino)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_lru ON files (last_used);
"""


_Row = tuple[bytes, int, str, str, str, str, int]


@dataclass(frozen=True)
class CachedVerdict:
    """What the cache remembers of one scan."""

    status: str
    reason: str
    detections: tuple[tuple[str, str, str, str], ...]   # (threat, source, rule, member)


@dataclass(frozen=True)
class FileStat:
    """The identity of a local file's content as far as the kernel tells it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _detections(text: str) -> tuple[tuple[str, str, str, str], ...]:
    if text == "[]":
        return ()
    return tuple((str(d[0]), str(d[1]), str(d[2]), str(d[3])) for d in json.loads(text))


class VerdictCache:
    """SQLite-backed, LRU-bounded verdict cache (thread-safe within a process)."""

    def __init__(self, *, path: Path, max_entries: int) -> None:
        self.path = Path(path)
        self.max_entries = max(1, max_entries)
        # Three locks so a slow commit (a WAL checkpoint syncs the disk) never stalls
        # lookups: _lock guards the write buffers only, _write_lock the writing connection,
        # _read_lock the reading one (WAL readers do not wait for writers).
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        try:
            self._db = open_database(self.path, schema=_SCHEMA, what="verdict cache",
                                     synchronous="NORMAL")
            self._count = int(self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0])
            self._rdb = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False,
                                        isolation_level=None)
        except StoreError as exc:
            raise EngineError(str(exc)) from exc
        except sqlite3.Error as exc:
            raise EngineError(f"verdict cache {self.path} cannot be opened: {exc}") from exc
        self._pending: dict[tuple[bytes, int, str], _Row] = {}
        self._writing: dict[tuple[bytes, int, str], _Row] = {}   # being committed right now
        self._touches: list[tuple[int, bytes, int, str]] = []
        self._file_rows: list[tuple[int, int, int, int, int, bytes, int]] = []

    @classmethod
    def open(cls, state_dir: Path, *, max_entries: int) -> VerdictCache:
        """The cache of a state directory."""
        return cls(path=Path(state_dir) / "verdicts.sqlite", max_entries=max_entries)

    # -- verdicts ---------------------------------------------------------------------
    def get(self, sha256: str, version: int, context: str = "") -> CachedVerdict | None:
        """The cached verdict, or None."""
        found = self.get_many([(sha256, context)], version)
        return found.get((sha256, context))

    def get_many(self, keys: Sequence[tuple[str, str]], version: int,
                 ) -> dict[tuple[str, str], CachedVerdict]:
        """Cached verdicts for many (sha256, context) keys of one version."""
        out: dict[tuple[str, str], CachedVerdict] = {}
        if not keys:
            return out
        now = int(time.time())
        touches: list[tuple[int, bytes, int, str]] = []
        with self._read_lock:
            try:
                for start in range(0, len(keys), 400):
                    chunk = keys[start:start + 400]
                    blobs = list({bytes.fromhex(sha) for sha, _ in chunk})
                    marks = ",".join("?" * len(blobs))
                    rows = self._rdb.execute(
                        "SELECT sha256, context, status, reason, detections, last_used "
                        f"FROM verdicts "
                        f"WHERE version = ? AND sha256 IN ({marks})", [version, *blobs]).fetchall()
                    wanted = set(chunk)
                    for sha, context, status, reason, dets, last_used in rows:
                        key = (sha.hex(), context)
                        if key not in wanted:
                            continue
                        out[key] = CachedVerdict(status=status, reason=reason,
                                                 detections=_detections(dets))
                        if now - last_used > TOUCH_EVERY:
                            touches.append((now, sha, version, context))
            except sqlite3.Error as exc:
                raise EngineError(f"verdict cache read failed: {exc}") from exc
        with self._lock:
            # Verdicts not committed yet (buffered or being written) count too.
            for sha, context in keys:
                if (sha, context) in out:
                    continue
                k = (bytes.fromhex(sha), version, context)
                row = self._pending.get(k) or self._writing.get(k)
                if row is not None:
                    out[(sha, context)] = CachedVerdict(status=row[3], reason=row[4],
                                                        detections=_detections(row[5]))
            self._touches += touches
            full = len(self._touches) >= FLUSH_EVERY
        if full:
            self.flush()
        return out

    def put(self, sha256: str, version: int, context: str, verdict: CachedVerdict) -> None:
        """Remember a verdict (buffered; see ``flush``)."""
        row = (bytes.fromhex(sha256), version, context, verdict.status, verdict.reason,
               json.dumps([list(d) for d in verdict.detections]) if verdict.detections else "[]",
               int(time.time()))
        with self._lock:
            self._pending[row[:3]] = row
            full = len(self._pending) >= FLUSH_EVERY
        if full:
            self.flush()

    # -- local file memo --------------------------------------------------------------
    def file_hashes(self, stats: Sequence[FileStat]) -> dict[FileStat, str]:
        """Known SHA-256 of local files whose identity (inode, size, times) is unchanged."""
        out: dict[FileStat, str] = {}
        by_dev: dict[int, list[FileStat]] = {}
        for st in stats:
            by_dev.setdefault(st.dev, []).append(st)
        with self._read_lock:
            try:
                for dev, group in by_dev.items():
                    for start in range(0, len(group), 500):
                        chunk = group[start:start + 500]
                        marks = ",".join("?" * len(chunk))
                        # "dev = ? AND ino IN (...)" uses the primary key (a row-value IN
                        # would scan the whole table on every batch).
                        rows = self._rdb.execute(
                            f"SELECT ino, size, mtime_ns, ctime_ns, sha256 FROM files "
                            f"WHERE dev = ? AND ino IN ({marks})",
                            [dev, *(st.ino for st in chunk)]).fetchall()
                        known = {r[0]: r for r in rows}
                        for st in chunk:
                            r = known.get(st.ino)
                            if r and (r[1], r[2], r[3]) == (st.size, st.mtime_ns, st.ctime_ns):
                                out[st] = r[4].hex()
            except sqlite3.Error as exc:
                raise EngineError(f"verdict cache read failed: {exc}") from exc
        return out

    def remember_file(self, st: FileStat, sha256: str) -> None:
        """Memoise a local file's SHA-256 unless it changed too recently to trust its times."""
        now = time.time()
        if now - st.mtime_ns / 1e9 < RACY_SECONDS or now - st.ctime_ns / 1e9 < RACY_SECONDS:
            return
        with self._lock:
            self._file_rows.append((st.dev, st.ino, st.size, st.mtime_ns, st.ctime_ns,
                                    bytes.fromhex(sha256), int(now)))
            full = len(self._file_rows) >= FLUSH_EVERY
        if full:
            self.flush()

    # -- housekeeping -----------------------------------------------------------------
    def flush(self) -> None:
        """Commit buffered writes and evict least recently used rows over the bound."""
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                touches, self._touches = self._touches, []
                file_rows, self._file_rows = self._file_rows, []
                self._writing = pending
            try:
                if pending or touches or file_rows:
                    self._write(list(pending.values()), touches, file_rows)
            finally:
                with self._lock:
                    self._writing = {}

    def _write(self, pending: list[_Row], touches: list[tuple[int, bytes, int, str]],
               file_rows: list[tuple[int, int, int, int, int, bytes, int]]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if pending:
                    before = self._db.total_changes
                    self._db.executemany(
                        "INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?,?,?)", pending)
                    self._count += self._db.total_changes - before
                if touches:
                    self._db.executemany(
                        "UPDATE verdicts SET last_used = ? WHERE sha256 = ? AND version = ? "
                        "AND context = ?", touches)
                if file_rows:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?)", file_rows)
                if self._count > self.max_entries:
                    self._evict()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise EngineError(f"verdict cache write failed: {exc}") from exc

    def _evict(self) -> None:
        self._count = int(self._db.execute("SELECT count(*) FROM verdicts").fetchone()[0])
        excess = self._count - self.max_entries
        if excess > 0:
            # Evict a little more than needed so eviction is not paid on every flush.
            victims = excess + self.max_entries // 20
            self._db.execute(
                "DELETE FROM verdicts WHERE (sha256, version, context) IN ("
                "SELECT sha256, version, context FROM verdicts "
                "ORDER BY last_used LIMIT ?)", (victims,))
            self._count = max(0, self._count - victims)
        files = int(self._db.execute("SELECT count(*) FROM files").fetchone()[0])
        if files > self.max_entries:
            self._db.execute(
                "DELETE FROM files WHERE (dev, ino) IN (SELECT dev, ino FROM files "
                "ORDER BY last_used LIMIT ?)", (files - self.max_entries,))

    def count(self) -> int:
        """Number of cached verdicts (after flushing)."""
        self.flush()
        with self._read_lock:
            return int(self._rdb.execute("SELECT count(*) FROM verdicts").fetchone()[0])

    def close(self) -> None:
        """Flush and close the database."""
        try:
            self.flush()
        finally:
            with self._write_lock, self._read_lock:
                self._db.close()
                self._rdb.close()

