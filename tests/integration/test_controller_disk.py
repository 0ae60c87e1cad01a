"""The controller reads dormant VMs through their disks (issue 12, points 5 and 9).

Against the bundled simulator with ``-disks`` (each VM's disk is a real VMDK built from its
guest tree when it powers off), the real controller threads (``app.start_controller``), the
real engine (EICAR, plus a marker rule for the new signature version) and real SQLite
state. A signature update is what an operator does: ``vsphere-av signatures import``.
pyVmomi is used only to set the scene (power, extraConfig, NIC flags) and to read NICs back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import env_for, plant, settings_for, wait_task
from controller_support import (
    EICAR,
    Admin,
    admin,
    audit_entries,
    cli_env,
    max_concurrent_per_host,
    running_controller,
    wait_for,
)
from pyVmomi import vim

import vsphere_av.engine
from vsphere_av import config
from vsphere_av.app import ControllerRuntime, hand_over_scan
from vsphere_av.lab import simulator
from vsphere_av.store.jobs import JobStore

FSTAB = b"LABEL=root / ext4 defaults 0 1\n"
MARKER_RULE = 'rule Disk_Sweep_Marker { strings: $a = "DISK-SWEEP-MARKER-51c2" condition: $a }\n'
VMS = [f"DC0_C0_RP0_VM{i}" for i in range(4)]

pytestmark = pytest.mark.vcsim(hosts=1, vms=4, disks=True)


def new_signature_version(sim: simulator.Simulator, state: Path, rt: ControllerRuntime) -> int:
    """Import the built-in bundle plus one rule as a new active version; returns it."""
    bundle = state.parent / "bundle"
    shutil.copytree(Path(vsphere_av.engine.__file__).parent / "builtin", bundle)
    (bundle / "marker.yar").write_text(MARKER_RULE)
    before = rt.app.engine.active_version()
    done = subprocess.run([sys.executable, "-m", "vsphere_av", "signatures", "import",
                           str(bundle)], env=cli_env(sim, state), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    version = rt.app.engine.active_version()
    assert version > before
    return version


def dormant(a: Admin, sim: simulator.Simulator, name: str, files: dict[str, bytes]) -> str:
    """Plant files, give every vNIC connected + startConnected, power off; returns the moref."""
    for path, data in files.items():
        plant(sim, name, path, data)
    a.set_nics(name, connected=True, start_connected=True)
    a.power_off(name)           # the simulator writes the disk from the guest tree
    return str(a.vms[name]._moId)


def power_on(a: Admin, name: str) -> None:
    wait_task(a.vms[name].PowerOnVM_Task())


def start_up_done(rt: ControllerRuntime, running: int) -> None:
    """The background rescans of the VMs running at start are over."""
    c = rt.controller
    wait_for(lambda: c.stats.scans >= running and c.scheduler.idle(), timeout=90,
             what="start-up rescans")


def state_of(rt: ControllerRuntime, moref: str, version: int | None = None) -> str:
    """The VM's recorded protection state ("" before it has a record)."""
    record = rt.app.store.vm_state(moref, current_version=version)
    return record.state if record is not None else ""


def exposures(state: Path, moref: str) -> list[Any]:
    with JobStore.open(state) as jobs:
        return jobs.exposures(moref)


def isolation(state: Path, moref: str) -> Any:
    with JobStore.open(state) as jobs:
        return jobs.isolation(moref)


def test_a_dormant_vm_swept_clean_powers_on_without_an_instant_on(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    clean, unreadable = VMS[0], VMS[1]
    state = tmp_path / "state"
    env = env_for(sim, state)
    del env["VSPHERE_AV_GUEST_USER"], env["VSPHERE_AV_GUEST_PASSWORD"]
    settings = config.load(env=env)              # no guest credentials: disks only
    with admin(sim) as a:
        moref = dormant(a, sim, clean, {"/etc/fstab": FSTAB, "/srv/app/run.sh": b"#!/bin/sh\n"})
        wait_task(a.vms[unreadable].ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="vcsim.disk.inaccessible", value="TRUE")])))
        bad = dormant(a, sim, unreadable, {"/etc/fstab": FSTAB})

        with running_controller(settings) as rt:
            c = rt.controller
            start_up_done(rt, 2)
            # Never scanned while dormant: only a signature update sweeps it.
            assert state_of(rt, moref) in ("", "unprotected")
            version = new_signature_version(sim, state, rt)
            wait_for(lambda: any(act == "job.incomplete" for act, _ in audit_entries(state))
                     and c.scheduler.idle(), timeout=90, what="the sweep")
            record = rt.app.store.vm_state(moref, current_version=version)
            assert (record.state, record.signature_version) == ("protected", version)
            assert rt.app.store.vm_state(bad).state == "unprotected"
            assert a.vms[clean].runtime.powerState == "poweredOff"

            power_on(a, clean)
            power_on(a, unreadable)
            # The unreadable one is stale: contained, read under a snapshot, incomplete.
            wait_for(lambda: any(e.closed is not None for e in exposures(state, bad)),
                     timeout=60, what="the unreadable VM's verdict")
            wait_for(lambda: (f := c.watcher.facts(moref)) is not None and f.running,
                     timeout=10, what="the watch to see it running")
            connected = a.nics(clean)

    entries = audit_entries(state)
    (sweep,) = [d for act, d in entries if act == "signatures.sweep"]
    assert (sweep["signature_version"], sweep["queued"]) == (version, 4)
    # Protected before it woke: no exposure, no isolation, its network as it was.
    assert exposures(state, moref) == []
    assert isolation(state, moref) is None
    assert connected
    assert all(conn and start for _, conn, start in connected)
    assert not [act for act, d in entries if d.get("moref") == moref
                and act in ("vm.stale", "instant-on", "isolation.isolate", "job.queued")]
    # Incomplete: finished, never "clean"; the contained VM stays cut, the exposure says why.
    (shut,) = exposures(state, bad)
    assert shut.outcome.startswith("incomplete: ")
    assert shut.isolated is not None
    assert shut.clean is None
    assert isolation(state, bad) is not None
    incomplete = [d for act, d in entries if act == "job.incomplete" and d["moref"] == bad]
    assert [d["isolated"] for d in incomplete] == [False, True]
    assert all(d["reason"] for d in incomplete)


def test_a_dormant_infected_vm_is_cut_off_before_it_boots_and_quarantined_at_power_on(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    infected = VMS[0]
    state = tmp_path / "state"
    with admin(sim) as a:
        moref = dormant(a, sim, infected, {"/etc/fstab": FSTAB, "/opt/app/dropper.bin": EICAR})
        dropper = sim.guest_root / infected / "opt/app/dropper.bin"

        with running_controller(settings_for(sim, state)) as rt:
            start_up_done(rt, 3)
            new_signature_version(sim, state, rt)
            # The record is held for the detection once its vNICs are cut.
            held = wait_for(lambda: (r := isolation(state, moref)) is not None and r.held and r,
                            timeout=90, what="the dormant sweep's detection and cut")
            off_nics = a.nics(infected)
            assert state_of(rt, moref) == "infected"
            pending = [(d.path, d.action) for d in rt.app.store.detections(vm_moref=moref)]
            assert exposures(state, moref) == []

            power_on(a, infected)
            wait_for(lambda: any(e.outcome == "infected" and e.closed is not None
                                 for e in exposures(state, moref)),
                     timeout=60, what="the guest scan at power-on")
            on_nics = a.nics(infected)
            quarantined = [(d.path, d.action) for d in rt.app.store.detections(vm_moref=moref)]
            still_held = isolation(state, moref)

            # Only an operator's clean rescan releases it (isolation.release_infected).
            with JobStore.open(state) as jobs:
                jobs.add_request(vm=moref, full=False)
            wait_for(lambda: isolation(state, moref) is None, timeout=60, what="the release")
            released = a.nics(infected)

    # Cut while off: nothing connected, nothing set to connect at power-on.
    assert off_nics
    assert all(not conn and not start for _, conn, start in off_nics)
    assert held.held.startswith("detection")
    assert held.reason.startswith("infected (disk scan)")
    assert all(n["start_connected"] for n in held.nics)
    assert pending == [("/opt/app/dropper.bin", "pending")]
    # At power-on it never reached the network, and its guest scan quarantined the file.
    assert all(not conn for _, conn, _ in on_nics)
    assert quarantined == [("/opt/app/dropper.bin", "quarantined")]
    assert not dropper.exists()
    assert still_held is not None
    assert still_held.held.startswith("detection")
    (exposure,) = exposures(state, moref)
    assert exposure.window == 0.0                    # cut before it booted
    assert all(conn and start for _, conn, start in released)
    entries = audit_entries(state)
    cuts = [d for act, d in entries if act == "isolation.isolate" and d.get("moref") == moref]
    assert [d["trigger"] for d in cuts] == ["disk scan"]       # cut once, while off
    assert any(act == "isolation.keep" and d.get("moref") == moref for act, d in entries)
    assert [d["reason"] for act, d in entries
            if act == "isolation.release" and d.get("moref") == moref] == [
        "operator's rescan clean"]


def test_disk_scans_count_against_the_per_host_cap_and_follow_the_running_vms(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = settings_for(sim, state, toml="[scan]\nper_host_limit = 1\nglobal_limit = 4\n")
    settings = replace(settings, controller=replace(settings.controller, housekeeping=0.2))
    running = VMS[3]
    morefs: dict[str, str] = {}
    with admin(sim) as a:
        for name in VMS[:3]:
            morefs[name] = dormant(a, sim, name, {"/etc/fstab": FSTAB, **{
                f"/srv/data/blob{i}.bin": bytes([i]) * 200_000 for i in range(4)}})
        host = a.host_of(VMS[0])
        plant(sim, running, "/etc/hostname", running.encode())

        with running_controller(settings) as rt:
            start_up_done(rt, 1)
            version = new_signature_version(sim, state, rt)
            wait_for(lambda: all(state_of(rt, m, version) == "protected"
                                 for m in morefs.values()) and rt.controller.scheduler.idle(),
                     timeout=120, what="the dormant sweep")
            peak = rt.controller.scheduler.peak_per_host()
            off = {name: a.vms[name].runtime.powerState for name in morefs}
            # `vsphere-av scan` of a dormant VM is handed to the running controller too.
            handed = hand_over_scan(settings, names=[VMS[0]], timeout=60)

    assert off == dict.fromkeys(morefs, "poweredOff")      # read through their disks
    assert handed is not None
    (result,) = handed.results
    assert (result.status, result.via) == ("clean", "disk")
    assert result.reason.endswith("(scanned by the running controller)")
    entries = audit_entries(state)
    # From the new version's activation (the sweep is audited once its jobs are queued).
    actions = [act for act, _ in entries]
    after = entries[len(actions) - actions[::-1].index("signatures.activate"):]
    (sweep,) = [d for act, d in after if act == "signatures.sweep"]
    assert (sweep["signature_version"], sweep["queued"]) == (version, 4)
    assert max_concurrent_per_host(after) == {host: 1}
    assert peak == {host: 1}
    starts = [d["vm"] for act, d in after if act == "scan.start"]
    assert sorted(starts[:4]) == sorted([running, *morefs])    # the sweep
    assert starts[0] == running                               # running VMs first
    assert starts[4:] == [VMS[0]]                             # the handed-over scan


def test_a_dormant_infected_vm_with_guest_credentials_waits_for_its_tools_to_be_quarantined(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    infected = VMS[0]
    state = tmp_path / "state"
    settings = settings_for(sim, state)
    settings = replace(settings, controller=replace(settings.controller, retry_base=0.5,
                                                     retry_max=1.0))
    with admin(sim) as a:
        moref = dormant(a, sim, infected, {"/etc/fstab": FSTAB, "/opt/app/dropper.bin": EICAR})
        dropper = sim.guest_root / infected / "opt/app/dropper.bin"
        wait_task(a.vms[infected].ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="vcsim.tools.disabled", value="TRUE")])))

        with running_controller(settings) as rt:
            start_up_done(rt, 3)
            new_signature_version(sim, state, rt)
            wait_for(lambda: (r := isolation(state, moref)) is not None and r.held,
                     timeout=90, what="the dormant sweep's detection and cut")
            power_on(a, infected)
            # Its tools do not run: the guest scan that would quarantine is retried, and the
            # disks are not read again under a snapshot meanwhile.
            wait_for(lambda: sum(1 for act, d in audit_entries(state) if act == "scan.end"
                                 and d.get("moref") == moref
                                 and d["status"] == "unreachable") >= 2,
                     timeout=60, what="the guest scan waiting for tools")
            assert dropper.exists()
            assert [e.closed for e in exposures(state, moref)] == [None]
            wait_task(a.vms[infected].ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
                vim.option.OptionValue(key="vcsim.tools.disabled", value="FALSE")])))
            wait_for(lambda: any(e.outcome == "infected" and e.closed is not None
                                 for e in exposures(state, moref)),
                     timeout=60, what="the guest scan once tools run")
            detections = [(d.path, d.action) for d in rt.app.store.detections(vm_moref=moref)]
            on_nics = a.nics(infected)

    assert detections == [("/opt/app/dropper.bin", "quarantined")]
    assert not dropper.exists()
    assert all(not conn for _, conn, _ in on_nics)
    entries = audit_entries(state)
    assert not [act for act, d in entries
                if act.startswith("disk.snapshot") and d.get("moref") == moref]


def test_a_dormant_vm_started_while_its_disks_are_read_gets_its_own_scan_for_the_power_on(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    infected = VMS[0]
    state = tmp_path / "state"
    # Enough bytes that the disk scan is still reading when the power-on is seen.
    blobs = {f"/srv/data/blob{i}.bin": os.urandom(60 * 1024 * 1024) for i in range(5)}
    with admin(sim) as a:
        moref = dormant(a, sim, infected, {"/etc/fstab": FSTAB, "/opt/app/dropper.bin": EICAR,
                                           **blobs})
        del blobs
        with running_controller(settings_for(sim, state)) as rt:
            start_up_done(rt, 3)
            new_signature_version(sim, state, rt)
            wait_for(lambda: any(act == "scan.start" and d.get("moref") == moref
                                 for act, d in audit_entries(state)),
                     timeout=90, what="the dormant disk scan to start")
            power_on(a, infected)
            wait_for(lambda: any(e.closed is not None for e in exposures(state, moref)),
                     timeout=180, what="the power-on's verdict")
            detections = [(d.path, d.action) for d in rt.app.store.detections(vm_moref=moref)]
            on_nics = a.nics(infected)

    entries = audit_entries(state)
    mine = [(act, d) for act, d in entries if d.get("moref") == moref]
    requeued = [d for act, d in mine if act == "job.requeued"]
    assert [(d["verdict"], d["priority"]) for d in requeued] == [("infected", "instant-on")]
    ends = [(d["status"], d["reason"][:150]) for act, d in mine if act == "scan.end"]
    assert [s for s, _ in ends][:2] == ["infected", "infected"], ends  # disks, then guest
    (exposure,) = exposures(state, moref)
    assert exposure.outcome == "infected"            # closed by the power-on's own scan
    assert detections == [("/opt/app/dropper.bin", "quarantined")]
    assert all(not conn for _, conn, _ in on_nics)
