"""Appliance reconcile against the bundled simulator: deploy, pin, harden, heal, follow hosts.

Every test gets its own simulator process (inventory changes). What the simulator cannot do
as a real vCenter would is said where it matters (host removal).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import SimulatorFactory, connect, vm_named, wait_task
from pyVmomi import vim

from vsphere_av import config
from vsphere_av.config import Secret, VcenterSettings
from vsphere_av.fleet import plan as ap
from vsphere_av.fleet.image import ConfiguredImage
from vsphere_av.lab import simulator
from vsphere_av.store.audit import AuditLog
from vsphere_av.vsphere.appliances import VsphereApplianceAdapter
from vsphere_av.vsphere.connection import Connection
from vsphere_av.vsphere.connection import connect as vs_connect

POOL = ["127.0.0.41-127.0.0.60"]


@dataclass
class Rig:
    sim: simulator.Simulator
    conn: Connection
    adapter: VsphereApplianceAdapter
    desired: ap.Desired
    audit: AuditLog
    si: Any

    def reconcile(self, *, dry_run: bool = False) -> ap.ReconcileResult:
        return ap.reconcile_once(adapter=self.adapter, audit=self.audit, desired=self.desired,
                                 actor="test", dry_run=dry_run)

    def content(self) -> Any:
        return self.si.RetrieveContent()

    def cluster(self) -> Any:
        return self.content().rootFolder.childEntity[0].hostFolder.childEntity[0]

    def vm(self, name: str) -> Any:
        return vm_named(self.si, name)

    def appliances(self) -> list[ap.ApplianceVm]:
        return list(self.adapter.observe().appliances)

    def last_event_key(self) -> int:
        """Key of the newest event: every task vCenter runs (any write) posts some."""
        events = self.content().eventManager.QueryEvents(vim.event.EventFilterSpec())
        return max((int(e.key) for e in events), default=0)


def make_rig(sim: simulator.Simulator, tmp_path: Any, **section: Any) -> Rig:
    conn = vs_connect(VcenterSettings(server=sim.host, port=sim.port, user=sim.username,
                                      password=Secret(sim.password), thumbprint=sim.thumbprint))
    settings = config.parse({"appliances": {"enabled": True, "addresses": POOL, **section}},
                            env={}).appliances
    audit = AuditLog.open(tmp_path / "state")
    return Rig(sim=sim, conn=conn, adapter=VsphereApplianceAdapter(
        connection=conn, settings=settings, image=ConfiguredImage(settings)),
               desired=ap.Desired.from_settings(settings), audit=audit, si=connect(sim))


@pytest.fixture
def rig(vcsim_factory: SimulatorFactory, tmp_path: Any) -> Iterator[Rig]:
    r = make_rig(vcsim_factory(hosts=3, vms=2), tmp_path)
    yield r
    r.conn.close()
    r.audit.close()


@pytest.fixture
def converged(rig: Rig) -> Rig:
    result = rig.reconcile()
    assert result.ok, [r.error for r in result.results if not r.ok]
    return rig


def kinds(result: ap.ReconcileResult) -> list[tuple[str, str]]:
    return [(a.kind, a.host) for a in result.actions]


def test_reconcile_from_nothing_on_three_hosts(rig: Rig) -> None:
    result = rig.reconcile()
    assert result.ok
    assert sorted(kinds(result)) == sorted(
        [(k, f"DC0_C0_H{i}") for k in ("deploy", "pin", "power_on") for i in range(3)])
    assert result.down == {}
    cluster = rig.cluster()
    hosts = {h._moId: h for h in cluster.host}
    cfg = cluster.configurationEx
    rules = {r.name: r for r in cfg.rule}
    groups = {g.name: g for g in cfg.group}
    drs = {o.key._moId: o.enabled for o in cfg.drsVmConfig}
    das = {o.key._moId: o.dasSettings.restartPriority for o in cfg.dasVmConfig}
    addresses = set()
    for host_id, host in hosts.items():
        vm = rig.vm(f"vsphere-av-appliance-{host.name}")
        assert vm.runtime.host._moId == host_id
        assert vm.runtime.powerState == "poweredOn"
        extra = {o.key: o.value for o in vm.config.extraConfig}
        assert extra[ap.ROLE_KEY] == "appliance"
        assert extra[ap.HOST_KEY] == host_id
        for key, value in ap.HARDENING.items():
            assert extra[key] == value, key
        assert vm.config.firmware == "efi"
        assert vm.config.bootOptions.efiSecureBootEnabled is True
        devices = {type(d).__name__.rsplit(".", 1)[-1] for d in vm.config.hardware.device}
        assert not devices & {"VirtualFloppy", "VirtualCdrom", "VirtualSerialPort",
                              "VirtualParallelPort"}
        rule = rules[f"vsphere-av-pin-{host_id}"]
        assert isinstance(rule, vim.cluster.VmHostRuleInfo)
        assert rule.mandatory
        assert rule.enabled
        assert [v._moId for v in groups[rule.vmGroupName].vm] == [vm._moId]
        assert [h._moId for h in groups[rule.affineHostGroupName].host] == [host_id]
        assert drs[vm._moId] is False
        assert das[vm._moId] == "disabled"
        assert vm.guest.ipAddress.startswith("127.0.0.")     # from guestinfo.ipaddress
        addresses.add(vm.guest.ipAddress)
    assert len(addresses) == 3
    deployed = [e for e in rig.audit.entries() if e.action == "appliance.deploy"]
    assert len(deployed) == 3


def test_second_reconcile_plans_nothing_and_writes_nothing(converged: Rig) -> None:
    writes, event_key = converged.adapter.writes, converged.last_event_key()
    audit_count = len(list(converged.audit.entries()))
    result = converged.reconcile()
    assert result.actions == ()
    assert result.as_dict()["actions"] == []
    assert converged.adapter.writes == writes
    assert converged.last_event_key() == event_key        # no task, no event in vCenter
    assert len(list(converged.audit.entries())) == audit_count


def test_dry_run_prints_the_plan_and_changes_nothing(rig: Rig) -> None:
    event_key = rig.last_event_key()
    result = rig.reconcile(dry_run=True)
    assert len(result.actions) == 9
    assert all({"kind", "host", "vm"} <= set(a) for a in result.as_dict()["actions"])
    assert rig.appliances() == []
    assert rig.adapter.writes == 0
    assert rig.last_event_key() == event_key


def test_deleted_appliance_is_redeployed(converged: Rig) -> None:
    vm = converged.vm("vsphere-av-appliance-DC0_C0_H1")
    old = vm._moId
    wait_task(vm.PowerOffVM_Task())
    wait_task(vm.Destroy_Task())
    result = converged.reconcile()
    assert kinds(result) == [("deploy", "DC0_C0_H1"), ("pin", "DC0_C0_H1"),
                             ("power_on", "DC0_C0_H1")]
    again = converged.vm("vsphere-av-appliance-DC0_C0_H1")
    assert again._moId != old
    assert again.runtime.powerState == "poweredOn"
    group = {g.name: g for g in converged.cluster().configurationEx.group}
    host_id = again.runtime.host._moId
    assert [v._moId for v in group[f"vsphere-av-vms-{host_id}"].vm] == [again._moId]
    assert converged.reconcile().actions == ()


def test_powered_off_appliance_is_powered_on_and_audited(converged: Rig) -> None:
    vm = converged.vm("vsphere-av-appliance-DC0_C0_H0")
    wait_task(vm.PowerOffVM_Task())
    assert converged.reconcile(dry_run=True).down == {vm.runtime.host._moId: "appliance down"}
    result = converged.reconcile()
    assert kinds(result) == [("power_on", "DC0_C0_H0")]
    assert vm.runtime.powerState == "poweredOn"
    entry = [e for e in converged.audit.entries() if e.action == "appliance.power_on"][-1]
    assert entry.details["vm"] == "vsphere-av-appliance-DC0_C0_H0"
    assert entry.details["reason"] == "found poweredOff"
    assert converged.audit.verify().ok


def test_migrated_appliance_is_moved_back(converged: Rig) -> None:
    vm = converged.vm("vsphere-av-appliance-DC0_C0_H0")
    home = vm.runtime.host
    other = next(h for h in converged.cluster().host if h._moId != home._moId)
    wait_task(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=other)))
    assert vm.runtime.host._moId == other._moId
    result = converged.reconcile()
    assert kinds(result) == [("relocate", "DC0_C0_H0")]
    assert result.actions[0].reason == f"moved to {other.name}"
    assert vm.runtime.host._moId == home._moId
    assert vm._moId in [v._moId for v in home.vm]
    assert converged.reconcile().actions == ()


def test_duplicate_appliance_is_removed(converged: Rig) -> None:
    vm = converged.vm("vsphere-av-appliance-DC0_C0_H2")
    clone = wait_task(vm.CloneVM_Task(folder=vm.parent, name="copy-of-appliance",
                                 spec=vim.vm.CloneSpec(location=vim.vm.RelocateSpec(),
                                                       powerOn=False)))
    # A vCenter clone copies extraConfig (markers included); the simulator's does not, so
    # the copy gets the source's markers explicitly.
    markers = [vim.option.OptionValue(key=o.key, value=o.value) for o in vm.config.extraConfig
               if o.key.startswith("vsphere-av.")]
    wait_task(clone.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=markers)))
    result = converged.reconcile()
    assert [(a.kind, a.vm_id) for a in result.actions] == [("destroy", clone._moId)]
    assert result.actions[0].reason == "duplicate appliance"
    assert [a.name for a in converged.appliances()].count("copy-of-appliance") == 0
    assert converged.reconcile().actions == ()


def test_hardening_drift_is_repaired(converged: Rig) -> None:
    vm = converged.vm("vsphere-av-appliance-DC0_C0_H0")
    wait_task(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="isolation.tools.copy.disable", value="FALSE")])))
    result = converged.reconcile()
    assert kinds(result) == [("configure", "DC0_C0_H0")]
    extra = {o.key: o.value for o in vm.config.extraConfig}
    assert extra["isolation.tools.copy.disable"] == "TRUE"


def test_rule_removed_by_someone_is_restored(converged: Rig) -> None:
    cluster = converged.cluster()
    rule = cluster.configurationEx.rule[0]
    wait_task(cluster.ReconfigureComputeResource_Task(vim.cluster.ConfigSpecEx(rulesSpec=[
        vim.cluster.RuleSpec(operation="remove", removeKey=rule.key)]), True))
    result = converged.reconcile()
    assert [a.kind for a in result.actions] == ["pin"]
    assert {r.name for r in cluster.configurationEx.rule} >= {rule.name}
    assert converged.reconcile().actions == ()


def test_new_host_gets_an_appliance(converged: Rig) -> None:
    cluster = converged.cluster()
    new = wait_task(cluster.AddHost_Task(vim.host.ConnectSpec(hostName="esx-new", userName="root",
                                                         password="x", force=True), True))
    result = converged.reconcile()
    assert kinds(result) == [("deploy", "esx-new"), ("pin", "esx-new"), ("power_on", "esx-new")]
    vm = converged.vm("vsphere-av-appliance-esx-new")
    assert vm.runtime.host._moId == new._moId
    assert vm.runtime.powerState == "poweredOn"
    assert f"vsphere-av-pin-{new._moId}" in {r.name for r in cluster.configurationEx.rule}
    assert converged.reconcile().actions == ()


def test_maintenance_mode_in_and_out(converged: Rig) -> None:
    host = converged.cluster().host[1]
    vm = converged.vm(f"vsphere-av-appliance-{host.name}")
    wait_task(host.EnterMaintenanceMode_Task(0))
    result = converged.reconcile()
    assert kinds(result) == [("shutdown", host.name)]
    assert vm.runtime.powerState == "poweredOff"       # clean guest shutdown
    assert result.down == {host._moId: "appliance down (host in maintenance mode)"}
    assert converged.reconcile().actions == ()          # stays down while in maintenance
    wait_task(host.ExitMaintenanceMode_Task(0))
    back = converged.reconcile()
    assert kinds(back) == [("power_on", host.name)]
    assert back.down == {}
    assert vm.runtime.powerState == "poweredOn"


def test_removed_host_loses_its_rules_and_groups(converged: Rig) -> None:
    cluster = converged.cluster()
    host = cluster.host[2]
    host_id = host._moId
    # A real vCenter drops a removed host's VMs from the inventory with it; the simulator
    # refuses to remove a host that still has VMs, so the test unregisters them first.
    wait_task(host.EnterMaintenanceMode_Task(0))
    converged.reconcile()
    for vm in list(host.vm):
        if vm.runtime.powerState != "poweredOff":
            wait_task(vm.PowerOffVM_Task())
        vm.UnregisterVM()
    wait_task(host.Destroy_Task())
    result = converged.reconcile()
    assert [(a.kind, a.host_id) for a in result.actions] == [("unpin", host_id)]
    cfg = cluster.configurationEx
    assert not [r for r in cfg.rule if host_id in r.name]
    assert not [g for g in cfg.group if host_id in g.name]
    assert converged.reconcile().actions == ()


def test_template_source(vcsim_factory: SimulatorFactory, tmp_path: Any) -> None:
    rig = make_rig(vcsim_factory(hosts=2, vms=1), tmp_path, source="template",
                   template="DC0_C0_RP0_VM0")
    try:
        result = rig.reconcile()
        assert result.ok, [r.error for r in result.results]
        for host in rig.cluster().host:
            vm = rig.vm(f"vsphere-av-appliance-{host.name}")
            assert vm.runtime.host._moId == host._moId      # clone placed on the target host
            assert vm.runtime.powerState == "poweredOn"
            assert {o.key: o.value for o in vm.config.extraConfig}[ap.HOST_KEY] == host._moId
        assert rig.reconcile().actions == ()
    finally:
        rig.conn.close()
        rig.audit.close()


def test_cluster_filter(vcsim_factory: SimulatorFactory, tmp_path: Any) -> None:
    rig = make_rig(vcsim_factory(clusters=2, hosts=1, vms=0), tmp_path, clusters=["DC0_C1"])
    try:
        result = rig.reconcile()
        assert [a.host for a in result.actions if a.kind == "deploy"] == ["DC0_C1_H0"]
    finally:
        rig.conn.close()
        rig.audit.close()
