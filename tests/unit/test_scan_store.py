"""State store and quarantine on a real SQLite file and directory (no vSphere involved)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsphere_av.errors import StoreError
from vsphere_av.models import FileRecord, HostId, HostInfo, VmId, VmInfo
from vsphere_av.store.quarantine import Quarantine, _xor
from vsphere_av.store.state import StateStore


def _vm(moref: str = "vm-1", name: str = "web01") -> VmInfo:
    host = HostInfo(moref=HostId("host-1"), name="esx1", address="10.0.0.1")
    return VmInfo(moref=VmId(moref), name=name, instance_uuid="uuid-" + moref,
                  power_state="poweredOn", tools_running=True, guest_id="otherGuest", host=host)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore.open(tmp_path)
    yield s
    s.close()


def test_wal_and_full_sync(store: StateStore) -> None:
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"
    assert store.query("PRAGMA synchronous")[0][0] == 2      # FULL


def test_new_vm_is_unprotected_then_protected_then_stale(store: StateStore) -> None:
    vm = _vm()
    store.sync_inventory([vm])
    (state,) = store.vm_states(current_version=1)
    assert (state.state, state.reason) == ("unprotected", "never scanned")
    scan = store.begin_scan(vm, full=True, signature_version=1)
    store.finish_scan(scan, status="clean", reason="clean", counts={"scanned": 3})
    store.set_protection(vm.moref, state="protected", reason="clean", clean_signature_version=1,
                         scanned=True, full=True)
    (state,) = store.vm_states(current_version=1)
    assert state.state == "protected"
    assert state.signature_version == 1
    assert state.last_full_scan
    (state,) = store.vm_states(current_version=2)
    assert state.state == "stale"
    assert "version 1" in state.reason
    assert store.scans(vm_moref=vm.moref)[0]["scanned"] == 3


def test_vms_gone_from_inventory_are_hidden_not_forgotten(store: StateStore) -> None:
    store.sync_inventory([_vm("vm-1", "a"), _vm("vm-2", "b")])
    store.sync_inventory([_vm("vm-2", "b")])
    assert [s.name for s in store.vm_states()] == ["b"]
    assert [s.name for s in store.vm_states(include_absent=True)] == ["a", "b"]


def test_file_index_own_and_shared(store: StateStore) -> None:
    rec = FileRecord(vm_moref=VmId("vm-1"), path="/bin/ls", size=10, mtime="t1", sha256="aa",
                     signature_version=4, verdict="clean")
    bad = FileRecord(vm_moref=VmId("vm-1"), path="/tmp/x", size=5, mtime="t2", sha256="bb",
                     signature_version=4, verdict="infected")
    store.record_files([rec, bad])
    assert store.file_record(VmId("vm-1"), "/bin/ls") == rec
    assert store.shared_record(path="/bin/ls", size=10, mtime="t1", signature_version=4) == rec
    assert store.shared_record(path="/bin/ls", size=10, mtime="t1", signature_version=5) is None
    assert store.shared_record(path="/bin/ls", size=11, mtime="t1", signature_version=4) is None
    assert store.shared_record(path="/tmp/x", size=5, mtime="t2", signature_version=4) is None
    store.record_files([FileRecord(vm_moref=VmId("vm-1"), path="/bin/ls", size=12, mtime="t3",
                                   sha256="cc", signature_version=5, verdict="clean")])
    updated = store.file_record(VmId("vm-1"), "/bin/ls")
    assert updated is not None
    assert updated.sha256 == "cc"
    store.forget_file(VmId("vm-1"), "/bin/ls")
    assert store.file_record(VmId("vm-1"), "/bin/ls") is None


def test_detections_round_trip(store: StateStore) -> None:
    vm = _vm()
    scan = store.begin_scan(vm, full=False, signature_version=2)
    store.add_detection(scan_id=scan, vm_moref=vm.moref, vm_name=vm.name, path="/x.zip",
                        threat="EICAR", sha256="ab", size=9, member="x.zip!a", action="quarantined",
                        quarantine_id="q1")
    (d,) = store.detections()
    assert (d.path, d.threat, d.member, d.action, d.quarantine_id) == (
        "/x.zip", "EICAR", "x.zip!a", "quarantined", "q1")


@pytest.mark.parametrize("offset", [0, 1, 31, 32, 33, 1000])
def test_xor_is_its_own_inverse_at_any_offset(offset: int) -> None:
    key = os.urandom(32)
    data = os.urandom(257)
    assert _xor(_xor(data, key, offset), key, offset) == data
    assert _xor(data[:100], key, offset) + _xor(data[100:], key, offset + 100) == \
        _xor(data, key, offset)


def _chunks(data: bytes, size: int = 1000) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_quarantine_keeps_exact_bytes_scrambled_and_private(store: StateStore,
                                                            tmp_path: Path) -> None:
    q = Quarantine.open(tmp_path, store=store)
    data = b"MZ" + os.urandom(150_000)
    item = q.put(_chunks(data), vm_moref=VmId("vm-1"), vm_name="web01", guest_path="/tmp/m.exe",
                 threat="Evil", permissions=0o755)
    assert item.sha256 == hashlib.sha256(data).hexdigest()
    assert item.size == len(data)
    blob = tmp_path / "quarantine" / f"{item.id}.qbin"
    assert blob.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "quarantine").stat().st_mode & 0o777 == 0o700
    raw = blob.read_bytes()
    assert len(raw) == len(data)
    assert raw[:2] != b"MZ"
    assert data[100:200] not in raw
    with q.reader(item.id) as reader:
        assert len(reader) == len(data)
        assert b"".join(reader) == data
    listed = q.items()
    assert [i.id for i in listed] == [item.id]
    assert listed[0].permissions == 0o755
    q.purge(item.id)
    assert not blob.exists()
    assert q.items() == []
    assert len(q.items(include_purged=True)) == 1
    with pytest.raises(StoreError, match="purged"):
        q.reader(item.id)


def test_quarantine_detects_a_corrupted_blob(store: StateStore, tmp_path: Path) -> None:
    q = Quarantine.open(tmp_path, store=store)
    item = q.put([b"payload" * 100], vm_moref=VmId("vm-1"), vm_name="a", guest_path="/p",
                 threat="T")
    blob = tmp_path / "quarantine" / f"{item.id}.qbin"
    raw = bytearray(blob.read_bytes())
    raw[10] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with q.reader(item.id) as reader, pytest.raises(StoreError, match="corrupt"):
        b"".join(reader)


def test_quarantine_size_limit_leaves_nothing_behind(store: StateStore, tmp_path: Path) -> None:
    q = Quarantine.open(tmp_path, store=store)
    with pytest.raises(StoreError, match="limit"):
        q.put(_chunks(b"x" * 5000), vm_moref=VmId("vm-1"), vm_name="a", guest_path="/big",
              threat="T", max_size=1000)
    assert list((tmp_path / "quarantine").iterdir()) == []
    assert q.items() == []


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", "x.y"])
def test_quarantine_ids_are_checked(store: StateStore, tmp_path: Path, bad: str) -> None:
    q = Quarantine.open(tmp_path, store=store)
    with pytest.raises(StoreError):
        q.reader(bad)


# The tables of a state.sqlite written before scans kept ``via`` (schema 1), as that version
# created them; the other tables did not change and are created on open as before.
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vms (
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
CREATE TABLE scans (
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
    bytes             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX scans_vm ON scans (vm_moref, id);
INSERT INTO meta (key, value) VALUES ('schema', '1');
INSERT INTO vms (moref, name, state, reason) VALUES ('vm-1', 'web01', 'protected', 'clean');
INSERT INTO scans (vm_moref, vm_name, started, finished, status, reason, scanned, bytes)
    VALUES ('vm-1', 'web01', '2026-01-01T00:00:00+00:00', '2026-01-01T00:01:00+00:00',
            'clean', 'clean', 7, 700);
"""


def old_state_file(state_dir: Path) -> Path:
    """A state.sqlite as schema 1 left it: one VM and one finished scan."""
    import sqlite3

    state_dir.mkdir(mode=0o700)
    path = state_dir / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.close()
    return path


def test_an_old_state_file_gets_via_and_its_scans_read_guest(tmp_path: Path) -> None:
    old_state_file(tmp_path / "state")
    with StateStore.open(tmp_path / "state") as store:
        (old,) = store.scans()
        assert (old["scanned"], old["bytes"], old["via"]) == (7, 700, "guest")
        assert store.query("SELECT value FROM meta WHERE key = 'schema'")[0][0] == "2"
        disk = store.begin_scan(_vm(), full=False, signature_version=1, via="disk")
        store.finish_scan(disk, status="clean", reason="clean", counts={"scanned": 2})
    # Opening again finds the column there: nothing added twice, nothing rewritten.
    with StateStore.open(tmp_path / "state") as store:
        assert [(s["id"], s["via"]) for s in store.scans()] == [
            (disk, "disk"), (old["id"], "guest")]
        last = store.last_finished_scan(VmId("vm-1"))
        assert last is not None
        assert last["via"] == "disk"
        assert [r["name"] for r in store.query("PRAGMA table_info(scans)")].count("via") == 1


def test_a_newer_schema_version_is_not_lowered(tmp_path: Path) -> None:
    with StateStore.open(tmp_path) as store, store.transaction() as db:
        db.execute("UPDATE meta SET value = '9' WHERE key = 'schema'")
    with StateStore.open(tmp_path) as store:
        assert store.query("SELECT value FROM meta WHERE key = 'schema'")[0][0] == "9"


def test_scans_record_how_they_read_the_vm(store: StateStore) -> None:
    guest = store.begin_scan(_vm(), full=False, signature_version=1)
    disk = store.begin_scan(_vm(), full=False, signature_version=1, via="disk")
    assert {s["id"]: s["via"] for s in store.scans()} == {guest: "guest", disk: "disk"}
    with pytest.raises(ValueError, match="floppy"):
        store.begin_scan(_vm(), full=False, signature_version=1, via="floppy")
    assert len(store.scans()) == 2
