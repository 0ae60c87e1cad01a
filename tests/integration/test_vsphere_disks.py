"""The disk adapter (``vsphere_av.vsphere.disks``) against the bundled simulator.

Called by pytest. Calls ``disks.disks_of``, the scan-snapshot functions and
``DatastoreFiles`` through a real ``Connection``; reads the inventory back with pyVmomi
(``conftest.connect``) and writes test files straight into the simulator's datastore, which
is a local directory (``Datastore.info.url``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import connect, vm_named, wait_task
from pyVmomi import vim

from vsphere_av import errors
from vsphere_av.config import Secret, VcenterSettings
from vsphere_av.lab import simulator
from vsphere_av.models import DatastoreInfo, FolderGrant, HostId, VirtualDiskInfo, VmId
from vsphere_av.vsphere import disks
from vsphere_av.vsphere.connection import Connection, TlsTrust
from vsphere_av.vsphere.connection import connect as vs_connect

pytestmark = pytest.mark.vcsim(hosts=2, vms=2)

VM = "DC0_C0_RP0_VM0"
PREFIX = "vsphere-av-scan "


@pytest.fixture
def conn(sim: simulator.Simulator) -> Iterator[Connection]:
    c = vs_connect(VcenterSettings(server=sim.host, port=sim.port, user=sim.username,
                                   password=Secret(sim.password), thumbprint=sim.thumbprint))
    try:
        yield c
    finally:
        c.close()


def _vm(sim: simulator.Simulator, name: str = VM) -> vim.VirtualMachine:
    return vm_named(connect(sim), name)


def _datastore_dir(vm: vim.VirtualMachine) -> Path:
    """Where the simulator keeps the VM's datastore on disk."""
    return Path(vm.datastore[0].info.url)


def _disk_devices(vm: vim.VirtualMachine) -> list[vim.vm.device.VirtualDisk]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def _names(found: tuple[VirtualDiskInfo, ...]) -> list[list[list[str]]]:
    """Per disk, per chain level, the names of its files."""
    return [[[f.name for f in unit.files] for unit in disk.chain] for disk in found]


# --- disks_of ------------------------------------------------------------------------------

def test_disks_of_names_each_disk_its_files_datastore_and_host(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    device = _disk_devices(vm)[0]
    ds = vm.datastore[0]

    found = disks.disks_of(conn, VmId(vm._moId))

    assert len(found) == len(_disk_devices(vm)) == 1
    disk = found[0]
    capacity = device.capacityInBytes or device.capacityInKB * 1024    # the simulator: KB
    assert (disk.vm, disk.key, disk.capacity) == (vm._moId, device.key, capacity)
    assert (disk.disk_mode, disk.backing, disk.independent) == ("persistent", "flat", False)
    assert disk.host == vm.runtime.host._moId
    assert disk.datastore == DatastoreInfo(moref=ds._moId, name=ds.name, datacenter_path="DC0")
    assert disk.file_name == device.backing.fileName
    # One level (no snapshot): the descriptor and its flat extent, as layoutEx lists them.
    assert len(disk.chain) == 1
    unit = disk.chain[0]
    assert unit.descriptor.name == device.backing.fileName
    assert unit.descriptor.path == f"{VM}/disk1.vmdk"
    assert [f.name for f in unit.extents] == [f"[{ds.name}] {VM}/disk1-flat.vmdk"]
    assert [f.type for f in unit.extents] == ["diskExtent"]


def test_disks_of_orders_a_chain_from_the_level_the_guest_sees_to_the_base(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    root = _datastore_dir(vm)
    for name in ("base.vmdk", "base-flat.vmdk", "child.vmdk", "child-flat.vmdk"):
        (root / VM / name).write_bytes(b"x" * 512)
    base = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName=f"[LocalDS_0] {VM}/base.vmdk", diskMode="persistent")
    child = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
        fileName=f"[LocalDS_0] {VM}/child.vmdk", diskMode="persistent", parent=base)
    scsi = next(d for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualSCSIController))
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualDisk(
            key=-1, backing=child, capacityInKB=1024, controllerKey=scsi.key,
            unitNumber=3))])))

    added = [d for d in disks.disks_of(conn, VmId(vm._moId))
             if d.file_name.endswith("child.vmdk")]

    assert len(added) == 1
    chain = added[0].chain
    assert [u.descriptor.path for u in chain] == [f"{VM}/child.vmdk", f"{VM}/base.vmdk"]
    assert [[f.path for f in u.extents] for u in chain] == [[f"{VM}/child-flat.vmdk"],
                                                            [f"{VM}/base-flat.vmdk"]]
    assert all(f.size == 512 for u in chain for f in u.files)


def test_disks_of_gives_the_datacenter_path_through_folders(
        sim: simulator.Simulator, conn: Connection) -> None:
    si = connect(sim)
    content = si.RetrieveContent()
    datacenter = content.rootFolder.childEntity[0]
    wait_task(content.rootFolder.CreateFolder("EU").MoveIntoFolder_Task([datacenter]))

    disk = disks.disks_of(conn, VmId(vm_named(si, VM)._moId))[0]

    assert disk.datastore.datacenter_path == "EU/DC0"


def test_disks_of_a_vm_that_is_gone_is_not_found(conn: Connection) -> None:
    with pytest.raises(errors.NotFound):
        disks.disks_of(conn, VmId("vm-999999"))


# --- scan snapshots ------------------------------------------------------------------------

def test_scan_snapshot_round_trip_leaves_no_snapshot(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    vm_id = VmId(vm._moId)
    before = disks.disks_of(conn, vm_id)
    assert vm.runtime.powerState == "poweredOn"

    taken = disks.create_scan_snapshot(conn, vm_id, name=PREFIX + "1")

    ref = taken.snapshot
    assert (ref.vm, ref.name, ref.description) == (vm_id, PREFIX + "1",
                                                   disks.SNAPSHOT_DESCRIPTION)
    assert ref.moref == vm.snapshot.currentSnapshot._moId
    tree = vm.snapshot.rootSnapshotList
    assert [(t.name, t.quiesced) for t in tree] == [(PREFIX + "1", False)]
    # The disks to read are those the VM had before the snapshot.
    assert [d.chain for d in taken.disks] == [d.chain for d in before]
    assert disks.find_scan_snapshots(conn, vm_id, prefix=PREFIX) == (ref,)
    assert disks.find_scan_snapshots(conn, None, prefix=PREFIX) == (ref,)

    assert disks.remove_snapshot(conn, ref) is True

    assert vm.snapshot is None
    assert disks.find_scan_snapshots(conn, None, prefix=PREFIX) == ()
    assert disks.remove_snapshot(conn, ref) is False      # already gone: nothing to do


@pytest.mark.vcsim(hosts=1, vms=1, disks=True)
def test_under_a_scan_snapshot_the_vm_writes_a_new_delta_and_the_frozen_chain_is_returned(
        sim: simulator.Simulator, conn: Connection) -> None:
    si = connect(sim)
    vm = vm_named(si, VM)
    vm_id = VmId(vm._moId)
    # An operator's snapshot first: the VM runs on delta 1 above the base disk.
    wait_task(vm.CreateSnapshot_Task(name="before patching", memory=False, quiesce=False))
    before = disks.disks_of(conn, vm_id)
    assert [u.descriptor.path for u in before[0].chain] == [f"{VM}/disk1-000001.vmdk",
                                                            f"{VM}/disk1.vmdk"]

    taken = disks.create_scan_snapshot(conn, vm_id, name=PREFIX + "delta")
    now = disks.disks_of(conn, vm_id)

    # The VM moved onto a new delta; the scan gets the chain it had before, all of it.
    assert [u.descriptor.path for u in now[0].chain] == [f"{VM}/disk1-000002.vmdk",
                                                         f"{VM}/disk1-000001.vmdk",
                                                         f"{VM}/disk1.vmdk"]
    # (Sizes differ: what the VM wrote to delta 1 until the snapshot is in it now.)
    assert _names(taken.disks) == _names(before)
    # The frozen files are readable on the VM's host, byte for byte as on the datastore.
    root = _datastore_dir(vm)
    host = taken.disks[0].host
    assert host == vm.runtime.host._moId
    with disks.DatastoreFiles(connection=conn) as files:
        for unit in taken.disks[0].chain:
            local = (root / unit.descriptor.path).read_bytes()
            with files.open(host, unit.descriptor.datastore, unit.descriptor.path) as f:
                assert f.size == unit.descriptor.size == len(local)
                assert f.read_range(0, 4) == b"KDMV"          # a sparse extent's magic
                assert f.read_range(512, 65536) == local[512:512 + 65536]

    assert disks.remove_snapshot(conn, taken.snapshot)
    assert _names(disks.disks_of(conn, vm_id)) == _names(before)
    assert [t.name for t in vm.snapshot.rootSnapshotList] == ["before patching"]
    assert disks.find_scan_snapshots(conn, vm_id, prefix=PREFIX) == ()


def test_a_scan_snapshot_left_by_a_crash_is_found_by_name_and_only_it_is_removed(
        sim: simulator.Simulator, conn: Connection) -> None:
    si = connect(sim)
    crashed, other = vm_named(si, VM), vm_named(si, "DC0_C0_RP0_VM1")
    # What a crash leaves: our snapshot on one VM, under and next to an operator's own.
    wait_task(crashed.CreateSnapshot_Task(name="before patching", memory=False, quiesce=False))
    wait_task(crashed.CreateSnapshot_Task(name=PREFIX + "2026-12-06T20:00:00Z",
                                          memory=False, quiesce=False))
    wait_task(other.CreateSnapshot_Task(name="vsphere-av-scanner backup", memory=False,
                                        quiesce=False))

    left = disks.find_scan_snapshots(conn, None, prefix=PREFIX)

    assert [(s.vm, s.name) for s in left] == [(crashed._moId, PREFIX + "2026-12-06T20:00:00Z")]
    for ref in left:
        assert disks.remove_snapshot(conn, ref)
    assert disks.find_scan_snapshots(conn, None, prefix=PREFIX) == ()
    assert [t.name for t in crashed.snapshot.rootSnapshotList] == ["before patching"]
    assert [t.name for t in other.snapshot.rootSnapshotList] == ["vsphere-av-scanner backup"]


def test_an_empty_prefix_is_refused(conn: Connection) -> None:
    with pytest.raises(ValueError, match="prefix"):
        disks.find_scan_snapshots(conn, None, prefix=" ")


@pytest.mark.parametrize("mode", ["independent_persistent", "independent_nonpersistent"])
def test_a_vm_with_an_independent_disk_is_refused_with_the_reason(
        sim: simulator.Simulator, conn: Connection, mode: str) -> None:
    vm = _vm(sim)
    disk = _disk_devices(vm)[0]
    disk.backing.diskMode = mode
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])))
    assert disks.disks_of(conn, VmId(vm._moId))[0].independent

    with pytest.raises(errors.SnapshotError) as caught:
        disks.create_scan_snapshot(conn, VmId(vm._moId), name=PREFIX + "x")

    assert f"is {mode}" in str(caught.value)
    assert "cannot be frozen" in str(caught.value)
    assert vm.snapshot is None


def test_a_snapshot_vcenter_refuses_is_a_snapshot_error_with_its_fault(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(
        flags=vim.vm.FlagInfo(snapshotDisabled=True))))

    with pytest.raises(errors.SnapshotError) as caught:
        disks.create_scan_snapshot(conn, VmId(vm._moId), name=PREFIX + "x")

    # The task failed (the simulator answers as vSphere does): the fault's name and text.
    assert str(caught.value).startswith(f"snapshot {vm._moId} for scanning: SnapshotDisabled")
    assert vm.snapshot is None
    assert disks.find_scan_snapshots(conn, None, prefix=PREFIX) == ()


def test_snapshot_of_a_vm_that_is_gone_is_not_found(conn: Connection) -> None:
    with pytest.raises(errors.NotFound):
        disks.create_scan_snapshot(conn, VmId("vm-999999"), name=PREFIX + "x")


# --- datastore range reads -----------------------------------------------------------------

def _plant(vm: vim.VirtualMachine, name: str, data: bytes) -> str:
    """Write a file into the VM's directory on its datastore; its path in the datastore."""
    path = f"{vm.name}/{name}"
    (_datastore_dir(vm) / path).write_bytes(data)
    return path


def _where(vm: vim.VirtualMachine) -> tuple[HostId, DatastoreInfo]:
    ds = vm.datastore[0]
    return HostId(vm.runtime.host._moId), DatastoreInfo(moref=ds._moId, name=ds.name,
                                                         datacenter_path="DC0")


def test_range_reads_return_exactly_the_bytes_asked_for(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = _plant(vm, "probe file.bin", data)       # a space: the path is quoted
    host, ds = _where(vm)

    with disks.DatastoreFiles(connection=conn) as files, files.open(host, ds, path) as f:
        assert f.size == len(data)
        for offset, length in [(0, 1), (1, 4096), (1_048_575, 2), (12_345, 1_500_000),
                               (len(data) - 10, 10), (0, len(data))]:
            assert f.read_range(offset, length) == data[offset:offset + length], (offset, length)
        # At the end: fewer bytes, then none, and nothing read past it.
        assert f.read_range(len(data) - 5, 100) == data[-5:]
        assert f.read_range(len(data), 10) == b""
        assert f.read_range(7, 0) == b""
        with pytest.raises(ValueError, match="larger"):
            f.read_range(0, disks.MAX_RANGE + 1)


def test_many_files_share_one_host_session(sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    host, ds = _where(vm)
    blobs = {f"f{i}.bin": hashlib.sha256(str(i).encode()).digest() * (i + 1) for i in range(5)}
    with disks.DatastoreFiles(connection=conn, pool_size=2) as files:
        for name, data in blobs.items():
            with files.open(host, ds, _plant(vm, name, data)) as f:
                assert f.read_range(0, f.size) == data
        assert repr(files) == "DatastoreFiles(hosts=1, pool_size=2)"
        empty = files.open(host, ds, _plant(vm, "empty.bin", b""))
        assert (empty.size, empty.read_range(0, 10)) == (0, b"")


def test_a_missing_file_is_not_found_with_its_path(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    host, ds = _where(vm)
    with disks.DatastoreFiles(connection=conn) as files, \
            pytest.raises(errors.NotFound) as caught:
        files.open(host, ds, f"{VM}/no-such.vmdk")
    assert f"[LocalDS_0] {VM}/no-such.vmdk" in str(caught.value)
    assert "404" in str(caught.value)


def test_every_request_carries_a_ticket_the_host_accepts_on_one_kept_connection(
        sim: simulator.Simulator, conn: Connection) -> None:
    # The simulator's /folder wants credentials and takes a ticket once, for one URL.
    vm = _vm(sim)
    data = os.urandom(10_000)
    host, ds = _where(vm)
    with disks.DatastoreFiles(connection=conn) as files:
        with files.open(host, ds, _plant(vm, "a.bin", data)) as f:
            for i in range(4):
                assert f.read_range(i * 1000, 1000) == data[i * 1000:(i + 1) * 1000]
        # The size probe took a ticket; the first read found it used up (one refusal) and
        # took a fresh one; from then on every request to that host brings a fresh ticket,
        # a few fetched ahead while the last one is in use.
        got = files.statistics()
        assert (got.hosts, got.connections, got.requests, got.tickets_used) == (1, 1, 6, 5)
        assert 5 <= got.tickets <= 5 + disks.MAX_AHEAD
        with files.open(host, ds, _plant(vm, "b.bin", data)) as f:
            assert f.read_range(5000, 10) == data[5000:5010]
        got = files.statistics()
        assert (got.hosts, got.connections, got.requests, got.tickets_used) == (1, 1, 8, 7)
        assert 7 <= got.tickets <= 7 + 2 * disks.MAX_AHEAD


def test_threads_reading_one_file_through_a_small_pool_each_get_their_bytes(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    data = os.urandom(2 * 1024 * 1024)
    host, ds = _where(vm)
    chunk = 64 * 1024
    offsets = list(range(0, len(data), chunk))
    with disks.DatastoreFiles(connection=conn, pool_size=2) as files, \
            files.open(host, ds, _plant(vm, "shared.bin", data)) as f, \
            ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda off: f.read_range(off, chunk), offsets))
    assert b"".join(got) == data


def test_a_ticket_the_host_refuses_is_a_permission_error_with_the_reason(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    host, ds = _where(vm)
    path = _plant(vm, "bait.bin", b"not for you")

    class OtherFilesTicket(disks.DatastoreFiles):
        """Asks vCenter for tickets to another file (as a stale or foreign ticket would be)."""

        def ticket(self, url: str) -> str:
            return super().ticket(url.replace("/bait.bin", "/other.bin"))

    with OtherFilesTicket(connection=conn) as files, \
            pytest.raises(errors.PermissionDenied) as caught:
        files.open(host, ds, path)
    assert "HTTP 403" in str(caught.value)
    assert "Datastore.Browse" in str(caught.value)
    assert f"[LocalDS_0] {path}" in str(caught.value)


def test_a_host_that_does_not_answer_is_a_transient_error(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    host, ds = _where(vm)
    with socket.socket() as probe:          # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with disks.DatastoreFiles(connection=conn, host_port=closed) as files, \
            pytest.raises(errors.ConnectionLost, match="unreachable"):
        files.open(host, ds, _plant(vm, "c.bin", b"x"))


@pytest.mark.vcsim(hosts=1, vms=1, disks=True)
def test_a_disk_the_host_cannot_read_is_not_found(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    disk = disks.disks_of(conn, VmId(vm._moId))[0]
    top = disk.chain[0].descriptor
    assert disk.host is not None
    with disks.DatastoreFiles(connection=conn) as files:
        with files.open(disk.host, top.datastore, top.path) as f:
            assert f.read_range(0, 4) == b"KDMV"
        # The simulator's stand-in for a datastore the host has lost.
        wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="vcsim.disk.inaccessible", value="TRUE")])))
        with pytest.raises(errors.NotFound, match="HTTP 404"):
            files.open(disk.host, top.datastore, top.path)


def test_a_host_certificate_other_than_the_pinned_one_is_refused(
        sim: simulator.Simulator, conn: Connection) -> None:
    vm = _vm(sim)
    path = _plant(vm, "secret.bin", b"never read")
    host, ds = _where(vm)
    # The simulator serves vCenter and every host with one certificate and reports none for
    # the hosts, so the host pin is vCenter's (guest.py's trust order). Pinning another
    # thumbprint after login presents a host whose certificate is not the pinned one.
    conn.trust = TlsTrust(thumbprint=":".join(["AB"] * 32))
    with disks.DatastoreFiles(connection=conn) as files, \
            pytest.raises(errors.TlsVerificationError, match="pinned thumbprint"):
        files.open(host, ds, path)


def test_granted_files_read_on_leave_with_the_host_pinned_and_refuse_bad_grants(
        sim: simulator.Simulator, conn: Connection) -> None:
    # The appliance's reader: no vCenter connection, only grants (URL, ticket, pin).
    vm = _vm(sim)
    data = os.urandom(1024 * 1024 + 3)
    path = _plant(vm, "granted.bin", data)
    host, ds = _where(vm)
    with disks.DatastoreFiles(connection=conn) as files:
        asked: list[tuple[str, str, int]] = []

        def grant(datastore: DatastoreInfo, name: str, *, tickets: int = 1) -> FolderGrant:
            asked.append((datastore.name, name, tickets))
            return files.grant(host, datastore, name, tickets=tickets)

        reader = disks.GrantedFiles(grant=grant)
        try:
            f = reader.open(host, ds, path)
            assert f.size == len(data)
            for offset in range(0, len(data), 32_768):
                assert f.read_range(offset, 32_768) == data[offset:offset + 32_768]
        finally:
            reader.close()      # waits for grants still coming
        # The simulator takes each ticket once: after the size probe and the refused reuse,
        # grants come ahead of need, each for more tickets as the file is read (at most
        # 1 + MAX_SPARE), so far fewer grants than requests and few tickets to spare.
        requests = 1 + 1 + len(range(0, len(data), 32_768))
        assert asked[0][2] == 1
        assert {(d, p) for d, p, _ in asked} == {(ds.name, path)}
        assert len(asked) <= requests // 3
        assert max(n for _, _, n in asked) <= 1 + disks.MAX_SPARE
        assert requests - 1 <= sum(n for _, _, n in asked) <= requests + 2 * (1 + disks.MAX_SPARE)
        assert files.statistics().tickets == sum(n for _, _, n in asked)

        good = files.grant(host, ds, path)
        wrong_pin = FolderGrant(url=good.url, ticket=good.ticket, thumbprint="AB" * 32)
        bad = [
            (wrong_pin, errors.TlsVerificationError, "pinned"),
            (FolderGrant(url=good.url, ticket=good.ticket, thumbprint=""),
             errors.TlsVerificationError, "SHA-256"),
            (FolderGrant(url=good.url.replace("https:", "http:"), ticket=good.ticket,
                               thumbprint=good.thumbprint), errors.VsphereError, "https"),
            (FolderGrant(url=good.url.replace("/folder/", "/guestFile/"),
                               ticket=good.ticket, thumbprint=good.thumbprint),
             errors.VsphereError, "/folder"),
        ]
        for given, error, words in bad:
            reader = disks.GrantedFiles(grant=lambda _ds, _p, g=given, **_: g)
            try:
                with pytest.raises(error, match=words):
                    reader.open(host, ds, path)
            finally:
                reader.close()


def _ticket_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("datastore-tickets")]


@pytest.mark.vcsim(hosts=1, vms=1, ticket_delay=0.05)
def test_on_a_slow_vcenter_tickets_come_ahead_of_the_reads_and_stop_with_the_reader(
        sim: simulator.Simulator, conn: Connection) -> None:
    # Each ticket takes the simulator 50 ms (a real vCenter's round trip) and the host takes
    # each once: one after another, 40 reads would wait 2 s for their tickets.
    vm = _vm(sim)
    data = os.urandom(40_000)
    host, ds = _where(vm)
    files = disks.DatastoreFiles(connection=conn)
    try:
        with files.open(host, ds, _plant(vm, "first.bin", b"0123456789")) as f:
            assert f.read_range(0, 10) == b"0123456789"    # learns: one ticket, one request
        assert files.statistics().requests == 3             # probe, refused reuse, read
        with files.open(host, ds, _plant(vm, "slow.bin", data)) as f:
            for i in range(40):
                assert f.read_range(i * 1000, 1000) == data[i * 1000:(i + 1) * 1000]
        # (What it saves in time is bench/tickets.py's business, not a test's.)
        got = files.statistics()
        # No ticket was used twice: not one request more than the reads (no 403, no retry).
        assert (got.requests, got.tickets_used) == (3 + 1 + 40, 2 + 1 + 40)
        assert got.tickets <= got.tickets_used + 2 * disks.MAX_AHEAD
        assert _ticket_threads()
    finally:
        files.close()
    # Closing waits for the fetches under way: none runs on, each ticket is counted.
    assert _ticket_threads() == []
    got = files.statistics()
    assert got.tickets == got.tickets_used + got.tickets_unused
    time.sleep(0.2)
    assert files.statistics().tickets == got.tickets


def test_tickets_fetched_ahead_and_left_unused_are_dropped_after_spare_ttl(
        sim: simulator.Simulator, conn: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disks, "SPARE_TTL", 0.3)
    vm = _vm(sim)
    data = os.urandom(10_000)
    host, ds = _where(vm)
    with disks.DatastoreFiles(connection=conn) as files:
        with files.open(host, ds, _plant(vm, "spare.bin", data)) as f:
            for i in range(8):
                assert f.read_range(i * 1000, 1000) == data[i * 1000:(i + 1) * 1000]
            deadline = time.monotonic() + 30        # the stock fills in the background
            while files.statistics().tickets <= files.statistics().tickets_used:
                assert time.monotonic() < deadline, "no ticket was fetched ahead"
                time.sleep(0.02)
            before = files.statistics()
            assert before.tickets > before.tickets_used
            assert before.tickets_unused == 0
            time.sleep(0.4)                 # ... and goes stale (SPARE_TTL is 0.3 s here)
            assert f.read_range(9000, 1000) == data[9000:]
            after = files.statistics()
            assert after.tickets_unused >= 1
            assert after.requests == before.requests + 1     # the stale ones were not tried
        got = files.statistics()
        assert got.tickets_used == 1 + 9            # the probe, the reads
        assert got.tickets - got.tickets_used - got.tickets_unused <= disks.MAX_AHEAD


@pytest.mark.vcsim(hosts=1, vms=1, ticket_delay=0.05)
def test_a_grant_of_many_tickets_on_a_slow_vcenter_brings_them_all_and_no_thread_stays(
        sim: simulator.Simulator, conn: Connection) -> None:
    # The appliance's long-poll waits for the whole grant: its tickets are fetched side by
    # side (what that saves is bench/tickets.py's business); all distinct, all counted.
    vm = _vm(sim)
    host, ds = _where(vm)
    path = _plant(vm, "granted.bin", b"x" * 100)
    with disks.DatastoreFiles(connection=conn) as files:
        files.grant(host, ds, path)         # the host is read once per DatastoreFiles
        grant = files.grant(host, ds, path, tickets=8)
        assert len({grant.ticket, *grant.spare}) == 8
        assert files.statistics().tickets == 1 + 8
    assert _ticket_threads() == []
