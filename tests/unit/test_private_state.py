"""The state directory is 0700 and the files the stores keep in it 0600: real files, real
SQLite, new directories and ones an earlier version (or a person) left looser."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from vsphere_av.errors import StoreError
from vsphere_av.files import private_dir
from vsphere_av.store.audit import AuditLog
from vsphere_av.store.jobs import JobStore
from vsphere_av.store.quarantine import Quarantine
from vsphere_av.store.state import StateStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _use_every_store_and_check(state_dir: Path) -> None:
    """Write through every store; while they are open (the WAL files exist), check modes."""
    with StateStore.open(state_dir) as store, AuditLog.open(state_dir) as log, \
            JobStore.open(state_dir) as jobs:
        log.append(actor="t", action="scan.start", details={"vm": "vm-1"})
        jobs.set_meta("k", "v")
        Quarantine.open(state_dir, store=store).put(
            [b"X5O!P%@AP"], vm_moref="vm-1", vm_name="web01",   # type: ignore[arg-type]
            guest_path="/tmp/eicar", threat="EICAR")
        _expect_private(state_dir)


def _expect_private(state_dir: Path) -> None:
    assert _mode(state_dir) == 0o700
    assert _mode(state_dir / "quarantine") == 0o700
    names = {p.name for p in state_dir.iterdir() if p.is_file()}
    for db in ("audit.sqlite", "state.sqlite", "jobs.sqlite"):
        assert {db, f"{db}-wal", f"{db}-shm", f"{db}.lock"} <= names   # the WAL files exist
    assert {"audit.head", "audit.lock"} <= names
    assert len(list((state_dir / "quarantine").iterdir())) == 1
    loose = {p.name: oct(_mode(p)) for p in state_dir.iterdir() if p.is_file()
             if _mode(p) != 0o600}
    loose |= {p.name: oct(_mode(p)) for p in (state_dir / "quarantine").iterdir()
              if _mode(p) != 0o600}
    assert loose == {}


def test_a_new_state_directory_is_private_under_a_loose_umask(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    old = os.umask(0o002)                   # the most a umask usually lets through
    try:
        _use_every_store_and_check(state_dir)
    finally:
        os.umask(old)


def test_a_looser_existing_state_directory_is_tightened(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with StateStore.open(state_dir) as store, AuditLog.open(state_dir) as log:
        log.append(actor="t", action="scan.start", details={"vm": "vm-1"})
        Quarantine.open(state_dir, store=store).put(
            [b"old"], vm_moref="vm-1", vm_name="web01",   # type: ignore[arg-type]
            guest_path="/tmp/old", threat="EICAR")
        for path in [state_dir, state_dir / "quarantine", *state_dir.iterdir(),
                     *(state_dir / "quarantine").iterdir()]:
            path.chmod(0o777 if path.is_dir() else 0o666)   # as an older version left them
        for blob in (state_dir / "quarantine").iterdir():
            blob.unlink()                                   # one blob is expected below
        # (kept open: its -wal and -shm exist while the next opening tightens them)
        _use_every_store_and_check(state_dir)


def test_the_cli_leaves_a_private_state_directory(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    state_dir.chmod(0o755)
    env = {"VSPHERE_AV_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "vsphere_av", "audit", "verify"], env=env,
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""                 # tightening is logged at info, not printed
    assert _mode(state_dir) == 0o700
    assert _mode(state_dir / "audit.sqlite") == 0o600


def _tighten_as_nobody(state_dir: Path, errors: Any) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        private_dir(state_dir)
    except StoreError as exc:
        errors.put(str(exc))
    else:
        errors.put("")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another account")
def test_a_directory_that_cannot_be_tightened_is_refused(request: pytest.FixtureRequest) -> None:
    # The product runs as nobody in a forked child; root's directory cannot be changed by it.
    reachable = Path(tempfile.mkdtemp(prefix="vsphere-av-private-"))   # pytest's is 0700
    reachable.chmod(0o755)
    state_dir = reachable / "state"
    state_dir.mkdir()
    state_dir.chmod(0o777)
    request.addfinalizer(lambda: shutil.rmtree(reachable))
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    child = ctx.Process(target=_tighten_as_nobody, args=(state_dir, errors))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert errors.get(timeout=5) == (f"{state_dir} is mode 0777 (owner uid 0) and cannot be "
                                     "made 0700: Operation not permitted; give it to this "
                                     "account or fix its mode")
    assert _mode(state_dir) == 0o777


def test_private_dir_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(StoreError, match="cannot create"):
        private_dir(tmp_path / "state")


def test_opening_a_database_again_keeps_the_locks_of_the_connection_already_open(
        tmp_path: Path) -> None:
    # Closing any descriptor of a file drops every POSIX lock the process holds on it. In WAL
    # mode each open connection holds a shared lock on the database file, which tells the
    # last connection to close (in any process) not to checkpoint and delete the -wal and
    # -shm under the others. A second open of a database this process already has open must
    # not open the file itself: serve's audit log failed with "disk I/O error" once a command
    # in another process had read the log.
    from vsphere_av.files import open_database

    schema = "CREATE TABLE IF NOT EXISTS t (v INTEGER);"
    path = tmp_path / "state" / "x.sqlite"
    first = open_database(path, schema=schema, what="test")
    first.execute("INSERT INTO t VALUES (1)")
    open_database(path, schema=schema, what="test").close()
    reader = ("import sqlite3, sys\n"
              "db = sqlite3.connect(sys.argv[1])\n"
              "db.execute('SELECT count(*) FROM t').fetchone()\n"
              "db.close()\n")
    subprocess.run([sys.executable, "-c", reader, str(path)], check=True)
    wal_kept = path.with_name(path.name + "-wal").exists()
    first.execute("INSERT INTO t VALUES (2)")
    count = first.execute("SELECT count(*) FROM t").fetchone()[0]
    first.close()
    assert wal_kept
    assert count == 2
