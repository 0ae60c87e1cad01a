"""Opening the product's SQLite files: one way, with the same durability settings.

Called by the stores (``audit``, ``state``, ``jobs``); calls only ``sqlite3``. Every
database is in WAL mode with autocommit off at the Python level (``isolation_level=None``:
each store opens its own ``BEGIN IMMEDIATE`` transactions) and shared between threads
under the store's own lock. The directory is made private and each database file, its
``-wal`` / ``-shm`` and its lock file 0600 (``store.private``) before SQLite opens it.
"""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path

from vsphere_av.errors import StoreError
from vsphere_av.store.private import private_dir, private_file


def open_database(path: Path, *, schema: str, what: str, synchronous: str = "FULL",
                  rows: bool = False) -> sqlite3.Connection:
    """Create the parent directory (0700), open ``path`` (0600), set WAL + ``synchronous``,
    apply ``schema``.

    ``synchronous=FULL`` survives a power cut with nothing acknowledged lost; ``NORMAL`` in
    WAL mode survives a killed process (the job queue's case) and is cheaper.
    """
    try:
        private_dir(path.parent)
        lock_path = path.with_name(path.name + ".lock")
        for companion in (lock_path, path.with_name(path.name + "-wal"),
                          path.with_name(path.name + "-shm")):
            private_file(companion, create=companion == lock_path)
        # Switching a new file to WAL answers "database is locked" at once (no busy wait)
        # while another process does the same: serialize opening across processes.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            private_file(path, create=True)     # before SQLite makes it under the umask
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                 timeout=30)
            if rows:
                db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(schema)
        return db
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open {what} {path}: {exc}") from exc
