"""`serve` with appliances: the reconcile loop runs inside the controller, heals an appliance
powered off by someone, and the controller never contains (cuts the network of) its own
appliances when they power on, while workloads on the same hosts are still contained.

Real parts: the bundled simulator, the real controller threads, real state and audit files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import all_vms, plant, settings_for
from controller_support import Admin, admin, audit_entries, running_controller, wait_for
from pyVmomi import vim

from vsphere_av.app import ControllerRuntime
from vsphere_av.lab import simulator

WORKLOAD = "DC0_C0_RP0_VM0"
APPLIANCES = "[appliances]\nenabled = true\ninterval = 1\naddresses = ['127.0.0.61-127.0.0.70']\n"
pytestmark = pytest.mark.vcsim(hosts=2, vms=1)


@pytest.fixture
def runtime(sim: simulator.Simulator, tmp_path: Path) -> Iterator[ControllerRuntime]:
    with admin(sim) as a:
        a.power_off(WORKLOAD)
    with running_controller(settings_for(sim, tmp_path / "state", toml=APPLIANCES)) as rt:
        yield rt


def _appliances(sim: simulator.Simulator) -> dict[str, vim.VirtualMachine]:
    with admin(sim) as a:
        return {n: vm for n, vm in a.vms.items() if n.startswith("vsphere-av-appliance-")}


def test_serve_deploys_heals_and_never_contains_its_appliances(
        sim: simulator.Simulator, runtime: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with admin(sim) as a:
        wait_for(lambda: len([n for n in _fresh_names(a) if n.startswith("vsphere-av-")]) == 2,
                 timeout=60, what="one appliance per host")
        names = sorted(n for n in _fresh_names(a) if n.startswith("vsphere-av-"))
        a.vms = {vm.name: vm for vm in all_vms(a.si)}
        victim = a.vms[names[0]]
        wait_for(lambda: victim.runtime.powerState == "poweredOn", timeout=30,
                 what="appliance running")
        # Someone powers an appliance off; the loop inside serve powers it back on.
        task = victim.PowerOffVM_Task()
        wait_for(lambda: task.info.state == "success", timeout=30, what="power off")
        wait_for(lambda: victim.runtime.powerState == "poweredOn", timeout=30,
                 what="appliance powered on again by serve")
        # A stale workload powered on meanwhile is still contained as usual.
        plant(sim, WORKLOAD, "/etc/hostname", b"workload\n")
        task = a.vms[WORKLOAD].PowerOnVM_Task()
        wait_for(lambda: task.info.state == "success", timeout=30, what="power on")
        time.sleep(1.5)        # room for a (wrong) containment of the appliance to show
        runtime.controller.flush_audit()
        for name in names:
            assert all(d.connectable.connected for d in a.vms[name].config.hardware.device
                       if isinstance(d, vim.vm.device.VirtualEthernetCard)), name
    entries = audit_entries(state)
    appliance_morefs = {a_vm._moId for a_vm in _appliances(sim).values()}
    isolated = {d.get("moref") for act, d in entries if act == "isolation.isolate"}
    assert not isolated & appliance_morefs
    scanned = {d.get("moref") for act, d in entries if act == "scan.start"}
    assert not scanned & appliance_morefs
    assert any(act == "appliance.power_on" for act, _ in entries)
    assert any(act == "isolation.isolate" and d.get("vm") == WORKLOAD for act, d in entries)


def _fresh_names(a: Admin) -> list[str]:
    return [vm.name for vm in all_vms(a.si)]


def test_jobs_of_a_host_whose_appliance_is_down_wait_and_are_never_given_up(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    """Issue: while a host's appliance is down its VMs' jobs wait; nothing is lost."""
    state = tmp_path / "waiting-state"
    with admin(sim) as a:
        a.power_off(WORKLOAD)
    toml = ("[appliances]\nenabled = true\ninterval = 3600\n"
            "addresses = ['127.0.0.71-127.0.0.80']\n"
            "[controller]\nmax_attempts = 1\nretry_base = 0.2\nretry_max = 0.3\n")
    with running_controller(settings_for(sim, state, toml=toml)) as rt:
        with admin(sim) as a:
            wait_for(lambda: len([n for n in _fresh_names(a)
                                  if n.startswith("vsphere-av-")]) == 2,
                     timeout=60, what="one appliance per host (first reconcile round)")
            vms = {vm.name: vm for vm in all_vms(a.si)}
            host = vms[WORKLOAD].runtime.host
            appliance = next(vm for vm in host.vm if vm.name.startswith("vsphere-av-"))
            # Listed before the deploy powered it on: powering it off needs it running.
            wait_for(lambda: appliance.runtime.powerState == "poweredOn", timeout=30,
                     what="appliance running")
            task = appliance.PowerOffVM_Task()
            wait_for(lambda: task.info.state == "success", timeout=30, what="appliance off")
            task = vms[WORKLOAD].PowerOnVM_Task()
            wait_for(lambda: task.info.state == "success", timeout=30, what="power on")
            # Several retry rounds pass (max_attempts = 1, retry_max = 0.3 s)...
            wait_for(lambda: rt.controller.stats.retries >= 3, timeout=30, what="retries")
        rt.controller.flush_audit()
        # ...and the job is still queued, not given up.
        queued = [job.vm for job, _running in rt.jobs.pending_jobs()]
        assert vms[WORKLOAD]._moId in queued
    entries = audit_entries(state)
    assert not [d for act, d in entries if act == "job.failed"]
