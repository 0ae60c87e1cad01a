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

from pathlib import Path
from typing import Any

import pytest
from conftest import connect, env_for, plant, vm_named, wait_task
from pyVmomi import vim

from vsphere_av import config, simulator
from vsphere_av.app import App
from vsphere_av.store.audit import AuditLog
from vsphere_av.store.jobs import JobStore

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
FSTAB = b"LABEL=root / ext4 defaults 0 1\n"
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
