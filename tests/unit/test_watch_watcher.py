"""Level-based watcher: property changes and events -> attention keys; staleness rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from vsphere_av.controller.attention import (
    WATCHED_EVENT_TYPES,
    Attention,
    Protection,
    Trigger,
    Watcher,
    event_trigger,
    marks_stale,
    needs_instant_on,
    staleness,
)
from vsphere_av.models import ObjectChange, VcEvent


def vm(moref: str, op: str = "modify", **props: Any) -> ObjectChange:
    names = {"power": "runtime.powerState", "host": "runtime.host",
             "snap": "snapshot.currentSnapshot", "tools": "guest.toolsRunningStatus",
             "name": "name"}
    return ObjectChange("VirtualMachine", moref, op, tuple((names[k], v) for k, v in props.items()))


def triggers(items: list[Attention]) -> list[tuple[str, Trigger]]:
    return [(a.vm, a.trigger) for a in items]


def test_initial_listing_checks_running_vms_only() -> None:
    w = Watcher()
    got = w.apply_changes([vm("vm-1", "enter", power="poweredOn", host="host-1"),
                           vm("vm-2", "enter", power="poweredOff", host="host-1")], at=1.0)
    assert triggers(got) == [("vm-1", Trigger.POWERED_ON)]
    assert got[0].host == "host-1"


def test_vm_appearing_after_sync_is_created() -> None:
    w = Watcher()
    w.apply_changes([vm("vm-1", "enter", power="poweredOff")], at=1.0)
    w.synced = True
    got = w.apply_changes([vm("vm-9", "enter", power="poweredOn", host="h")], at=2.0)
    assert triggers(got) == [("vm-9", Trigger.CREATED), ("vm-9", Trigger.POWERED_ON)]


@pytest.mark.parametrize(("before", "after", "expected"), [
    ({"power": "poweredOff"}, {"power": "poweredOn"}, [Trigger.POWERED_ON]),
    ({"power": "suspended"}, {"power": "poweredOn"}, [Trigger.POWERED_ON]),
    ({"power": "poweredOn"}, {"power": "poweredOff"}, [Trigger.POWERED_OFF]),
    ({"power": "poweredOn", "host": "h1"}, {"host": "h2"}, [Trigger.MIGRATED]),
    ({"power": "poweredOn", "tools": "guestToolsNotRunning"}, {"tools": "guestToolsRunning"},
     [Trigger.TOOLS_READY]),
    ({"power": "poweredOff", "tools": "guestToolsNotRunning"}, {"tools": "guestToolsRunning"},
     []),
    ({"name": "a"}, {"name": "b"}, [Trigger.CHANGED]),
    ({"power": "poweredOn"}, {"power": "poweredOn"}, []),
])
def test_property_transitions(before: dict[str, Any], after: dict[str, Any],
                              expected: list[Trigger]) -> None:
    w = Watcher()
    w.apply_changes([vm("vm-1", "enter", **before)], at=1.0)
    got = w.apply_changes([vm("vm-1", **after)], at=2.0)
    assert [a.trigger for a in got] == expected


def test_snapshot_back_to_a_known_one_is_a_revert() -> None:
    w = Watcher()
    w.apply_changes([vm("vm-1", "enter", power="poweredOn", snap="snapshot-1")], at=1.0)
    assert w.apply_changes([vm("vm-1", snap="snapshot-2")], at=2.0) == []   # new snapshot
    got = w.apply_changes([vm("vm-1", snap="snapshot-1")], at=3.0)
    assert triggers(got) == [("vm-1", Trigger.REVERTED)]


def test_leave_and_hosts() -> None:
    w = Watcher()
    w.apply_changes([vm("vm-1", "enter", power="poweredOff"),
                     ObjectChange("HostSystem", "host-1", "enter", (("name", "esx-1"),))], at=1.0)
    assert w.hosts == {"host-1": {"name": "esx-1"}}
    got = w.apply_changes([ObjectChange("VirtualMachine", "vm-1", "leave")], at=2.0)
    assert triggers(got) == [("vm-1", Trigger.REMOVED)]
    assert w.facts("vm-1") is None


def ev(key: int, type_id: str, **kw: Any) -> VcEvent:
    return VcEvent(key=key, created=datetime(2026, 1, 1, tzinfo=UTC), type_id=type_id,
                   vm=kw.pop("vm", "vm-1"), **kw)


@pytest.mark.parametrize(("event", "trigger"), [
    (ev(1, "VmPoweredOnEvent"), Trigger.POWERED_ON),
    (ev(1, "DrsVmPoweredOnEvent"), Trigger.POWERED_ON),
    (ev(1, "VmResumingEvent"), Trigger.POWERED_ON),
    (ev(1, "com.vmware.vc.ha.VmRestartedByHAEvent"), Trigger.POWERED_ON),
    (ev(1, "VmGuestRebootEvent"), Trigger.POWERED_ON),
    (ev(1, "com.vmware.vc.vm.VmStateRevertedToSnapshot"), Trigger.REVERTED),
    (ev(1, "TaskEvent", description_id="VirtualMachine.revertToCurrentSnapshot"),
     Trigger.REVERTED),
    (ev(1, "TaskEvent", description_id="VirtualMachine.powerOn"), None),
    (ev(1, "VmClonedEvent"), Trigger.CREATED),
    (ev(1, "VmRegisteredEvent"), Trigger.CREATED),
    (ev(1, "VmMigratedEvent"), Trigger.MIGRATED),
    (ev(1, "VmRemovedEvent"), Trigger.REMOVED),
    (ev(1, "VmPoweredOffEvent"), Trigger.POWERED_OFF),
    (ev(1, "UserLoginSessionEvent"), None),
])
def test_event_triggers(event: VcEvent, trigger: Trigger | None) -> None:
    assert event_trigger(event) is trigger
    if trigger is not None:
        assert event.type_id in WATCHED_EVENT_TYPES


def test_events_in_key_order_and_vmless_dropped() -> None:
    w = Watcher()
    got = w.apply_events([ev(5, "VmPoweredOnEvent", vm="vm-2"), ev(3, "VmClonedEvent"),
                          ev(4, "HostAddedEvent", vm="")])
    assert [(a.event_key, a.vm, a.trigger) for a in got] == [
        (3, "vm-1", Trigger.CREATED), (5, "vm-2", Trigger.POWERED_ON)]
    assert [e.key for e in w.host_events([ev(4, "HostAddedEvent", vm="")])] == [4]


@pytest.mark.parametrize(("record", "active", "stale"), [
    (None, 3, "never scanned"),
    (Protection("unprotected", None, "never scanned"), 3, "never scanned clean"),
    (Protection("protected", 3), 3, None),
    (Protection("protected", 2), 3, "last clean scan used signature version 2, active is 3"),
    (Protection("protected", 2), None, None),
    (Protection("stale", 3, "reverted to a snapshot"), 3, "reverted to a snapshot"),
    (Protection("infected", None), 3, "detection not remediated and rescanned clean"),
    (Protection("unreachable", 3, "invalid guest login"), 3, "invalid guest login"),
])
def test_staleness(record: Protection | None, active: int | None, stale: str | None) -> None:
    assert staleness(record, active_version=active) == stale


@pytest.mark.parametrize(("attention", "mark"), [
    (Attention("vm", Trigger.REVERTED, "x", 0), "reverted to a snapshot"),
    (Attention("vm", Trigger.CREATED, "VmClonedEvent", 0),
     "created, cloned or registered (VmClonedEvent)"),
    (Attention("vm", Trigger.MIGRATED, "x", 0, source_host="host-9"),
     "migrated in from an unwatched host"),
    (Attention("vm", Trigger.MIGRATED, "x", 0, source_host="host-1"), None),
    (Attention("vm", Trigger.POWERED_ON, "x", 0), None),
])
def test_marks_stale(attention: Attention, mark: str | None) -> None:
    assert marks_stale(attention, watched_hosts={"host-1": {}}) == mark


@pytest.mark.parametrize(("trigger", "running", "stale", "expected"), [
    (Trigger.POWERED_ON, True, "never scanned", True),
    (Trigger.POWERED_ON, True, None, False),
    (Trigger.POWERED_ON, False, "never scanned", False),
    (Trigger.REVERTED, True, "reverted to a snapshot", True),
    (Trigger.POWERED_OFF, False, "x", False),
    (Trigger.REMOVED, True, "x", False),
])
def test_needs_instant_on(trigger: Trigger, running: bool, stale: str | None,
                          expected: bool) -> None:
    assert needs_instant_on(Attention("vm", trigger, "c", 0), running=running,
                            stale_reason=stale) is expected
