"""Scanning VMs through their virtual disks (issue 12) against the bundled simulator.

Called by pytest. The simulator runs with ``-disks``: every VM's first disk is a real VMDK
in its datastore directory, built by ``vcsim/mkdisk.sh`` from the VM's guest tree when the
VM powers off or is snapshotted (ext4, NTFS for Windows guests, LVM, LUKS on request).
vsphere-av reads it through the host's ``/folder`` interface with Dissect, scans with the
real YARA engine (built-in EICAR bundle), and records into real SQLite files. pyVmomi is
used here only to drive the simulator (power, extraConfig, snapshots) and to read back
what the product did (NICs, snapshots); the datastore directory is written only to damage
a disk on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import connect, env_for, plant, vm_named, wait_task
from prometheus_client.parser import text_string_to_metric_families
from pyVmomi import vim

from vsphere_av import config
from vsphere_av.api.metrics import render
from vsphere_av.app import SNAPSHOT_PREFIX, App
from vsphere_av.lab import simulator
from vsphere_av.models import VmId
from vsphere_av.scan.sources.diskimage import DiskFiles, open_virtual_disk
from vsphere_av.store.audit import AuditLog
from vsphere_av.store.jobs import JobStore

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
FSTAB = b"LABEL=root / ext4 defaults 0 1\n"
MKDISK = Path(__file__).resolve().parents[2] / "vcsim" / "mkdisk.sh"
VM0, VM1, VM2, VM3 = (f"DC0_C0_RP0_VM{i}" for i in range(4))

pytestmark = pytest.mark.vcsim(hosts=1, vms=4, disks=True)


def no_guest_env(sim: simulator.Simulator, state: Path) -> dict[str, str]:
    """vCenter only: no guest user or password anywhere."""
    env = env_for(sim, state)
    del env["VSPHERE_AV_GUEST_USER"], env["VSPHERE_AV_GUEST_PASSWORD"]
    return env


def settings(sim: simulator.Simulator, state: Path, *, toml: str = "",
             guest: bool = False) -> config.Settings:
    cfg = None
    if toml:
        cfg = state.parent / f"{state.name}.toml"
        cfg.write_text(toml)
    env = env_for(sim, state) if guest else no_guest_env(sim, state)
    return config.load(config_file=cfg, env=env)


@pytest.fixture
def si(sim: simulator.Simulator) -> Any:
    return connect(sim)


def reconfig(si: Any, name: str, **extra: str) -> None:
    vm = vm_named(si, name)
    wait_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key=k.replace("_", "."), value=v) for k, v in extra.items()])))


def power_off(si: Any, name: str) -> None:
    """Power a VM off; the simulator rebuilds its disk from the guest tree before answering."""
    wait_task(vm_named(si, name).PowerOffVM_Task(), timeout=120)


def nics(si: Any, name: str) -> list[tuple[bool, bool]]:
    return [(d.connectable.connected, d.connectable.startConnected)
            for d in vm_named(si, name).config.hardware.device
            if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def actions(state: Path) -> list[tuple[str, dict[str, Any]]]:
    with AuditLog.open(state) as log:
        return [(e.action, e.details) for e in log.entries()]


def snapshots(si: Any, name: str) -> list[str]:
    vm = vm_named(si, name)
    out: list[str] = []
    stack = list(vm.snapshot.rootSnapshotList) if vm.snapshot else []
    while stack:
        node = stack.pop()
        out.append(node.name)
        stack.extend(node.childSnapshotList or [])
    return out


# --- powered-off VMs -----------------------------------------------------------------------

def test_a_dormant_linux_vm_is_found_infected_through_its_disk_and_cut_off_before_it_boots(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/etc/cron.d/job", b"* * * * * root /opt/x\n")
    plant(sim, VM0, "/opt/app/dropper.bin", EICAR)
    assert all(start for _, start in nics(si, VM0))
    power_off(si, VM0)
    state = tmp_path / "state"

    with App(settings(sim, state)) as app:
        assert app.settings.guest.user == ""
        report = app.scan(names=[VM0])

        r = report.results[0]
        assert (r.via, r.status) == ("disk", "infected"), r.reason
        assert [(f.path, f.threat, f.action) for f in r.found] == [
            ("/opt/app/dropper.bin", "EICAR-Test-File", "pending")]
        assert "next power-on through guest operations" in r.found[0].detail
        assert r.scanned >= 3
        assert r.incomplete == 0
        assert report.exit_code() == 1
        row = next(s for s in app.status(refresh=False) if s["name"] == VM0)
        assert row["state"] == "infected"
        moref = r.moref
    # Cut while off: nothing connected, nothing set to connect at power-on.
    assert nics(si, VM0)
    assert all(n == (False, False) for n in nics(si, VM0))
    with JobStore.open(state) as jobs:
        record = jobs.isolation(moref)
        assert record is not None
        assert record.state == "isolated"
        assert record.held.startswith("detection (disk scan")
        assert all(n["start_connected"] for n in record.nics)    # what release gives back
    audited = actions(state)
    assert ("isolation.isolate", "disk scan") in [(a, d.get("trigger")) for a, d in audited]
    assert any(a == "detection" and d["path"] == "/opt/app/dropper.bin" for a, d in audited)
    assert any(a == "remediation" and d["result"] == "pending" for a, d in audited)
    # Nothing was written to the disk: the datastore files are as the simulator left them.
    assert not any(a.startswith("disk.snapshot") for a, _ in audited)


def test_a_dormant_windows_vm_names_its_files_as_windows_does(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    wait_task(vm_named(si, VM1).ReconfigVM_Task(vim.vm.ConfigSpec(guestId="windows9_64Guest")))
    plant(sim, VM1, "C/Windows/System32/drivers/etc/hosts", b"127.0.0.1 localhost\n")
    plant(sim, VM1, "C/Users/Bob/Downloads/invoice.exe", EICAR)
    power_off(si, VM1)

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM1]).results[0]

    assert (r.via, r.status) == ("disk", "infected"), r.reason
    assert [(f.path, f.action) for f in r.found] == [
        ("C:\\Users\\Bob\\Downloads\\invoice.exe", "pending")]


def test_a_dormant_vm_on_lvm_is_read_through_its_logical_volume(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    reconfig(si, VM2, vcsim_disk_layout="lvm")
    plant(sim, VM2, "/etc/fstab", b"/dev/mapper/vg0-root / ext4 defaults 0 1\n")
    plant(sim, VM2, "/var/tmp/.x/payload", EICAR)
    power_off(si, VM2)

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM2]).results[0]

    assert (r.via, r.status, r.incomplete) == ("disk", "infected", 0), r.reason
    assert [f.path for f in r.found] == ["/var/tmp/.x/payload"]


def test_a_dormant_vm_on_xfs_and_mbr_is_read(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    reconfig(si, VM1, vcsim_disk_fs="xfs", vcsim_disk_layout="mbr")
    plant(sim, VM1, "/etc/fstab", b"/dev/sda1 / xfs defaults 0 0\n")
    plant(sim, VM1, "/usr/local/bin/helper", EICAR)
    power_off(si, VM1)

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM1]).results[0]

    assert (r.via, r.status, r.incomplete) == ("disk", "infected", 0), r.reason
    assert [f.path for f in r.found] == ["/usr/local/bin/helper"]
    # What the simulator built (read locally): one XFS partition on an MBR disk.
    directory = datastore_dir(si, VM1)
    disk = open_virtual_disk("disk1.vmdk", open_file=lambda n: (directory / n).open("rb"))
    with DiskFiles.mount([disk]) as files:
        assert [(v.filesystem, v.mount) for v in files.volumes] == [("xfs", "/")]
        assert files.volumes[0].partition_uuid == ""        # MBR partitions carry no GUID


def test_unchanged_files_are_not_read_again_and_full_reads_everything(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    for i in range(5):
        plant(sim, VM0, f"/srv/data/blob{i}.bin", os.urandom(300_000))
    power_off(si, VM0)

    with App(settings(sim, tmp_path / "state")) as app:
        first = app.scan(names=[VM0]).results[0]
        second = app.scan(names=[VM0]).results[0]
        full = app.scan(names=[VM0], full=True).results[0]
        guest_rows = app.store.query("SELECT COUNT(*) AS n FROM files WHERE vm_moref = ?",
                                     (first.moref,))

    assert (first.status, second.status, full.status) == ("clean", "clean", "clean")
    assert first.scanned >= 6
    assert (second.scanned, second.unchanged) == (0, first.scanned)
    # The second run read file system metadata only: far less than the 1.5 MB of files.
    assert first.disk_read > 1_500_000
    assert second.disk_read < first.disk_read - 1_500_000
    assert (full.scanned, full.unchanged) == (first.scanned, 0)
    assert full.disk_read > 1_500_000
    # Disk rows never mix with the guest-path index of the same VM.
    assert guest_rows[0]["n"] == 0


def test_a_slow_vcenter_ticket_changes_nothing_in_what_a_disk_scan_finds(
        vcsim_factory: Any, tmp_path: Path) -> None:
    # The same guest on a simulator that answers tickets at once and on one that takes
    # 30 ms a ticket (a real vCenter), read in this process (tickets fetched ahead there).
    found = []
    for delay in (0.0, 0.03):
        sim = vcsim_factory(hosts=1, vms=1, disks=True, ticket_delay=delay)
        plant(sim, VM0, "/etc/fstab", FSTAB)
        for i in range(60):
            plant(sim, VM0, f"/srv/small/f{i}.txt", b"%d\n" % i * (50 + i))
        plant(sim, VM0, "/srv/big.bin", bytes(range(256)) * 12_000)
        plant(sim, VM0, "/opt/app/dropper.bin", EICAR)
        power_off(connect(sim), VM0)
        state = tmp_path / f"state-{delay}"
        with App(settings(sim, state, toml="[scan]\ndisk_workers = 0\n")) as app:
            r = app.scan(names=[VM0], full=True, via="disk").results[0]
        found.append((r.via, r.status, r.reason, r.scanned, r.incomplete,
                      [(f.path, f.threat) for f in r.found]))
    assert found[0] == found[1]
    assert found[0][:2] == ("disk", "infected")
    assert found[0][3] >= 63
    assert found[0][4] == 0
    assert found[0][5] == [("/opt/app/dropper.bin", "EICAR-Test-File")]


# --- running VMs: a temporary snapshot ----------------------------------------------------

def test_a_running_vm_is_read_under_a_snapshot_that_is_removed_and_remediated_at_once(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM3, "/etc/fstab", FSTAB)
    dropped = plant(sim, VM3, "/tmp/dropper", EICAR)
    state = tmp_path / "state"

    with App(settings(sim, state, guest=True)) as app:
        r = app.scan(names=[VM3], via="disk").results[0]

    assert (r.via, r.status) == ("disk", "infected"), r.reason
    assert [(f.path, f.action) for f in r.found] == [("/tmp/dropper", "quarantined")]
    assert not dropped.exists()           # quarantined through Guest Operations at once
    assert snapshots(si, VM3) == []
    assert vm_named(si, VM3).runtime.powerState == "poweredOn"
    audited = [(a, d) for a, d in actions(state) if a.startswith("disk.snapshot")]
    assert [a for a, _ in audited] == ["disk.snapshot.created", "disk.snapshot.removed"]
    created, removed = (d for _, d in audited)
    assert created["snapshot"].startswith("vsphere-av-scan-")
    assert (created["snapshot"], created["quiesce"]) == (removed["snapshot"], False)
    assert created["moref"] == r.moref


def test_scan_disk_quiesce_asks_for_a_quiesced_snapshot(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM3, "/etc/fstab", FSTAB)
    state = tmp_path / "state"
    vm = vm_named(si, VM3)
    seen: list[tuple[str, bool]] = []

    def during(tick: Any) -> None:        # the snapshot as vCenter shows it mid-scan
        if not seen and vm.snapshot is not None:
            node = vm.snapshot.rootSnapshotList[0]
            seen.append((node.name, node.quiesced))

    with App(settings(sim, state, toml="[scan]\ndisk_quiesce = true\n")) as app:
        r = app.scan(names=[VM3], on_progress=during).results[0]

    assert (r.via, r.status) == ("disk", "clean"), r.reason
    created = [d for a, d in actions(state) if a == "disk.snapshot.created"]
    assert [d["quiesce"] for d in created] == [True]
    assert seen == [(created[0]["snapshot"], True)]
    assert snapshots(si, VM3) == []


def test_a_running_vm_without_guest_credentials_keeps_its_detection_pending(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM3, "/etc/fstab", FSTAB)
    dropped = plant(sim, VM3, "/tmp/dropper", EICAR)
    before = nics(si, VM3)

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM3]).results[0]      # auto: no credentials -> disk

    assert (r.via, r.status) == ("disk", "infected"), r.reason
    assert [f.action for f in r.found] == ["pending"]
    assert dropped.exists()
    assert snapshots(si, VM3) == []
    assert nics(si, VM3) == before        # a running VM's isolation is the controller's call


def test_leftover_scan_snapshots_are_removed_at_the_next_start(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    vm = vm_named(si, VM3)
    alive = subprocess.Popen(["sleep", "60"])
    try:
        dead = f"{SNAPSHOT_PREFIX}{socket.gethostname()}-999999-0badc0de"
        busy = f"{SNAPSHOT_PREFIX}{socket.gethostname()}-{alive.pid}-1234abcd"
        for name in ("before patching", dead, busy):
            wait_task(vm.CreateSnapshot_Task(name=name, memory=False, quiesce=False))
        state = tmp_path / "state"

        with App(settings(sim, state)) as app:
            app.scan(names=[VM0], via="guest")

        # The crashed run's snapshot went; an operator's and a live scan's stayed.
        assert sorted(snapshots(si, VM3)) == sorted(["before patching", busy])
        removed = [d for a, d in actions(state) if a == "disk.snapshot.leftover_removed"]
        assert [(d["snapshot"], d["moref"]) for d in removed] == [(dead, vm._moId)]
    finally:
        alive.kill()
        alive.wait()


def test_serve_removes_leftover_scan_snapshots_when_it_starts(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    from vsphere_av.app import start_controller

    vm = vm_named(si, VM3)
    dead = f"{SNAPSHOT_PREFIX}elsewhere-4242-deadbeef"
    wait_task(vm.CreateSnapshot_Task(name=dead, memory=False, quiesce=False))
    state = tmp_path / "state"

    runtime = start_controller(settings(sim, state))
    try:
        assert snapshots(si, VM3) == []
    finally:
        runtime.stop(grace=5)
    assert [d["snapshot"] for a, d in actions(state)
            if a == "disk.snapshot.leftover_removed"] == [dead]


# --- bad input: one line, the VM unprotected with the reason, never protected --------------

def datastore_dir(si: Any, name: str) -> Path:
    vm = vm_named(si, name)
    return Path(vm.datastore[0].info.url) / name


def attach_disk(si: Any, name: str, file_name: str) -> None:
    """Attach an existing VMDK in the VM's folder as a second SCSI disk (unit 3)."""
    vm = vm_named(si, name)
    scsi = next(d for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualSCSIController))
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualDisk(
            key=-1, controllerKey=scsi.key, unitNumber=3, capacityInKB=64 * 1024,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[LocalDS_0] {name}/{file_name}", diskMode="persistent")))])))


def truncate_sparse(si: Any, name: str) -> None:
    disk = datastore_dir(si, name) / "disk1.vmdk"
    with disk.open("r+b") as f:
        f.truncate(disk.stat().st_size // 2)


def garble_file_system(si: Any, name: str) -> None:
    flat = datastore_dir(si, name) / "disk1-flat.vmdk"
    with flat.open("r+b") as f:          # the partition starts at 1 MiB
        f.seek(1024 * 1024)
        f.write(b"\xab" * 65536)


@pytest.mark.parametrize(("extra", "damage", "words"), [
    ({}, truncate_sparse, "truncated"),
    ({"vcsim_disk_format": "monolithicFlat"}, garble_file_system, "unknown file system"),
    ({"vcsim_disk_luks": "TRUE"}, None, "encrypted volume (LUKS2)"),
    ({"vcsim_disk_inaccessible": "TRUE"}, None, "HTTP 404"),
], ids=["truncated-vmdk", "unknown-file-system", "luks", "inaccessible-datastore"])
def test_a_disk_that_cannot_be_read_leaves_the_vm_unprotected_with_the_reason(
        sim: simulator.Simulator, si: Any, tmp_path: Path, extra: dict[str, str],
        damage: Any, words: str) -> None:
    if extra:
        reconfig(si, VM0, **extra)
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/etc/motd", b"hello\n")
    power_off(si, VM0)
    if damage is not None:
        damage(si, VM0)
    state = tmp_path / "state"

    with App(settings(sim, state)) as app:
        report = app.scan(names=[VM0])
        r = report.results[0]
        row = next(s for s in app.status(refresh=False) if s["name"] == VM0)

    assert (r.via, r.status) == ("disk", "incomplete"), r.reason
    assert words in r.reason
    assert "\n" not in r.reason
    assert report.exit_code() == 2
    assert (row["state"], row["reason"]) == ("unprotected", r.reason)
    assert row["incomplete_files"] == [
        {"path": f["path"], "kind": "incomplete", "reason": f["reason"]} for f in r.files]


@pytest.mark.parametrize("refusal", ["snapshots-disabled", "independent-disk"])
def test_a_running_vm_whose_snapshot_cannot_be_taken_is_unprotected_with_the_reason(
        sim: simulator.Simulator, si: Any, tmp_path: Path, refusal: str) -> None:
    vm = vm_named(si, VM3)
    if refusal == "snapshots-disabled":
        spec = vim.vm.ConfigSpec(flags=vim.vm.FlagInfo(snapshotDisabled=True))
        words = "SnapshotDisabled"
    else:
        disk = next(d for d in vm.config.hardware.device
                    if isinstance(d, vim.vm.device.VirtualDisk))
        disk.backing.diskMode = "independent_persistent"
        spec = vim.vm.ConfigSpec(deviceChange=[vim.vm.device.VirtualDeviceSpec(
            operation="edit", device=disk)])
        words = "independent_persistent"
    wait_task(vm.ReconfigVM_Task(spec))
    state = tmp_path / "state"

    with App(settings(sim, state)) as app:
        report = app.scan(names=[VM3], via="disk")
        r = report.results[0]
        row = next(s for s in app.status(refresh=False) if s["name"] == VM3)

    assert (r.via, r.status) == ("disk", "incomplete")
    assert words in r.reason
    assert report.exit_code() == 2
    assert (row["state"], row["reason"]) == ("unprotected", r.reason)
    assert snapshots(si, VM3) == []
    assert not any(a.startswith("disk.snapshot") for a, _ in actions(state))


def test_an_outage_mid_disk_scan_fails_the_scan_for_a_retry(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    # Enough files that read-ahead (two files ahead, range read-ahead within each) cannot
    # finish them all while the simulator stops: with four, a loaded run once ended clean.
    for i in range(32):
        plant(sim, VM0, f"/srv/blob{i}.bin", os.urandom(400_000))
    power_off(si, VM0)
    state = tmp_path / "state"
    stopped: list[str] = []

    def outage(tick: Any) -> None:
        # The whole simulator (vCenter and the host's /folder) goes away after the first
        # file: the reads that follow meet a refused connection.
        if not stopped and tick.files:
            stopped.append(tick.path)
            sim.stop()

    with App(settings(sim, state)) as app:
        vm = app.select_vms(names=[VM0])[0]
        r = app.scan_one(vm, on_progress=outage)
        row = app.store.vm_state(vm.moref)

    assert stopped
    # An outage: the scan failed (the controller retries it), the VM is not protected.
    assert (r.via, r.status, r.outage) == ("disk", "error", True), r.reason
    assert r.reason.startswith("scan interrupted: connection lost ("), r.reason
    assert "\n" not in r.reason
    assert row is not None
    assert (row.state, row.reason) == ("unprotected", r.reason)


# --- the command line -----------------------------------------------------------------------

def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsphere_av", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_scan_via_disk_exit_codes_and_via_guest_unchanged(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    reconfig(si, VM2, vcsim_disk_luks="TRUE")
    for name in (VM0, VM1, VM2):
        plant(sim, name, "/etc/fstab", FSTAB)
        plant(sim, name, "/etc/motd", b"hello\n")
    plant(sim, VM0, "/root/.cache/x", EICAR)
    for name in (VM0, VM1, VM2):
        power_off(si, name)
    state = tmp_path / "state"
    env = no_guest_env(sim, state)

    infected = cli(env, "scan", "--via", "disk", VM0, "--json")
    clean = cli(env, "scan", "--via", "disk", VM1, "--json")
    encrypted = cli(env, "scan", "--via", "disk", VM2)
    guest = cli(env_for(sim, state), "scan", "--via", "guest", VM1, VM3, "--json")
    bad = cli(env, "scan", "--via", "floppy", VM1)

    assert infected.returncode == 1, infected.stderr
    doc = json.loads(infected.stdout)["vms"][0]
    assert (doc["via"], doc["status"]) == ("disk", "infected")
    assert [d["path"] for d in doc["detections"]] == ["/root/.cache/x"]
    assert doc["disk_read"] > 0
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["vms"][0]["status"] == "clean"
    assert encrypted.returncode == 2, encrypted.stderr
    assert "encrypted volume (LUKS2)" in encrypted.stdout
    assert "Traceback" not in encrypted.stdout + encrypted.stderr
    # Guest Operations, as before the disk path: a VM that is off is skipped, not read.
    assert guest.returncode == 0, guest.stderr
    by_vm = {d["vm"]: d for d in json.loads(guest.stdout)["vms"]}
    assert (by_vm[VM1]["via"], by_vm[VM1]["status"], by_vm[VM1]["reason"]) == (
        "guest", "skipped", "powered off")
    assert (by_vm[VM3]["via"], by_vm[VM3]["status"]) == ("guest", "clean")
    assert snapshots(si, VM3) == []
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1
    assert "floppy" in bad.stderr


def test_metrics_and_status_tell_guest_reads_from_disk_reads(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/srv/data/blob.bin", os.urandom(200_000))
    plant(sim, VM3, "/srv/data/small.bin", os.urandom(30_000))
    power_off(si, VM0)
    state = tmp_path / "state"

    with App(settings(sim, state, guest=True)) as app:
        # auto: VM0 is off -> its disks; VM3 runs with tools and credentials -> the guest
        by_vm = {r.vm: r for r in app.scan(names=[VM0, VM3]).results}
        recorded = {(s["vm_name"], s["via"]) for s in app.store.scans()}
        body, _ = render(settings=app.settings)
    disk, guest = by_vm[VM0], by_vm[VM3]
    assert (disk.via, disk.status, guest.via, guest.status) == (
        "disk", "clean", "guest", "clean"), (disk.reason, guest.reason)
    assert recorded == {(VM0, "disk"), (VM3, "guest")}
    assert disk.bytes >= 200_000
    assert guest.bytes >= 30_000
    got = {(s.name, s.labels["path"]): s.value
           for family in text_string_to_metric_families(body.decode())
           for s in family.samples if "path" in s.labels}
    assert got == {("vsphere_av_read_bytes_total", "disk"): disk.bytes,
                   ("vsphere_av_read_files_total", "disk"): disk.scanned,
                   ("vsphere_av_read_bytes_total", "guest"): guest.bytes,
                   ("vsphere_av_read_files_total", "guest"): guest.scanned}
    status = cli(env_for(sim, state), "status", "--json")
    assert status.returncode == 0, status.stderr
    vias = {v["name"]: v["last_scan_via"] for v in json.loads(status.stdout)["vms"]}
    assert (vias[VM0], vias[VM3], vias[VM1]) == ("disk", "guest", None)


def test_a_pending_detection_is_completed_by_the_guest_scan_after_power_on(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    dropped = plant(sim, VM0, "/opt/app/dropper.bin", EICAR)
    power_off(si, VM0)
    state = tmp_path / "state"

    with App(settings(sim, state)) as app:
        first = app.scan(names=[VM0]).results[0]
        again = app.scan(names=[VM0]).results[0]      # still off: the same record waits

    assert [f.action for f in first.found] == [f.action for f in again.found] == ["pending"]
    wait_task(vm_named(si, VM0).PowerOnVM_Task(), timeout=60)
    with App(settings(sim, state, guest=True)) as app:
        third = app.scan(names=[VM0]).results[0]      # auto: running with tools -> guest
        rows = [(d.path, d.action) for d in app.store.detections(vm_moref=VmId(third.moref))]

    assert (third.via, third.status) == ("guest", "infected"), third.reason
    assert [(f.path, f.action) for f in third.found] == [("/opt/app/dropper.bin", "quarantined")]
    assert not dropped.exists()
    # One finding from first to last: the disk scans' pending row, completed by the guest.
    assert rows == [("/opt/app/dropper.bin", "quarantined")]
    assert [a for a, d in actions(state) if a == "detection"] == ["detection"]


def test_a_scan_killed_under_its_snapshot_leaves_it_for_the_next_start_to_remove(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM3, "/etc/fstab", FSTAB)
    for i in range(24):
        plant(sim, VM3, f"/srv/data/blob{i:02}.bin", os.urandom(1024 * 1024))
    state = tmp_path / "state"
    env = no_guest_env(sim, state)
    scan = subprocess.Popen([sys.executable, "-m", "vsphere_av", "scan", "--via", "disk", VM3],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not snapshots(si, VM3) and scan.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        scan.send_signal(signal.SIGKILL)       # a crash: no finally runs
    finally:
        scan.kill()
        scan.wait()
    left = snapshots(si, VM3)
    assert len(left) == 1
    assert left[0].startswith(f"{SNAPSHOT_PREFIX}{socket.gethostname()}-{scan.pid}-")

    restart = cli(env, "scan", "--via", "guest", VM0)

    assert restart.returncode in (0, 2), restart.stderr     # VM0 itself: not the point
    assert snapshots(si, VM3) == []
    removed = [d["snapshot"] for a, d in actions(state) if a == "disk.snapshot.leftover_removed"]
    assert removed == left


def test_an_encrypted_second_disk_is_named_and_the_first_is_still_scanned(
        sim: simulator.Simulator, si: Any, tmp_path: Path) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/home/u/eicar.com", EICAR)
    tree = tmp_path / "data"
    (tree / "secrets").mkdir(parents=True)
    (tree / "secrets" / "x").write_bytes(EICAR)       # behind LUKS: cannot be seen
    directory = datastore_dir(si, VM0)
    subprocess.run([str(MKDISK), "--src", str(tree), "--out", str(directory / "data.vmdk"),
                    "--fs", "ext4", "--luks", "--format", "monolithicFlat"],
                   check=True, capture_output=True, timeout=240)
    attach_disk(si, VM0, "data.vmdk")
    power_off(si, VM0)

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[VM0]).results[0]

    assert (r.via, r.status) == ("disk", "infected"), r.reason
    assert [f.path for f in r.found] == ["/home/u/eicar.com"]
    assert r.incomplete == 1
    assert "encrypted volume (LUKS2)" in r.files[0]["reason"]
    label = next(d.deviceInfo.label for d in vm_named(si, VM0).config.hardware.device
                 if isinstance(d, vim.vm.device.VirtualDisk)
                 and d.backing.fileName.endswith("data.vmdk"))
    assert r.files[0]["path"] == f"{label} p1"     # not mounted anywhere: disk and volume
    assert "incomplete: 1 path(s) not fully checked" in r.reason


@pytest.mark.parametrize(("name", "fs", "found"), [
    (VM0, "ext4", "/boot/efi/EFI/BOOT/BOOTX64.EFI"),             # where fstab mounts it
    (VM1, "ntfs", "[unmounted]\\disk1-p1\\EFI\\BOOT\\BOOTX64.EFI"),  # Windows: no letter
], ids=["linux", "windows"])
def test_a_detection_on_the_efi_system_partition_is_found_and_named(
        sim: simulator.Simulator, si: Any, tmp_path: Path, name: str, fs: str,
        found: str) -> None:
    if fs == "ext4":
        plant(sim, name, "/etc/fstab", FSTAB + b"LABEL=EFI /boot/efi vfat umask=0077 0 1\n")
        plant(sim, name, "/etc/motd", b"hello\n")
    else:
        wait_task(vm_named(si, name).ReconfigVM_Task(vim.vm.ConfigSpec(
            guestId="windows9_64Guest")))
        plant(sim, name, "C/Windows/win.ini", b"[fonts]\n")
    esp = tmp_path / "esp"
    (esp / "EFI" / "BOOT").mkdir(parents=True)
    (esp / "EFI" / "BOOT" / "BOOTX64.EFI").write_bytes(EICAR)    # a bootkit's place
    (esp / "EFI" / "debian").mkdir()
    (esp / "EFI" / "debian" / "grubx64.efi").write_bytes(b"MZ grub")
    data = tmp_path / "data"
    data.mkdir()
    (data / "readme").write_bytes(b"second volume\n")
    directory = datastore_dir(si, name)
    subprocess.run([str(MKDISK), "--src", str(data), "--out", str(directory / "boot.vmdk"),
                    "--fs", fs, "--esp", str(esp), "--format", "monolithicFlat"],
                   check=True, capture_output=True, timeout=240)
    attach_disk(si, name, "boot.vmdk")
    power_off(si, name)

    with App(settings(sim, tmp_path / "state")) as app:
        r = app.scan(names=[name]).results[0]

    assert (r.via, r.status) == ("disk", "infected"), r.reason
    assert [(f.path, f.threat) for f in r.found] == [(found, "EICAR-Test-File")]
    assert r.incomplete == 0, r.files       # the ESP is read, no longer a volume problem
    assert r.scanned >= 3                   # the system volume's files and both ESP files
