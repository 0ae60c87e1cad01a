"""The appliance health file and the controller hook, with an in-memory adapter.

The adapter here is a model of the inventory for pure-logic tests (see
``test_appliance_plan.py``); the same flows run against the simulator in
``tests/integration/test_appliance_*.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from test_appliance_plan import H1, H2, Log, World

from vsphere_av.config import ApplianceSettings
from vsphere_av.fleet import plan as ap
from vsphere_av.fleet.health import read_health
from vsphere_av.fleet.manager import ApplianceManager


def manager(tmp_path: Path, world: World, log: Log) -> ApplianceManager:
    return ApplianceManager(state_dir=tmp_path, settings=ApplianceSettings(enabled=True),
                            adapter=world, audit=log, actor="t", clock=lambda: 1000.0)


def test_down_then_back_is_remembered_and_reported(tmp_path: Path) -> None:
    world, log = World((H1, H2)), Log()
    m = manager(tmp_path, world, log)
    assert m.reconcile(dry_run=True).down == {"host-1": "appliance down",
                                              "host-2": "appliance down"}
    assert read_health(tmp_path) == {}              # dry run writes nothing
    first = m.reconcile()
    assert first.down == {}
    assert first.back == ("host-1", "host-2")     # newly protected: their VMs get scanned
    vm_id = next(v.id for v in world.vms.values() if v.marker_host == "host-1")
    world.hosts = (replace(H1, maintenance=True), H2)
    m.reconcile()
    assert read_health(tmp_path) == {"host-1": "appliance down (host in maintenance mode)"}
    assert m.down_hosts() == {"host-1": "appliance down (host in maintenance mode)"}
    assert world.vms[vm_id].power_state == ap.POWERED_OFF
    world.hosts = (H1, H2)
    back = m.reconcile()
    assert back.back == ("host-1",)
    assert read_health(tmp_path) == {}
    assert [a for a, _ in log.entries][-1] == "appliance.back"


def test_unhealthy_verdict_survives_a_reconcile_without_a_check(tmp_path: Path) -> None:
    world, log = World((H1,)), Log()
    m = manager(tmp_path, world, log)
    m.reconcile()
    m._unhealthy = {"host-1": "appliance unhealthy: engine status degraded"}
    m.reconcile()
    fresh = manager(tmp_path, world, log)        # the next round: a new manager, no check
    fresh.reconcile()
    assert read_health(tmp_path) == {"host-1": "appliance unhealthy: engine status degraded"}
    assert fresh.down_hosts() == {"host-1": "appliance unhealthy: engine status degraded"}
