"""Opening the product's SQLite files: one way, with the same durability settings.

Called by the stores (``audit``, ``state``, ``jobs``); calls only ``sqlite3``. Every
database is in WAL mode with autocommit off at the Python level (``isolation_level=None``:
each store opens its own ``BEGIN IMMEDIATE`` transactions) and shared between threads
under the store's own lock.
"""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path

from vsphere_av.errors import StoreError


def open_database(path: Path, *, schema: str, what: str, synchronous: str = "FULL",
                  rows: bool = False) -> sqlite3.Connection:
    """Create the parent directory, open ``path``, set WAL + ``synchronous``, apply ``schema``.

    ``synchronous=FULL`` survives a power cut with nothing acknowledged lost; ``NORMAL`` in
    WAL mode survives a killed process (the job queue's case) and is cheaper.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Switching a new file to WAL answers "database is locked" at once (no busy wait)
        # while another process does the same: serialize opening across processes.
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
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
