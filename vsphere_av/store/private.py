"""The state directory is private: the directory 0700, the files the stores keep in it 0600.

Called by ``store.sqlite`` (every database, its ``-wal`` / ``-shm`` and lock file),
``store.audit`` (``audit.head`` and its lock) and ``quarantine`` (its directory and blobs).
Calls only ``os``.

A directory or file that already exists with looser modes (made by hand, by a package, or by
an earlier version under the umask) is tightened, not refused: the service owns these files
and nothing is left to decide, so an upgrade needs no step of its own. What cannot be
tightened (it belongs to another account) is refused with one line naming the path, its
mode and its owner. SQLite creates a database's ``-wal`` and ``-shm`` with the database
file's own mode, so creating the database 0600 keeps them 0600 too.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from vsphere_av.errors import StoreError

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
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT, FILE_MODE))
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
    log.warning("tightened %s from %04o to %04o", path, stat.S_IMODE(st.st_mode),
                stat.S_IMODE(st.st_mode) & mode)

