"""Scans dispatched to the right host's appliance, which pulls the guest transfer URLs itself.

Real parts: the bundled simulator (vCenter, guest files, transfer URLs), one real engine
service per appliance on the appliance's own loopback address (127.0.0.N, as reported by
``guest.ipAddress``), real YARA, real state and audit files. An appliance powered off makes
its host's VMs ``unprotected`` ("appliance down") and their scans wait; back on, they scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from appliance_support import EICAR, appliance_settings
from conftest import SimulatorFactory, connect, plant, vm_named, wait_task

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.engine import Engine
from vsphere_av.engine.remote import EngineClient, EngineService
from vsphere_av.lab import simulator
from vsphere_av.store.audit import AuditOnUse
from vsphere_av.vsphere import inventory

TOKEN = "dispatch-token-0123456789abcdef"


@dataclass
class World:
    sim: simulator.Simulator
    settings: config.Settings
    services: dict[str, EngineService]       # host name -> the engine service of its appliance
    si: Any

    def app(self) -> App:
        return App(self.settings, actor="tester")

    def vm(self, name: str) -> Any:
        return vm_named(self.si, name)

    def stats(self) -> dict[str, tuple[int, int]]:
        out = {}
        for host, svc in self.services.items():
            h = EngineClient(svc.url, token=TOKEN).health()
            out[host] = (h["scans_total"], h["pulls_total"])
        return out


@pytest.fixture
def world(vcsim_factory: SimulatorFactory, tmp_path: Path) -> Iterator[World]:
    sim = vcsim_factory(hosts=2, vms=2)
    settings, port = appliance_settings(sim, tmp_path, addresses="127.0.0.81-127.0.0.90",
                                        token=TOKEN)
    with App(settings, actor="tester") as app:
        from vsphere_av.fleet.manager import open_manager
        manager = open_manager(settings, connection=app.connection, audit=app.audit,
                               actor="tester")
        assert manager.reconcile().ok
        appliances = manager.appliances()
    services: dict[str, EngineService] = {}
    engines = []
    try:
        for a in appliances:    # what each appliance runs: `vsphere-av engine serve`
            own = tmp_path / f"appliance-{a.host}"
            engine = Engine.open(config.Settings(state_dir=own), audit=AuditOnUse(own),
                                 actor="tester")
            engines.append(engine)
            svc = EngineService(engine=engine, token=TOKEN, listen=(a.address, port))
            svc.start()
            services[a.host] = svc
        yield World(sim=sim, settings=settings, services=services, si=connect(sim))
    finally:
        for svc in services.values():
            svc.shutdown()
        for engine in engines:
            engine.close()


def test_scan_goes_to_the_vms_host_appliance_which_pulls_the_files(world: World) -> None:
    with world.app() as app:
        vms = {v.name: v for v in inventory.list_vms(app.connection)}
    vm = vms["DC0_C0_RP0_VM0"]
    assert vm.host is not None
    plant(world.sim, vm.name, "/home/bob/eicar.com", EICAR)
    plant(world.sim, vm.name, "/etc/motd", b"welcome\n")
    before = world.stats()
    with world.app() as app:
        result = app.scan_one(vm, full=True)
    assert result.status == "infected", result.reason
    assert {f.path for f in result.found} == {"/home/bob/eicar.com"}
    assert not (world.sim.guest_root / vm.name / "home/bob/eicar.com").exists()  # quarantined
    after = world.stats()
    own = after[vm.host.name]
    assert own[0] - before[vm.host.name][0] == result.scanned >= 2
    assert own[1] - before[vm.host.name][1] == result.scanned    # every file pulled by it
    for host, counts in after.items():
        if host != vm.host.name:
            assert counts == before[host]                       # other appliances untouched


def test_appliance_down_means_unprotected_and_waiting_then_resumed(world: World) -> None:
    with world.app() as app:
        vms = {v.name: v for v in inventory.list_vms(app.connection)}
        vm = vms["DC0_C0_RP0_VM1"]
        assert vm.host is not None
        first = app.scan_one(vm)
        assert first.status == "clean", first.reason
    appliance = world.vm(f"vsphere-av-appliance-{vm.host.name}")
    wait_task(appliance.PowerOffVM_Task())
    with world.app() as app:
        rows = {r["name"]: r for r in app.status()}
        assert rows[vm.name]["state"] == "unprotected"
        assert rows[vm.name]["reason"] == "appliance down"
        waiting = app.scan_one(vm)
        assert waiting.status == "error"
        assert waiting.reason == "appliance down"
        from vsphere_av.fleet.manager import open_manager
        manager = open_manager(world.settings, connection=app.connection, audit=app.audit,
                               actor="tester")
        healed = manager.reconcile()
        assert [a.kind for a in healed.actions] == ["power_on"]
        assert healed.back == (vm.host.moref,)     # the controller rescans this host's VMs
    with world.app() as app:
        again = app.scan_one(vm)
        assert again.status == "clean", again.reason
        rows = {r["name"]: r for r in app.status()}
        assert rows[vm.name]["state"] == "protected"


def test_routes_are_read_once_per_reconcile_not_once_per_scan(world: World) -> None:
    """Issue 15: which appliance scans which host's VMs is read from vCenter on the first
    scan and again only after a reconcile (in any process) marked the fleet changed."""
    with world.app() as app:
        vms = {v.name: v for v in inventory.list_vms(app.connection)}
        vm = vms["DC0_C0_RP0_VM0"]

        def reads() -> int:
            return int(app.fleet.adapter.observes)

        for _ in range(3):
            assert app.scan_one(vm).status == "clean"
        assert reads() == 1
        from vsphere_av.fleet.manager import open_manager
        other = open_manager(world.settings, connection=app.connection, audit=app.audit,
                             actor="tester")       # serve's loop, or `appliances reconcile`
        assert other.reconcile().ok
        for _ in range(2):
            assert app.scan_one(vm).status == "clean"
        assert reads() == 2


def test_a_remembered_route_whose_appliance_stopped_gives_appliance_down(world: World) -> None:
    """A route read before the appliance stopped is not trusted: its scan reads the routes
    again and waits with "appliance down", as it would have with a fresh read."""
    with world.app() as app:
        vms = {v.name: v for v in inventory.list_vms(app.connection)}
        vm = vms["DC0_C0_RP0_VM1"]
        assert vm.host is not None
        assert app.scan_one(vm).status == "clean"
        appliance = world.vm(f"vsphere-av-appliance-{vm.host.name}")
        wait_task(appliance.PowerOffVM_Task())
        world.services.pop(vm.host.name).shutdown()   # its engine stops with it
        waiting = app.scan_one(vm)
        assert (waiting.status, waiting.reason) == ("error", "appliance down")
        assert app.fleet.adapter.observes == 2


def test_an_appliance_behind_the_active_signature_version_is_waited_for(
        world: World, tmp_path: Path) -> None:
    """A version activated on the controller and not yet pushed to the host's appliance:
    the scan is refused as "appliance unhealthy" (the job waits for the health loop's push)
    rather than matched under the appliance's old version and recorded as if under the new
    one; once the appliance has the version, the scan runs and is recorded under it."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "marker.yar").write_text(
        'rule BehindMarker { strings: $m = "behind-marker-7f3a" condition: $m }\n')
    with world.app() as app:
        vms = {v.name: v for v in inventory.list_vms(app.connection)}
        vm = vms["DC0_C0_RP0_VM1"]
        assert vm.host is not None
        assert app.scan_one(vm).status == "clean"
        old = app.engine.active_version()
        new = app.engine.store.import_bundle(bundle).info.version
        assert new > old
        plant(world.sim, vm.name, "/home/bob/marker.txt", b"behind-marker-7f3a\n")
        waiting = app.scan_one(vm)
        assert waiting.status == "error"
        assert waiting.reason == (f"appliance unhealthy: signature version {old}, "
                                  f"expected {new}")
        # The push: the appliance's engine gets the same bundle (as `appliances
        # push-signatures` lands it), and the scan goes through under the new version.
        service = world.services[vm.host.name]
        pushed = service.engine.store.import_bundle(bundle).info.version
        assert pushed == new
        found = app.scan_one(vm)
        assert found.status == "infected", found.reason
        assert found.signature_version == new
        assert {f.path for f in found.found} == {"/home/bob/marker.txt"}
