"""VMs with more than one virtual disk, scanned through their disks (issue 12).

Called by pytest. The simulator runs with ``-disks``; a second disk is added the way an
administrator adds one (``ReconfigVM_Task``, a new VirtualDisk the host creates), and the
simulator builds it from the VM's guest tree: ``/data`` of a Linux guest (ext4 or XFS, and
an ``/etc/fstab`` line on the first disk that mounts it), ``D:`` of a Windows guest
(NTFS). A file that lives only there must be found and reported with the path the guest
gives it, and a second disk that cannot be read must keep the VM from being "protected"
even when the first disk is clean. The disks are read back locally with the product's own
Dissect reader to check what the simulator built; everything else goes through the real
``vsphere-av`` (App or CLI), the real YARA engine and the host's ``/folder`` interface.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import connect, env_for, plant, vm_named, wait_task
from pyVmomi import vim

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.config import Secret, VcenterSettings
from vsphere_av.lab import simulator
from vsphere_av.models import VmId
from vsphere_av.scan.sources.diskimage import DiskFiles, open_virtual_disk
from vsphere_av.vsphere import disks as vs_disks
from vsphere_av.vsphere.connection import connect as vs_connect

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
FSTAB = b"LABEL=root / ext4 defaults 0 1\n"
VM0, VM1, VM2, VM3 = (f"DC0_C0_RP0_VM{i}" for i in range(4))

pytestmark = pytest.mark.vcsim(hosts=1, vms=4, disks=True)


@pytest.fixture
def si(sim: simulator.Simulator) -> Any:
    return connect(sim)


def no_guest_env(sim: simulator.Simulator, state: Path) -> dict[str, str]:
    env = env_for(sim, state)
    del env["VSPHERE_AV_GUEST_USER"], env["VSPHERE_AV_GUEST_PASSWORD"]
    return env


def settings(sim: simulator.Simulator, state: Path) -> config.Settings:
    return config.load(config_file=None, env=no_guest_env(sim, state))


def disks(si: Any, name: str) -> list[Any]:
    return [d for d in vm_named(si, name).config.hardware.device
            if isinstance(d, vim.vm.device.VirtualDisk)]


def add_disk(si: Any, name: str, *, guest_id: str = "", **extra: str) -> Any:
    """Add a new 64 MiB disk (the host creates its file) and, in the same reconfigure,
    the extraConfig keys (``vcsim_disk2_fs`` -> ``vcsim.disk2.fs``); returns the device."""
    vm = vm_named(si, name)
    scsi = next(d for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualSCSIController))
    used = {d.unitNumber for d in vm.config.hardware.device if d.controllerKey == scsi.key}
    spec = vim.vm.ConfigSpec(
        extraConfig=[vim.option.OptionValue(key=k.replace("_", "."), value=v)
                     for k, v in extra.items()],
        deviceChange=[vim.vm.device.VirtualDeviceSpec(
            operation="add", fileOperation="create", device=vim.vm.device.VirtualDisk(
                key=-1, controllerKey=scsi.key, unitNumber=max(used) + 1,
                capacityInKB=64 * 1024, backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName="", diskMode="persistent", thinProvisioned=True)))])
    if guest_id:
        spec.guestId = guest_id
    wait_task(vm.ReconfigVM_Task(spec), timeout=120)
    return next(d for d in disks(si, name)
                if d.controllerKey == scsi.key and d.unitNumber == max(used) + 1)


def power_off(si: Any, name: str) -> None:
    wait_task(vm_named(si, name).PowerOffVM_Task(), timeout=120)


def datastore_dir(si: Any, name: str) -> Path:
    vm = vm_named(si, name)
    return Path(vm.datastore[0].info.url) / name


def _open(si: Any, name: str, device: Any) -> Any:
    """A disk as the guest sees it now (its leaf and the chain under it), read locally."""
    directory = datastore_dir(si, name)
    top = device.backing.fileName.split("] ", 1)[1].split("/", 1)[1]
    return open_virtual_disk(top, open_file=lambda n: (directory / n).open("rb"))


def read_guest_file(si: Any, name: str, guest_path: str) -> bytes:
    """One file's bytes as the VM's disks, mounted together, hold it."""
    ordered = sorted(disks(si, name), key=lambda d: d.unitNumber)
    with DiskFiles.mount([_open(si, name, d) for d in ordered]) as files:
        entry = next(f for f in files.walk() if f.path == guest_path)
        with files.open(entry) as stream:
            return b"".join(stream.chunks())


def local_files(si: Any, name: str) -> dict[str, list[str]]:
    """Each disk's guest paths, read locally from the datastore with the product's reader:
    the disks one at a time (what is on each) and together (where the guest mounts them)."""
    def opened(device: Any) -> Any:
        return _open(si, name, device)

    out: dict[str, list[str]] = {}
    devices = disks(si, name)
    for device in devices:
        with DiskFiles.mount([opened(device)]) as files:
            out[device.backing.fileName] = sorted(f.path for f in files.walk())
    ordered = sorted(devices, key=lambda d: d.unitNumber)
    with DiskFiles.mount([opened(d) for d in ordered]) as files:
        out["together"] = sorted(f.path for f in files.walk())
    return out


# --- what the simulator builds ---------------------------------------------------------------

@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_a_linux_vm_second_disk_holds_data_and_the_first_disk_mounts_it(
        sim: simulator.Simulator, si: Any, tmp_path: Path, fs: str) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/home/u/notes.txt", b"hello\n")
    plant(sim, VM0, "/data/srv/payload.bin", EICAR)
    first = disks(si, VM0)[0].backing.fileName
    second = add_disk(si, VM0, vcsim_disk2_fs=fs).backing.fileName
    assert second != first
    power_off(si, VM0)

    found = local_files(si, VM0)

    assert "/data/srv/payload.bin" not in found[first]        # only on the second disk
    assert "/home/u/notes.txt" in found[first]
    assert found[second] == ["/[unmounted]/disk0-p1/srv/payload.bin"]   # alone: no fstab
    assert "/data/srv/payload.bin" in found["together"]        # mounted per the first disk
    # The guest tree is never changed: the fstab line is only on the disk.
    assert (sim.guest_root / VM0 / "etc" / "fstab").read_bytes() == FSTAB
    assert not [p for p in sim.guest_root.iterdir() if p.name.startswith(".vcsim-stage")]

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM0]).results[0]

    assert (r.via, r.status, r.incomplete) == ("disk", "infected", 0), r.reason
    assert [(f.path, f.threat) for f in r.found] == [("/data/srv/payload.bin", "EICAR-Test-File")]


def test_each_disk_gets_its_own_delta_under_a_snapshot_and_is_consolidated_after(
        sim: simulator.Simulator, si: Any) -> None:
    plant(sim, VM3, "/etc/fstab", FSTAB)
    plant(sim, VM3, "/data/a.txt", b"before\n")
    add_disk(si, VM3)
    vm = vm_named(si, VM3)
    bases = sorted(d.backing.fileName for d in disks(si, VM3))

    wait_task(vm.CreateSnapshot_Task(name="s1", memory=False, quiesce=False), timeout=120)

    leaves = sorted(d.backing.fileName for d in disks(si, VM3))
    assert leaves == [b.replace(".vmdk", "-000001.vmdk") for b in bases]
    assert sorted(d.backing.parent.fileName for d in disks(si, VM3)) == bases
    snapshot_layout = vm.layoutEx.snapshot[0]
    assert sorted(d.key for d in snapshot_layout.disk) == sorted(d.key for d in disks(si, VM3))
    assert all(len(d.chain) == 1 for d in snapshot_layout.disk)
    for leaf in leaves:
        assert (datastore_dir(si, VM3) / leaf.rsplit("/", 1)[1]).is_file()
    # The second disk's delta takes the change at power-off; a revert drops it again.
    plant(sim, VM3, "/data/a.txt", b"after\n")
    power_off(si, VM3)
    assert read_guest_file(si, VM3, "/data/a.txt") == b"after\n"
    snapshot = vm.snapshot.rootSnapshotList[0].snapshot
    wait_task(snapshot.RevertToSnapshot_Task(suppressPowerOn=True), timeout=120)
    assert sorted(d.backing.fileName for d in disks(si, VM3)) == leaves
    assert read_guest_file(si, VM3, "/data/a.txt") == b"before\n"

    wait_task(snapshot.RemoveSnapshot_Task(removeChildren=False), timeout=120)

    assert sorted(d.backing.fileName for d in disks(si, VM3)) == bases
    assert all(d.backing.parent is None for d in disks(si, VM3))
    for leaf in leaves:
        assert not (datastore_dir(si, VM3) / leaf.rsplit("/", 1)[1]).exists()


# --- the product reads every disk ------------------------------------------------------------

def test_disks_of_lists_the_disks_in_the_guest_order_with_their_files_and_frozen_chains(
        sim: simulator.Simulator, si: Any) -> None:
    plant(sim, VM3, "/data/a.txt", b"a\n")
    second = add_disk(si, VM3)
    first = next(d for d in disks(si, VM3) if d.key != second.key)
    assert second.key < first.key            # the library's new key sorts before disk 1's
    moref = VmId(vm_named(si, VM3)._moId)
    conn = vs_connect(VcenterSettings(server=sim.host, port=sim.port, user=sim.username,
                                      password=Secret(sim.password), thumbprint=sim.thumbprint))
    try:
        found = vs_disks.disks_of(conn, moref)
        snap = vs_disks.create_scan_snapshot(conn, moref, name="vsphere-av-scan test")
        vs_disks.remove_snapshot(conn, snap.snapshot)
    finally:
        conn.close()

    assert [d.file_name for d in found] == [first.backing.fileName, second.backing.fileName]
    assert all(d.chain[0].descriptor.size > 0 for d in found)    # listed in layoutEx
    assert [d.key for d in snap.disks] == [first.key, second.key]
    assert [d.file_name for d in snap.disks] == [d.file_name for d in found]   # frozen bases


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsphere_av", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_scan_via_disk_reports_files_on_second_disks_as_the_guest_names_them(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/data/cron/job.sh", EICAR)
    add_disk(si, VM0)
    plant(sim, VM1, "C/Windows/System32/drivers/etc/hosts", b"127.0.0.1 localhost\n")
    plant(sim, VM1, "C/Users/Bob/notes.txt", b"nothing here\n")
    plant(sim, VM1, "D/Shares/Finance/invoice.exe", EICAR)
    add_disk(si, VM1, guest_id="windows9_64Guest")
    for name in (VM0, VM1):
        power_off(si, name)

    proc = cli(no_guest_env(sim, tmp_path / "state"), "scan", "--via", "disk", VM0, VM1,
               "--json")

    assert proc.returncode == 1, proc.stdout + proc.stderr
    by_vm = {d["vm"]: d for d in json.loads(proc.stdout)["vms"]}
    assert [(by_vm[n]["via"], by_vm[n]["status"]) for n in (VM0, VM1)] == [
        ("disk", "infected")] * 2
    assert [d["path"] for d in by_vm[VM0]["detections"]] == ["/data/cron/job.sh"]
    assert [d["path"] for d in by_vm[VM1]["detections"]] == [
        "D:\\Shares\\Finance\\invoice.exe"]
    # The Windows file is on the second disk only: C: holds none of D:'s tree.
    found = local_files(si, VM1)
    first = disks(si, VM1)[0].backing.fileName
    assert not any("invoice.exe" in p for p in found[first])
    assert "D:\\Shares\\Finance\\invoice.exe" in found["together"]


def test_a_running_vm_is_read_through_both_disks_under_one_snapshot(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM3, "/etc/fstab", FSTAB)
    plant(sim, VM3, "/var/lib/app/x.bin", EICAR)
    add_disk(si, VM3, vcsim_disk2_mount="/var/lib/app")

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM3], via="disk").results[0]

    assert (r.via, r.status, r.incomplete) == ("disk", "infected", 0), r.reason
    assert [f.path for f in r.found] == ["/var/lib/app/x.bin"]
    assert vm_named(si, VM3).snapshot is None           # the scan snapshot is gone
    assert all(d.backing.parent is None for d in disks(si, VM3))


@pytest.mark.parametrize("unreadable", ["inaccessible-datastore", "independent-disk"])
def test_a_vm_whose_second_disk_cannot_be_read_is_never_protected(
        sim: simulator.Simulator, si: Any, tmp_path: Path, unreadable: str) -> None:
    name = VM0 if unreadable == "inaccessible-datastore" else VM3
    plant(sim, name, "/etc/fstab", FSTAB)
    plant(sim, name, "/etc/motd", b"hello\n")            # the first disk is clean
    plant(sim, name, "/data/db/table.dat", b"rows\n")
    if unreadable == "inaccessible-datastore":
        second = add_disk(si, name, vcsim_disk2_inaccessible="TRUE")
        power_off(si, name)
        words = [second.backing.fileName, "HTTP 404"]
    else:
        second = add_disk(si, name)
        second.backing.diskMode = "independent_persistent"
        wait_task(vm_named(si, name).ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation="edit", device=second)])))
        words = [second.deviceInfo.label, "independent_persistent"]
    state = tmp_path / "state"

    with App(settings(sim, state)) as app:
        report = app.scan(names=[name], via="disk")
        r = report.results[0]
        row = next(s for s in app.status(refresh=False) if s["name"] == name)

    assert (r.via, r.status) == ("disk", "incomplete"), r.reason
    assert all(w in r.reason for w in words), r.reason
    assert "\n" not in r.reason
    assert report.exit_code() == 2
    assert (row["state"], row["reason"]) == ("unprotected", r.reason)
    assert vm_named(si, name).snapshot is None
