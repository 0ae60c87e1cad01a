"""Table tests for ``appliances.plan`` (pure) and ``appliances.apply`` (ordering, failures).

``apply`` is exercised against an in-memory inventory that implements the adapter protocol:
it is a model of the inventory for pure-logic tests, not a vSphere mock; the same flows run
against the bundled simulator in ``tests/integration/test_appliance_reconcile.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest

from vsphere_av import config
from vsphere_av.errors import ApplianceError, ConfigError, VsphereError
from vsphere_av.fleet import plan as ap

C1 = "domain-c1"
H1 = ap.FleetHost(id="host-1", name="esx1", cluster_id=C1, cluster_name="C1")
H2 = ap.FleetHost(id="host-2", name="esx2", cluster_id=C1, cluster_name="C1")
H3 = ap.FleetHost(id="host-3", name="esx3", cluster_id=None)          # standalone
D = ap.Desired()


def vm(vm_id: str, host: ap.FleetHost, *, on_host: str | None = None, power: str = ap.POWERED_ON,
       name: str | None = None, extra: Mapping[str, str] | None = None,
       pinned: bool = True) -> ap.ApplianceVm:
    """An appliance in the desired shape unless told otherwise."""
    return ap.ApplianceVm(
        id=vm_id, name=name or f"vsphere-av-appliance-{host.name}", marker_host=host.id,
        host_id=on_host or host.id, power_state=power,
        extra_config=dict(ap.expected_extra_config(host.id)) if extra is None else dict(extra),
        drs_disabled=pinned, ha_disabled=pinned)


def pin(host: ap.FleetHost, vm_id: str, *, rule_ok: bool = True,
        cluster: str = C1) -> ap.HostPin:
    """A correct pin for ``vm_id`` on ``host`` unless told otherwise."""
    return ap.HostPin(cluster_id=cluster, host_id=host.id, vm_group=frozenset({vm_id}),
                      host_group=frozenset({host.id}), rule_ok=rule_ok, rule_exists=True)


def kinds(actions: list[ap.Action]) -> list[tuple[str, str, str]]:
    return [(a.kind, a.host_id, a.vm_id or a.vm) for a in actions]


GOOD = ap.Observed(hosts=(H1, H2, H3),
                   appliances=(vm("vm-1", H1), vm("vm-2", H2), vm("vm-3", H3)),
                   pins=(pin(H1, "vm-1"), pin(H2, "vm-2")))

CASES: list[tuple[str, ap.Desired, ap.Observed, list[tuple[str, str, str]]]] = [
    ("converged: nothing to do", D, GOOD, []),
    ("empty inventory", D, ap.Observed(), []),
    ("from nothing: deploy, pin (clustered only), power on", D,
     ap.Observed(hosts=(H1, H3)),
     [("deploy", "host-1", "vsphere-av-appliance-esx1"),
      ("deploy", "host-3", "vsphere-av-appliance-esx3"),
      ("pin", "host-1", "vsphere-av-appliance-esx1"),
      ("power_on", "host-1", "vsphere-av-appliance-esx1"),
      ("power_on", "host-3", "vsphere-av-appliance-esx3")]),
    ("deleted appliance is redeployed", D,
     replace(GOOD, appliances=(vm("vm-1", H1), vm("vm-3", H3))),
     [("deploy", "host-2", "vsphere-av-appliance-esx2"),
      ("pin", "host-2", "vsphere-av-appliance-esx2"),
      ("power_on", "host-2", "vsphere-av-appliance-esx2")]),
    ("powered off by someone -> power on", D,
     replace(GOOD, appliances=(vm("vm-1", H1, power=ap.POWERED_OFF), vm("vm-2", H2),
                               vm("vm-3", H3))),
     [("power_on", "host-1", "vm-1")]),
    ("suspended -> power on", D,
     replace(GOOD, appliances=(vm("vm-1", H1, power="suspended"), vm("vm-2", H2),
                               vm("vm-3", H3))),
     [("power_on", "host-1", "vm-1")]),
    ("migrated away -> moved back", D,
     replace(GOOD, appliances=(vm("vm-1", H1, on_host="host-2"), vm("vm-2", H2),
                               vm("vm-3", H3))),
     [("relocate", "host-1", "vm-1")]),
    ("duplicates: keep the one on the right host, destroy the rest", D,
     replace(GOOD, appliances=(vm("vm-1", H1), vm("vm-0", H1, on_host="host-2"),
                               vm("vm-9", H1, power=ap.POWERED_OFF), vm("vm-2", H2),
                               vm("vm-3", H3))),
     [("destroy", "host-1", "vm-0"), ("destroy", "host-1", "vm-9")]),
    ("host removed: appliance destroyed, rule removed", D,
     replace(GOOD, hosts=(H1, H3)),
     [("destroy", "host-2", "vm-2"), ("unpin", "host-2", "")]),
    ("new host: deployed", D,
     replace(GOOD, hosts=(H1, H2, H3, replace(H2, id="host-4", name="esx4"))),
     [("deploy", "host-4", "vsphere-av-appliance-esx4"),
      ("pin", "host-4", "vsphere-av-appliance-esx4"),
      ("power_on", "host-4", "vsphere-av-appliance-esx4")]),
    ("maintenance: running appliance shut down", D,
     replace(GOOD, hosts=(replace(H1, maintenance=True), H2, H3)),
     [("shutdown", "host-1", "vm-1")]),
    ("maintenance: powered-off appliance left alone", D,
     replace(GOOD, hosts=(replace(H1, maintenance=True), H2, H3),
             appliances=(vm("vm-1", H1, power=ap.POWERED_OFF), vm("vm-2", H2), vm("vm-3", H3))),
     []),
    ("maintenance: no deploy onto the host", D,
     replace(GOOD, hosts=(replace(H1, maintenance=True), H2, H3),
             appliances=(vm("vm-2", H2), vm("vm-3", H3))),
     []),
    ("disconnected host: hands off", D,
     replace(GOOD, hosts=(replace(H1, connected=False), H2, H3),
             appliances=(vm("vm-1", H1, power=ap.POWERED_OFF), vm("vm-2", H2), vm("vm-3", H3))),
     []),
    ("hardening key changed -> configure", D,
     replace(GOOD, appliances=(
         vm("vm-1", H1, extra={**ap.expected_extra_config("host-1"), "mks.enable3d": "TRUE"}),
         vm("vm-2", H2), vm("vm-3", H3))),
     [("configure", "host-1", "vm-1")]),
    ("rule disabled -> pin", D,
     replace(GOOD, pins=(pin(H1, "vm-1", rule_ok=False), pin(H2, "vm-2"))),
     [("pin", "host-1", "vm-1")]),
    ("DRS/HA override missing -> pin", D,
     replace(GOOD, appliances=(vm("vm-1", H1, pinned=False), vm("vm-2", H2), vm("vm-3", H3))),
     [("pin", "host-1", "vm-1")]),
    ("vm group holds a stranger -> pin", D,
     replace(GOOD, pins=(replace(pin(H1, "vm-1"), vm_group=frozenset({"vm-1", "vm-77"})),
                         pin(H2, "vm-2"))),
     [("pin", "host-1", "vm-1")]),
    ("host moved to another cluster: old pin removed, new pin made", D,
     replace(GOOD, hosts=(replace(H1, cluster_id="domain-c2", cluster_name="C2"), H2, H3)),
     [("unpin", "host-1", ""), ("pin", "host-1", "vm-1")]),
    ("cluster filter: out-of-scope appliances destroyed and unpinned",
     ap.Desired(clusters=frozenset({"C2"})), GOOD,
     [("destroy", "host-1", "vm-1"), ("destroy", "host-2", "vm-2"), ("destroy", "host-3", "vm-3"),
      ("unpin", "host-1", ""), ("unpin", "host-2", "")]),
    ("several problems on one host, applied in a safe order", D,
     replace(GOOD, appliances=(vm("vm-1", H1, on_host="host-2", power=ap.POWERED_OFF,
                                  pinned=False, extra={}), vm("vm-2", H2), vm("vm-3", H3))),
     [("configure", "host-1", "vm-1"), ("relocate", "host-1", "vm-1"),
      ("pin", "host-1", "vm-1"), ("power_on", "host-1", "vm-1")]),
]


@pytest.mark.parametrize(("desired", "observed", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(desired: ap.Desired, observed: ap.Observed,
              expected: list[tuple[str, str, str]]) -> None:
    assert kinds(ap.plan(desired, observed)) == expected


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    shuffled = replace(GOOD, hosts=(H3, H2, H1), appliances=tuple(reversed(GOOD.appliances)))
    broken = replace(shuffled, appliances=())
    assert ap.plan(D, replace(GOOD, appliances=())) == ap.plan(D, broken)


def test_deploy_carries_markers_hardening_and_a_free_pool_address() -> None:
    desired = ap.Desired(addresses=("127.0.0.11", "127.0.0.12", "127.0.0.13"))
    observed = ap.Observed(
        hosts=(H1, H2),
        appliances=(vm("vm-2", H2, extra={**ap.expected_extra_config("host-2"),
                                          ap.ADDRESS_KEY: "127.0.0.11"}),),
        pins=(pin(H2, "vm-2"),))
    (deploy,) = [a for a in ap.plan(desired, observed) if a.kind == "deploy"]
    extra = dict(deploy.extra_config)
    assert extra[ap.ROLE_KEY] == "appliance"
    assert extra[ap.HOST_KEY] == "host-1"
    assert extra[ap.ADDRESS_KEY] == "127.0.0.12"
    for key, value in ap.HARDENING.items():
        assert extra[key] == value
    assert deploy.as_dict()["kind"] == "deploy"
    assert deploy.as_dict()["host"] == "esx1"
    assert deploy.as_dict()["vm"] == "vsphere-av-appliance-esx1"


def test_exhausted_address_pool_is_an_error() -> None:
    with pytest.raises(ApplianceError, match="exhausted"):
        ap.plan(ap.Desired(addresses=("127.0.0.11",)), ap.Observed(hosts=(H1, H2)))


def test_configure_sets_only_the_drifted_keys() -> None:
    extra = {**ap.expected_extra_config("host-1")}
    del extra["log.keepOld"]
    extra["mks.enable3d"] = "TRUE"
    observed = replace(GOOD, appliances=(vm("vm-1", H1, extra=extra), vm("vm-2", H2),
                                         vm("vm-3", H3)))
    (action,) = ap.plan(D, observed)
    assert dict(action.extra_config) == {"log.keepOld": "10", "mks.enable3d": "FALSE"}


@pytest.mark.parametrize(("hosts", "apps", "expected"), [
    ((H1,), (vm("vm-1", H1),), {}),
    ((H1,), (), {"host-1": "appliance down"}),
    ((H1,), (vm("vm-1", H1, power=ap.POWERED_OFF),), {"host-1": "appliance down"}),
    ((H1,), (vm("vm-1", H1, on_host="host-2"),), {"host-1": "appliance down"}),
    ((replace(H1, maintenance=True),), (vm("vm-1", H1),),
     {"host-1": "appliance down (host in maintenance mode)"}),
    ((replace(H1, connected=False),), (vm("vm-1", H1),),
     {"host-1": "appliance down (host disconnected)"}),
])
def test_appliance_down_hosts(hosts: tuple[ap.FleetHost, ...], apps: tuple[ap.ApplianceVm, ...],
                              expected: dict[str, str]) -> None:
    assert ap.appliance_down_hosts(D, ap.Observed(hosts=hosts, appliances=apps)) == expected


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(("entries", "expected"), [
    (["127.0.0.11"], ["127.0.0.11"]),
    (["127.0.0.11-127.0.0.13", "127.0.0.12"], ["127.0.0.11", "127.0.0.12", "127.0.0.13"]),
    (["127.0.0.8/30"], ["127.0.0.9", "127.0.0.10"]),
    (["127.0.0.8/31"], ["127.0.0.8", "127.0.0.9"]),
])
def test_expand_addresses(entries: list[str], expected: list[str]) -> None:
    assert config.expand_addresses(entries) == expected


@pytest.mark.parametrize(("section", "message"), [
    ({"source": "iso"}, "source must be ovf or template"),
    ({"source": "template"}, "template must name"),
    ({"addresses": ["nope"]}, "is not an address"),
    ({"addresses": ["127.0.0.9-127.0.0.1"]}, "bad range"),
    ({"addresses": ["10.0.0.0/8"]}, "too large"),
    ({"ssh_port": 0}, "ssh_port must be a TCP port"),
    ({"ssh_port": True}, "ssh_port must be a whole number"),
    ({"clusters": [1]}, "clusters must be a list of strings"),
    ({"colour": "red"}, "unknown setting"),
])
def test_bad_settings(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.parse({"appliances": section}, env={})


def test_settings_defaults_and_values() -> None:
    s = config.parse({"appliances": {"enabled": True, "clusters": "C1",
                                     "addresses": ["127.0.0.11-127.0.0.12"]}}, env={}).appliances
    assert s.enabled
    assert s.clusters == ("C1",)
    assert ap.Desired.from_settings(s).addresses == ("127.0.0.11", "127.0.0.12")
    assert config.parse({}, env={}).appliances.ovf.endswith("appliance-placeholder.ovf")


# ------------------------------------------------------------------ apply


class World:
    """In-memory inventory implementing the adapter protocol (see module docstring)."""

    def __init__(self, hosts: tuple[ap.FleetHost, ...]) -> None:
        self.hosts = hosts
        self.vms: dict[str, ap.ApplianceVm] = {}
        self.pins: dict[tuple[str, str], ap.HostPin] = {}
        self.calls: list[str] = []
        self.fail_on: set[tuple[str, str]] = set()
        self._next = 100

    def _check(self, kind: str, key: str) -> None:
        self.calls.append(f"{kind}:{key}")
        if (kind, key) in self.fail_on:
            raise VsphereError(f"{kind} failed on {key}")

    def observe(self) -> ap.Observed:
        return ap.Observed(hosts=self.hosts, appliances=tuple(self.vms.values()),
                           pins=tuple(self.pins.values()))

    def deploy(self, *, host_id: str, name: str, extra_config: Mapping[str, str]) -> str:
        self._check("deploy", host_id)
        self._next += 1
        vm_id = f"vm-{self._next}"
        self.vms[vm_id] = ap.ApplianceVm(id=vm_id, name=name, marker_host=host_id,
                                         host_id=host_id, power_state=ap.POWERED_OFF,
                                         extra_config=dict(extra_config))
        return vm_id

    def reconfigure(self, *, vm_id: str, extra_config: Mapping[str, str]) -> None:
        self._check("configure", vm_id)
        old = self.vms[vm_id]
        self.vms[vm_id] = replace(old, extra_config={**old.extra_config, **extra_config})

    def relocate(self, *, vm_id: str, host_id: str) -> None:
        self._check("relocate", vm_id)
        self.vms[vm_id] = replace(self.vms[vm_id], host_id=host_id)

    def pin(self, *, cluster_id: str, host_id: str, vm_id: str) -> None:
        self._check("pin", vm_id)
        self.pins[(cluster_id, host_id)] = ap.HostPin(
            cluster_id=cluster_id, host_id=host_id, vm_group=frozenset({vm_id}),
            host_group=frozenset({host_id}), rule_ok=True, rule_exists=True)
        self.vms[vm_id] = replace(self.vms[vm_id], drs_disabled=True, ha_disabled=True)

    def unpin(self, *, cluster_id: str, host_id: str) -> None:
        self._check("unpin", host_id)
        self.pins.pop((cluster_id, host_id), None)

    def power_on(self, *, vm_id: str) -> None:
        self._check("power_on", vm_id)
        self.vms[vm_id] = replace(self.vms[vm_id], power_state=ap.POWERED_ON)

    def shutdown(self, *, vm_id: str) -> None:
        self._check("shutdown", vm_id)
        self.vms[vm_id] = replace(self.vms[vm_id], power_state=ap.POWERED_OFF)

    def destroy(self, *, vm_id: str) -> None:
        self._check("destroy", vm_id)
        self.vms.pop(vm_id, None)


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, dict[str, Any]]] = []

    def append(self, *, actor: str, action: str, details: Mapping[str, Any] | None = None) -> None:
        self.entries.append((action, dict(details or {})))


def test_reconcile_converges_and_second_round_is_empty() -> None:
    world, log = World((H1, H2, H3)), Log()
    first = ap.reconcile_once(adapter=world, audit=log, desired=D, actor="test")
    assert first.ok
    assert [a.kind for a in first.actions].count("deploy") == 3
    assert first.down == {}
    calls = len(world.calls)
    second = ap.reconcile_once(adapter=world, audit=log, desired=D, actor="test")
    assert second.actions == ()
    assert len(world.calls) == calls                # nothing written
    assert {a for a, _ in log.entries} == {"appliance.deploy", "appliance.pin",
                                           "appliance.power_on"}


def test_dry_run_changes_nothing() -> None:
    world, log = World((H1,)), Log()
    result = ap.reconcile_once(adapter=world, audit=log, desired=D, actor="t", dry_run=True)
    assert [a.kind for a in result.actions] == ["deploy", "pin", "power_on"]
    assert world.calls == []
    assert log.entries == []
    assert result.as_dict()["actions"][0]["kind"] == "deploy"
    assert result.down == {"host-1": "appliance down"}


def test_failure_skips_that_hosts_later_actions_only() -> None:
    world, log = World((H1, H2)), Log()
    world.fail_on.add(("deploy", "host-1"))
    result = ap.reconcile_once(adapter=world, audit=log, desired=D, actor="t")
    assert not result.ok
    by_host = {(r.action.kind, r.action.host_id): r for r in result.results}
    assert by_host[("deploy", "host-1")].error == "deploy failed on host-1"
    assert by_host[("pin", "host-1")].skipped
    assert by_host[("power_on", "host-1")].skipped
    assert by_host[("power_on", "host-2")].ok
    host1 = [a for a, d in log.entries if d["host_id"] == "host-1"]
    assert host1 == ["appliance.deploy.failed"]
    assert result.down == {"host-1": "appliance down"}
    world.fail_on.clear()                            # the next round repairs it
    assert ap.reconcile_once(adapter=world, audit=log, desired=D, actor="t").ok
    assert ap.plan(D, world.observe()) == []


def test_power_on_after_someone_powered_it_off_is_audited() -> None:
    world, log = World((H1,)), Log()
    ap.reconcile_once(adapter=world, audit=log, desired=D, actor="t")
    (vm_id,) = world.vms
    world.vms[vm_id] = replace(world.vms[vm_id], power_state=ap.POWERED_OFF)
    log.entries.clear()
    ap.reconcile_once(adapter=world, audit=log, desired=D, actor="t")
    assert log.entries == [("appliance.power_on", {
        "host": "esx1", "host_id": "host-1", "vm": "vsphere-av-appliance-esx1", "vm_id": vm_id,
        "cluster_id": None, "reason": "found poweredOff"})]


# ------------------------------------------------------------------ status overlay


def test_overlay_marks_vms_on_down_hosts_unprotected() -> None:
    from vsphere_av.models import VmId, VmState

    def state(name: str, host: str, current: str) -> VmState:
        return VmState(moref=VmId(name), name=name, instance_uuid="", host=host,
                       host_moref=host, state=current, reason="", last_scan="",
                       last_full_scan="", signature_version=1)

    states = [state("a", "host-1", "protected"), state("b", "host-2", "protected"),
              state("c", "host-1", "infected")]
    out = ap.overlay_states(states, {"host-1": "appliance down"})
    assert [(s.name, s.state, s.reason) for s in out] == [
        ("a", "unprotected", "appliance down"), ("b", "protected", ""),
        ("c", "unprotected", "appliance down")]
    assert ap.overlay_states(states, {}) == states
