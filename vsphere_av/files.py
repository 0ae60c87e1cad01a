"""Files in the state directory: private (the directory 0700, its files 0600), and the one
way to open the product's SQLite databases.

The base layer beside ``models``, ``config`` and ``errors``: called by the stores
(``store.state``, ``store.jobs``, ``store.audit``, ``store.quarantine``), the engine's
verdict cache and the CLI (``audit export -o``: :func:`create_outside`). Calls only ``os``,
``fcntl`` and ``sqlite3``.

:func:`open_database`: every database is in WAL mode with autocommit off at the Python
level (``isolation_level=None``: each store opens its own ``BEGIN IMMEDIATE``
transactions) and shared between threads under the store's own lock. The directory is made
private and each database file, its ``-wal`` / ``-shm`` and its lock file 0600 before
SQLite opens it.

A directory or file that already exists with looser modes (made by hand, by a package, or by
an earlier version under the umask) is tightened, not refused: the service owns these files
and nothing is left to decide, so an upgrade needs no step of its own. What cannot be
tightened (it belongs to another account) is refused with one line naming the path, its
mode and its owner. Tightening is logged at info level (``serve`` shows it), not printed by
CLI commands, whose stderr is their one error line. SQLite creates a database's ``-wal``
and ``-shm`` with the database file's own mode, so creating the database 0600 keeps them
0600 too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
from pathlib import Path

from vsphere_av.errors import ConfigError, StoreError

DIR_MODE = 0o700
FILE_MODE = 0o600

log = logging.getLogger(__name__)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) with mode 0700, or tighten it when it exists."""
    try:
        if not path.is_dir():        # mkdir answers EACCES before EEXIST in a parent not ours
            path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
    _tighten(path, DIR_MODE)
    return path


def private_file(path: Path, *, create: bool = False) -> None:
    """Tighten ``path`` to 0600 when it exists; with ``create``, make it (empty) when not."""
    if create:
        # O_EXCL: an existing file is never opened here. Closing any descriptor of a file
        # drops every POSIX lock this process holds on it, so opening and closing a database
        # that a SQLite connection of this process has open would release that connection's
        # locks under it (seen as "disk I/O error" in serve's audit log).
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from exc
    _tighten(path, FILE_MODE)


def _tighten(path: Path, mode: int) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"cannot read the mode of {path}: {exc.strerror or exc}") from exc
    if not stat.S_IMODE(st.st_mode) & 0o077:
        return
    try:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)
    except OSError as exc:
        raise StoreError(
            f"{path} is mode {stat.S_IMODE(st.st_mode):04o} (owner uid {st.st_uid}) and cannot "
            f"be made {mode:04o}: {exc.strerror or exc}; give it to this account or fix its "
            "mode") from exc
    log.info("tightened %s from %04o to %04o", path, stat.S_IMODE(st.st_mode),
                stat.S_IMODE(st.st_mode) & mode)


def create_outside(path: Path | str, *, state_dir: Path) -> int:
    """Create the new file ``path`` for writing and return its descriptor; ConfigError when
    it exists (never overwritten, symbolic links included) or would be inside ``state_dir``.

    Commands that write where a person says (``audit export -o``) run as the service account
    under sudo: without this, an auditor could overwrite the audit log, its head or the state
    database. The parent directory is opened once and its ancestors are compared with the
    state directory by device and inode, so symbolic links, ``..`` and a directory swapped
    while checking all lead to the same answer.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ConfigError(f"{path}: not a file name")
    try:
        guarded = os.stat(state_dir)
    except FileNotFoundError:
        guarded = None
    except OSError as exc:
        raise StoreError(f"cannot read {state_dir}: {exc.strerror or exc}") from exc
    try:
        parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    try:
        if guarded is not None and _within(parent, (guarded.st_dev, guarded.st_ino)):
            raise ConfigError(f"{path} is inside the state directory {state_dir}: write it "
                              "elsewhere")
        try:
            return os.open(path.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                           0o666, dir_fd=parent)
        except FileExistsError as exc:
            raise ConfigError(f"{path} exists: give a new file (an export never overwrites "
                              "one)") from exc
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from exc
    finally:
        os.close(parent)


def _within(directory: int, guarded: tuple[int, int]) -> bool:
    """True when the open ``directory`` is ``guarded`` (dev, ino) or below it."""
    current = os.dup(directory)
    try:
        while True:
            st = os.fstat(current)
            if (st.st_dev, st.st_ino) == guarded:
                return True
            up = os.open("..", os.O_PATH | os.O_DIRECTORY, dir_fd=current)
            above = os.fstat(up)
            os.close(current)
            current = up
            if (above.st_dev, above.st_ino) == (st.st_dev, st.st_ino):
                return False            # the root
    finally:
        os.close(current)

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
