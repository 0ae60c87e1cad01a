"""One power-on is one exposure; release follows one rule; restore is what a running VM had.

Issue 11, points 5 and 6. Against the bundled simulator with the real controller threads
(``app.start_controller``), the real engine (EICAR) and real SQLite state. A late duplicate
of a power-on is a real ``VmPoweredOnEvent`` posted to the simulator (a vCenter's event tail
delivers one after the property change, sometimes after the scan's verdict).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import plant, settings_for, wait_task
from controller_support import EICAR, Admin, admin, audit_entries, running_controller, wait_for
from pyVmomi import vim

from vsphere_av import config
from vsphere_av.app import ControllerRuntime
from vsphere_av.lab import simulator
from vsphere_av.store.jobs import JobStore

INFECTED, SPARE = "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"
pytestmark = pytest.mark.vcsim(hosts=2, vms=2)


def _controller(sim: simulator.Simulator, state: Path, rule: str
                ) -> Iterator[ControllerRuntime]:
    with admin(sim) as a:
        a.power_off(INFECTED, SPARE)
        a.set_nics(INFECTED, connected=True, start_connected=True)
    settings = settings_for(sim, state)
    settings = replace(settings, isolation=config.IsolationSettings(release_infected=rule))
    with running_controller(settings) as rt:
        yield rt


@pytest.fixture
def operator_rule(sim: simulator.Simulator, tmp_path: Path) -> Iterator[ControllerRuntime]:
    yield from _controller(sim, tmp_path / "state", "operator")


@pytest.fixture
def clean_rescan_rule(sim: simulator.Simulator, tmp_path: Path) -> Iterator[ControllerRuntime]:
    yield from _controller(sim, tmp_path / "state", "clean_rescan")


def _exposures(state: Path, vm: str) -> list:
    with JobStore.open(state) as jobs:
        return jobs.exposures(vm)


def _held(state: Path, vm: str) -> str | None:
    with JobStore.open(state) as jobs:
        rec = jobs.isolation(vm)
    return None if rec is None else rec.held


def _cut(a: Admin, name: str) -> bool:
    nics = a.nics(name)
    return bool(nics) and all(not c and not s for _, c, s in nics)


def _detect(sim: simulator.Simulator, a: Admin, state: Path) -> str:
    """Power on the infected VM and wait for its verdict; returns its moref."""
    plant(sim, INFECTED, "/home/bob/eicar.com", EICAR)
    moref = str(a.vms[INFECTED]._moId)
    wait_task(a.vms[INFECTED].PowerOnVM_Task())
    wait_for(lambda: any(e.outcome == "infected" for e in _exposures(state, moref)),
             timeout=30, what="infected verdict")
    assert _cut(a, INFECTED)
    return moref


def _idle(rt: ControllerRuntime, moref: str) -> None:
    wait_for(lambda: not rt.controller.scheduler.is_busy(moref), timeout=30, what="no job")


def _late_powered_on_event(a: Admin, rt: ControllerRuntime, moref: str) -> None:
    """Post the power-on's VmPoweredOnEvent again, as a late delivery, and wait until handled."""
    vm = a.vms[INFECTED]
    em = a.si.content.eventManager
    em.PostEvent(vim.event.VmPoweredOnEvent(
        key=0, chainId=0, createdTime=vm.summary.runtime.bootTime, userName="",
        fullFormattedMessage="late",
        vm=vim.event.VmEventArgument(vm=vm, name=INFECTED),
        host=vim.event.HostEventArgument(host=vm.runtime.host, name=vm.runtime.host.name)))
    spec = vim.event.EventFilterSpec(
        eventTypeId=["VmPoweredOnEvent"],
        entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"))
    key = max(e.key for e in em.QueryEvents(spec))
    wait_for(lambda: rt.controller.jobs.seen_event(key), timeout=10, what="event handled")


def test_late_power_on_event_after_detection_neither_rescans_nor_releases(
        sim: simulator.Simulator, operator_rule: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with admin(sim) as a:
        moref = _detect(sim, a, state)
        _idle(operator_rule, moref)
        scans = operator_rule.controller.stats.scans
        _late_powered_on_event(a, operator_rule, moref)
        _idle(operator_rule, moref)
        # The same power-on: no second exposure, no second scan, still cut off.
        assert len(_exposures(state, moref)) == 1
        assert operator_rule.controller.stats.scans == scans
        assert _cut(a, INFECTED)
    assert _held(state, moref)
    assert not any(act == "isolation.release" and d.get("moref") == moref
                   for act, d in audit_entries(state))


def test_power_off_then_on_is_a_new_exposure(
        sim: simulator.Simulator, operator_rule: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with admin(sim) as a:
        moref = _detect(sim, a, state)
        _idle(operator_rule, moref)
        wait_task(a.vms[INFECTED].PowerOffVM_Task())
        watcher = operator_rule.controller.watcher
        wait_for(lambda: getattr(watcher.facts(moref), "power_state", "") == "poweredOff",
                 timeout=10, what="power-off seen by the controller")
        wait_task(a.vms[INFECTED].PowerOnVM_Task())
        wait_for(lambda: len([e for e in _exposures(state, moref)
                              if e.closed is not None]) == 2, timeout=30,
                 what="second exposure handled")
        assert _cut(a, INFECTED)
    assert len(_exposures(state, moref)) == 2


def test_operator_rule_automatic_clean_rescan_keeps_only_operator_releases(
        sim: simulator.Simulator, operator_rule: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rt = operator_rule
    with admin(sim) as a:
        moref = _detect(sim, a, state)
        _idle(rt, moref)
        host = a.host_of(INFECTED)
        # An automatic full rescan (the appliance of its host came back) is clean now
        # (the file is quarantined) but does not release an infected VM.
        assert rt.controller.rescan_hosts([host]) >= 1
        wait_for(lambda: rt.controller.stats.results.get("clean", 0) >= 1, timeout=30,
                 what="automatic rescan clean")
        _idle(rt, moref)
        assert _cut(a, INFECTED)
        assert _held(state, moref)
        keeps = [d for act, d in audit_entries(state)
                 if act == "isolation.keep" and d.get("moref") == moref]
        assert len(keeps) == 2
        assert "operator's rescan" in keeps[-1]["reason"]
        # The operator's rescan (vsphere-av scan VM, handed over) releases it.
        with JobStore.open(state) as jobs:
            jobs.add_request(vm=INFECTED, full=False)
        rt.controller.housekeep_once()
        wait_for(lambda: _held(state, moref) is None, timeout=30, what="released")
        wait_for(lambda: a.nics(INFECTED) and all(c and s for _, c, s in a.nics(INFECTED)),
                 timeout=10, what="vNICs back")
    releases = [d for act, d in audit_entries(state)
                if act == "isolation.release" and d.get("moref") == moref]
    assert [d["reason"] for d in releases] == ["operator's rescan clean"]


def test_clean_rescan_rule_releases_on_a_clean_full_rescan(
        sim: simulator.Simulator, clean_rescan_rule: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rt = clean_rescan_rule
    with admin(sim) as a:
        moref = _detect(sim, a, state)
        _idle(rt, moref)
        # A late duplicate of the power-on still starts nothing (no 0-byte rescan).
        _late_powered_on_event(a, rt, moref)
        _idle(rt, moref)
        assert len(_exposures(state, moref)) == 1
        assert _cut(a, INFECTED)
        # A clean incremental rescan is not enough; a clean full one releases.
        from vsphere_av.models import Priority
        rt.controller.scheduler.submit(vm=moref, host=a.host_of(INFECTED),
                                       priority=Priority.SWEEP, reason="test sweep")
        wait_for(lambda: rt.controller.stats.results.get("clean", 0) >= 1, timeout=30,
                 what="incremental rescan clean")
        _idle(rt, moref)
        assert _cut(a, INFECTED)
        rt.controller.scheduler.submit(vm=moref, host=a.host_of(INFECTED),
                                       priority=Priority.SCHEDULED, full=True,
                                       reason="schedule nightly")
        wait_for(lambda: _held(state, moref) is None, timeout=30, what="released")
        assert all(c and s for _, c, s in a.nics(INFECTED))


def test_vm_isolated_while_powering_on_gets_its_start_connected_nics_back(
        sim: simulator.Simulator, operator_rule: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    rt = operator_rule.controller
    with admin(sim) as a:
        moref = str(a.vms[SPARE]._moId)
        a.set_nics(SPARE, connected=True, start_connected=True)
        # Protected, so the controller itself neither contains nor releases it here.
        info = rt._vm(moref)
        assert info is not None
        rt.state.upsert_vm(info)
        rt.state.set_protection(moref, state="protected", reason="test",
                                clean_signature_version=rt._active_version(), scanned=True,
                                full=True)
        # Powered off, ESXi reports the vNICs disconnected: that is what a containment
        # from VmStartingEvent (before the power state changes) records.
        assert a.nics(SPARE)
        assert all(not c and s for _, c, s in a.nics(SPARE))
        isolated, recorded, _changed = rt.isolate(moref, name=SPARE, reason="test")
        assert isolated
        assert all(not n["connected"] and n["start_connected"] for n in recorded)
        wait_task(a.vms[SPARE].PowerOnVM_Task())
        assert _cut(a, SPARE)
        assert rt.release(moref, name=SPARE, host=a.host_of(SPARE), running=True)
        # Running: connected, as it would have been without the isolation.
        assert all(c and s for _, c, s in a.nics(SPARE))
        # Powered off: only startConnected comes back (ESXi reports it disconnected).
        rt.isolate(moref, name=SPARE, reason="test")
        wait_task(a.vms[SPARE].PowerOffVM_Task())
        assert rt.release(moref, name=SPARE, host=a.host_of(SPARE), running=False)
        assert all(not c and s for _, c, s in a.nics(SPARE))
    with JobStore.open(state) as jobs:
        assert jobs.isolation(moref) is None
        assert jobs.exposures(moref) == []
