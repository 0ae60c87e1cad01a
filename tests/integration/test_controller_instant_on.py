"""Instant-on (issue 5, points 3 and 9): stale VMs are contained at power-on and scanned first.

Against the bundled simulator with the real controller threads (``app.start_controller``),
the real engine (EICAR) and real SQLite state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import plant, settings_for, wait_task
from controller_support import EICAR, admin, audit_entries, running_controller, wait_for

from vsphere_av.app import ControllerRuntime, instant_on_timeline
from vsphere_av.lab import simulator
from vsphere_av.store.jobs import JobStore

INFECTED, CLEAN, REVERTED, OTHER = (f"DC0_C0_RP0_VM{i}" for i in range(4))
pytestmark = pytest.mark.vcsim(hosts=2, vms=4)


@pytest.fixture
def controller(sim: simulator.Simulator, tmp_path: Path) -> Iterator[ControllerRuntime]:
    with admin(sim) as a:
        a.power_off(INFECTED, CLEAN, REVERTED, OTHER)
        a.set_nics(CLEAN, connected=True, start_connected=True)
    with running_controller(settings_for(sim, tmp_path / "state")) as rt:
        yield rt


def _exposure(state: Path, vm: str) -> list:
    with JobStore.open(state) as jobs:
        return jobs.exposures(vm)


def test_stale_infected_vm_is_isolated_scanned_first_and_stays_isolated(
        sim: simulator.Simulator, controller: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(sim, INFECTED, "/home/bob/eicar.com", EICAR)
    plant(sim, INFECTED, "/etc/hostname", b"infected\n")
    with admin(sim) as a:
        moref = a.vms[INFECTED]._moId
        assert a.nics(INFECTED)
        started = time.monotonic()
        wait_task(a.vms[INFECTED].PowerOnVM_Task())
        # Contained within 2 seconds of the power-on.
        wait_for(lambda: a.nics(INFECTED) and all(not c and not s
                                                 for _, c, s in a.nics(INFECTED)),
                 timeout=2.0, what="vNICs disconnected")
        assert time.monotonic() - started < 2.0
        wait_for(lambda: any(e.outcome == "infected" for e in _exposure(state, moref)),
                 timeout=30, what="scan verdict")
        # Stays isolated after the detection: nothing was restored.
        assert all(not c and not s for _, c, s in a.nics(INFECTED))
    (exp,) = _exposure(state, moref)
    assert exp.window is not None
    assert exp.window < 2.0
    assert exp.clean is None
    actions = [(act, d.get("moref")) for act, d in audit_entries(state)]
    mine = [act for act, m in actions if m == moref]
    assert mine.index("isolation.isolate") < mine.index("scan.start") < mine.index("scan.end")
    assert "isolation.keep" in mine
    assert "isolation.release" not in mine
    assert not (sim.guest_root / INFECTED / "home/bob/eicar.com").exists()   # quarantined
    with JobStore.open(state) as jobs:
        assert jobs.isolation(moref) is not None
    timeline = [row["what"] for row in instant_on_timeline(controller.app.settings, moref)]
    assert timeline[0].startswith("started running")
    assert timeline[1].startswith("network isolated")
    assert timeline.index("scan start (ahead of all other work)") > 1
    assert any(w.startswith("detection: /home/bob/eicar.com") for w in timeline)
    assert "isolation.keep" in timeline
    assert timeline[-1].startswith("exposure closed: infected")


def test_clean_stale_vm_is_isolated_then_reconnected_exactly(
        sim: simulator.Simulator, controller: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(sim, CLEAN, "/etc/hostname", b"clean\n")
    with admin(sim) as a:
        moref = a.vms[CLEAN]._moId
        before = a.nics(CLEAN)
        assert before
        # Powered off, ESXi reports every vNIC disconnected; startConnected ones connect
        # at power-on, and that running state is what comes back.
        assert all(not c and s for _, c, s in before)
        running = [(key, True, True) for key, _, _ in before]
        wait_task(a.vms[CLEAN].PowerOnVM_Task())
        wait_for(lambda: any(e.outcome == "clean" for e in _exposure(state, moref)),
                 timeout=30, what="clean verdict")
        wait_for(lambda: a.nics(CLEAN) == running, timeout=10, what="NIC state restored")
    wait_for(lambda: any(act == "isolation.release" and d.get("moref") == moref
                         for act, d in audit_entries(state)), timeout=10, what="release audited")
    (exp,) = _exposure(state, moref)
    assert exp.isolated is not None
    assert exp.clean is not None
    assert exp.window is not None
    assert exp.window < 2.0
    mine = [act for act, d in audit_entries(state) if d.get("moref") == moref]
    assert mine.index("isolation.isolate") < mine.index("scan.end") < mine.index(
        "isolation.release")
    with JobStore.open(state) as jobs:
        assert jobs.isolation(moref) is None
    # Protected now: powering off and on again is not an instant-on any more.
    with admin(sim) as a:
        wait_task(a.vms[CLEAN].PowerOffVM_Task())
        wait_task(a.vms[CLEAN].PowerOnVM_Task())
        time.sleep(1.5)
        assert a.nics(CLEAN) == running
    assert len(_exposure(state, moref)) == 1


def test_revert_to_snapshot_holding_malware_is_rescanned_and_detected(
        sim: simulator.Simulator, controller: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(sim, REVERTED, "/etc/hostname", b"reverted\n")
    dropper = plant(sim, REVERTED, "/opt/app/update.bin", EICAR)
    with admin(sim) as a:
        moref = a.vms[REVERTED]._moId
        vm = a.vms[REVERTED]
        wait_task(vm.PowerOnVM_Task())
        # The first scan finds and quarantines the file; a clean rescan releases the VM.
        wait_for(lambda: any(e.outcome == "infected" for e in _exposure(state, moref)),
                 timeout=30, what="first detection")
        assert not dropper.exists()
        # A snapshot taken while the malware was present (put back as the disk held it).
        plant(sim, REVERTED, "/opt/app/update.bin", EICAR)
        wait_task(vm.CreateSnapshot_Task(name="before-cleanup", memory=True, quiesce=False))
        dropper.unlink()
        with JobStore.open(state) as jobs:
            jobs.add_request(vm=REVERTED, full=False)
        wait_for(lambda: not controller.controller.jobs.isolation(moref), timeout=30,
                 what="clean rescan releases the VM")
        record = controller.app.store.vm_state(moref)
        assert record.state == "protected"
        # Revert: the disk is back in the infected state while the VM keeps running.
        wait_task(vm.RevertToCurrentSnapshot_Task())
        assert (sim.guest_root / REVERTED / "opt/app/update.bin").exists()
        wait_for(lambda: len([e for e in _exposure(state, moref)
                              if e.outcome == "infected"]) == 2,
                 timeout=30, what="detection after revert")
        assert all(not c and not s for _, c, s in a.nics(REVERTED))
    entries = audit_entries(state)
    stale = [d for act, d in entries if act == "vm.stale" and d.get("moref") == moref]
    assert stale
    assert stale[-1]["reason"] == "reverted to a snapshot"
    detections = [d for act, d in entries if act == "detection" and d.get("moref") == moref]
    assert len({d.get("scan_id") for d in detections}) == 2


def test_status_json_reports_hosts_and_isolation(
        sim: simulator.Simulator, controller: ControllerRuntime, tmp_path: Path) -> None:
    tmp_path / "state"
    plant(sim, OTHER, "/tmp/eicar.com", EICAR)
    with admin(sim) as a:
        wait_task(a.vms[OTHER].PowerOnVM_Task())
        moref = a.vms[OTHER]._moId
    wait_for(lambda: controller.controller.jobs.isolation(moref), timeout=10, what="isolation")
    controller.controller.housekeep_once()
    from vsphere_av.app import controller_status
    doc = controller_status(controller.app.settings)
    hosts = doc["hosts"]
    assert {h["name"] for h in hosts} >= {"DC0_C0_H0", "DC0_C0_H1"}
    assert all(isinstance(h["queued"], int) and isinstance(h["active_scans"], int)
               and h["moref"].startswith("host-") for h in hosts)
    assert moref in doc["isolated"]
