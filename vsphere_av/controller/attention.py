"""Level-based watching: turn vCenter property changes and events into "VM needs attention" keys.

Called by ``controller.watching``, which feeds it what the adapter (``vsphere.watching``)
returns: :class:`ObjectChange` batches from ``WaitForUpdatesEx`` and :class:`VcEvent` pages from the
event tail. Calls nothing: it keeps the last known facts of every VM and host in memory and
returns :class:`Attention` items (a VM moref plus why); the controller re-reads state and
decides (a work item is a key, as in controller-runtime). The same power-on arriving both as
a property change and as an event gives two items for one key; handling them is idempotent.

Staleness (issue 5, point 2) is :func:`staleness`: a VM is stale when it was never scanned
clean, when its last clean scan used an older signature version than the active one, or when
something marked it stale (revert to a snapshot; created, cloned, registered or migrated in
from an unwatched place), until a clean scan under the active version clears the mark.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from vsphere_av.models import ObjectChange, VcEvent

# -- what the adapter hands in ------------------------------------------------------------


class Trigger(StrEnum):
    """Why a VM needs attention."""

    POWERED_ON = "powered-on"        # power on, resume, HA restart, guest reboot, reset
    REVERTED = "reverted"            # disk back in an older state (snapshot revert)
    CREATED = "created"              # created, cloned, deployed, registered, discovered
    MIGRATED = "migrated"            # runs on another host now
    REMOVED = "removed"              # gone from the inventory
    POWERED_OFF = "powered-off"      # stopped running (scans cannot run; jobs wait)
    TOOLS_READY = "tools-ready"      # guest operations became possible
    CHANGED = "changed"              # name or other identity changed: refresh
    LISTED = "listed"                # running when the watch (re)started: not a power-on


@dataclass(frozen=True)
class Attention:
    """A VM key plus why it needs looking at; ``at`` is when it happened (epoch seconds)."""

    vm: str
    trigger: Trigger
    cause: str                   # event type or property path, for logs and the audit log
    at: float
    event_key: int | None = None
    host: str = ""               # where the VM runs, when known
    source_host: str = ""        # migrations: where it came from


@dataclass(frozen=True)
class VmFacts:
    """The watcher's last known view of one VM."""

    moref: str
    name: str = ""
    power_state: str = ""
    host: str = ""
    tools_running: bool = False
    current_snapshot: str = ""
    template: bool = False
    instance_uuid: str = ""

    @property
    def running(self) -> bool:
        """True while powered on."""
        return self.power_state == "poweredOn"


# Event types (vsphere-api.md, "Events and properties that trigger work").
POWER_ON_EVENTS = frozenset({
    "VmStartingEvent", "VmPoweredOnEvent", "DrsVmPoweredOnEvent", "VmResumingEvent",
    "VmRestartedOnAlternateHostEvent", "com.vmware.vc.ha.VmRestartedByHAEvent",
    "VmGuestRebootEvent", "VmResettingEvent",
})
REVERT_EVENTS = frozenset({"com.vmware.vc.vm.VmStateRevertedToSnapshot"})
REVERT_TASKS = frozenset({"vm.Snapshot.revert", "VirtualMachine.revertToCurrentSnapshot",
                          "VirtualMachine.revertToSnapshot"})
CREATE_EVENTS = frozenset({"VmCreatedEvent", "VmClonedEvent", "VmDeployedEvent",
                           "VmRegisteredEvent", "VmDiscoveredEvent",
                           "com.vmware.vc.vm.InstantCloneEvent"})
MIGRATE_EVENTS = frozenset({"VmMigratedEvent", "DrsVmMigratedEvent", "VmRelocatedEvent"})
CHANGE_EVENTS = frozenset({"VmReconfiguredEvent", "VmRenamedEvent"})
REMOVE_EVENTS = frozenset({"VmRemovedEvent"})
POWER_OFF_EVENTS = frozenset({"VmPoweredOffEvent", "VmSuspendedEvent"})
HOST_EVENTS = frozenset({
    "HostAddedEvent", "HostRemovedEvent", "HostConnectedEvent", "HostDisconnectedEvent",
    "EnteringMaintenanceModeEvent", "EnteredMaintenanceModeEvent", "ExitMaintenanceModeEvent",
})
TASK_EVENTS = frozenset({"TaskEvent"})

WATCHED_EVENT_TYPES: tuple[str, ...] = tuple(sorted(
    POWER_ON_EVENTS | REVERT_EVENTS | CREATE_EVENTS | MIGRATE_EVENTS | CHANGE_EVENTS
    | REMOVE_EVENTS | POWER_OFF_EVENTS | HOST_EVENTS | TASK_EVENTS))

_FIELD_OF = {
    "name": "name", "runtime.powerState": "power_state", "runtime.host": "host",
    "guest.toolsRunningStatus": "tools_running", "snapshot.currentSnapshot": "current_snapshot",
    "config.template": "template", "config.instanceUuid": "instance_uuid",
}
_MAX_SNAPSHOTS_REMEMBERED = 256


@dataclass
class Watcher:
    """Keeps the last known facts; turns changes and events into :class:`Attention` items."""

    vms: dict[str, VmFacts] = field(default_factory=dict)
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Snapshots that were ever current per VM: the current snapshot moving back to one of
    # them is a revert (creating a snapshot moves it to a new one).
    _snapshots: dict[str, list[str]] = field(default_factory=dict)
    synced: bool = False          # True once the first full listing was applied

    def apply_changes(self, changes: Iterable[ObjectChange], *, at: float) -> list[Attention]:
        """Apply one WaitForUpdatesEx batch; returns the VMs whose facts matter now."""
        out: list[Attention] = []
        for ch in changes:
            if ch.kind == "HostSystem":
                self._apply_host(ch)
                continue
            if ch.kind != "VirtualMachine":
                continue
            if ch.op == "leave":
                gone = self.vms.pop(ch.moref, None)
                self._snapshots.pop(ch.moref, None)
                if gone is not None:
                    out.append(Attention(ch.moref, Trigger.REMOVED, "leave", at))
                continue
            before = self.vms.get(ch.moref)
            after = before or VmFacts(moref=ch.moref)
            values: dict[str, Any] = {}
            for path, value in ch.changes:
                name = _FIELD_OF.get(path)
                if name is None:
                    continue
                if name == "tools_running":
                    value = value == "guestToolsRunning"
                elif name == "template":
                    value = bool(value)
                else:
                    value = "" if value is None else str(value)
                values[name] = value
            after = replace(after, **values)
            self.vms[ch.moref] = after
            out.extend(self._transitions(before, after, at=at, first=ch.op == "enter"))
        return out

    def _apply_host(self, ch: ObjectChange) -> None:
        if ch.op == "leave":
            self.hosts.pop(ch.moref, None)
            return
        facts = self.hosts.setdefault(ch.moref, {})
        for path, value in ch.changes:
            facts[path] = value

    def _transitions(self, before: VmFacts | None, after: VmFacts, *, at: float,
                     first: bool) -> list[Attention]:
        vm = after.moref
        out: list[Attention] = []
        snaps = self._snapshots.setdefault(vm, [])
        if before is None:
            if after.current_snapshot:
                snaps.append(after.current_snapshot)
            if self.synced and first:
                # A VM that appears after the initial listing came from somewhere we did not
                # watch (created, registered, moved into the view).
                out.append(Attention(vm, Trigger.CREATED, "enter", at, host=after.host))
            if after.running:
                # Initial listing: a running VM is checked (level-based) like a power-on.
                out.append(Attention(vm, Trigger.POWERED_ON, "runtime.powerState", at,
                                     host=after.host))
            return out
        if after.current_snapshot != before.current_snapshot and after.current_snapshot:
            if after.current_snapshot in snaps:
                out.append(Attention(vm, Trigger.REVERTED, "snapshot.currentSnapshot", at,
                                     host=after.host))
            else:
                snaps.append(after.current_snapshot)
                del snaps[:-_MAX_SNAPSHOTS_REMEMBERED]
        if after.running and not before.running:
            out.append(Attention(vm, Trigger.POWERED_ON, "runtime.powerState", at,
                                 host=after.host))
        elif before.running and not after.running:
            out.append(Attention(vm, Trigger.POWERED_OFF, "runtime.powerState", at,
                                 host=after.host))
        if after.host != before.host and after.host and before.host:
            out.append(Attention(vm, Trigger.MIGRATED, "runtime.host", at, host=after.host,
                                 source_host=before.host))
        if after.tools_running and not before.tools_running and after.running:
            out.append(Attention(vm, Trigger.TOOLS_READY, "guest.toolsRunningStatus", at,
                                 host=after.host))
        if after.name != before.name:
            out.append(Attention(vm, Trigger.CHANGED, "name", at, host=after.host))
        return out

    def apply_events(self, events: Iterable[VcEvent]) -> list[Attention]:
        """Turn events (already de-duplicated by key) into attention items, in key order."""
        out: list[Attention] = []
        for ev in sorted(events, key=lambda e: e.key):
            at = ev.created.timestamp()
            trigger = event_trigger(ev)
            if trigger is None or not ev.vm:
                continue
            out.append(Attention(ev.vm, trigger, ev.type_id if ev.type_id != "TaskEvent"
                                 else ev.description_id, at, event_key=ev.key,
                                 host=ev.host, source_host=ev.source_host))
        return out

    def host_events(self, events: Iterable[VcEvent]) -> list[VcEvent]:
        """Events about hosts (added, removed, maintenance mode): the appliance loop's input."""
        return [e for e in events if e.type_id in HOST_EVENTS]

    def facts(self, vm: str) -> VmFacts | None:
        """Last known facts of a VM."""
        return self.vms.get(vm)


def event_trigger(ev: VcEvent) -> Trigger | None:
    """What an event means for its VM, or None when it does not matter."""
    t = ev.type_id
    if t in POWER_ON_EVENTS:
        return Trigger.POWERED_ON
    if t in REVERT_EVENTS or (t in TASK_EVENTS and ev.description_id in REVERT_TASKS):
        return Trigger.REVERTED
    if t in CREATE_EVENTS:
        return Trigger.CREATED
    if t in MIGRATE_EVENTS:
        return Trigger.MIGRATED
    if t in REMOVE_EVENTS:
        return Trigger.REMOVED
    if t in POWER_OFF_EVENTS:
        return Trigger.POWERED_OFF
    if t in CHANGE_EVENTS:
        return Trigger.CHANGED
    return None


# -- staleness (issue 5, point 2) ------------------------------------------------------------


@dataclass(frozen=True)
class Protection:
    """What the state store says about a VM's last scans (``store.state.VmState`` fits)."""

    state: str                       # protected | stale | infected | unprotected | unreachable
    signature_version: int | None    # version of the last clean scan
    reason: str = ""


def staleness(record: Protection | None, *, active_version: int | None) -> str | None:
    """Why a VM carries stale protection, or None when it is clean under the active version."""
    if record is None:
        return "never scanned"
    if record.state == "infected":
        return "detection not remediated and rescanned clean"
    if record.state == "stale":
        return record.reason or "marked stale"
    if record.signature_version is None:
        return "never scanned clean"
    if active_version is not None and record.signature_version < active_version:
        return (f"last clean scan used signature version {record.signature_version},"
                f" active is {active_version}")
    if record.state != "protected":
        return record.reason or record.state
    return None


def marks_stale(attention: Attention, *, watched_hosts: Mapping[str, Any]) -> str | None:
    """The stale mark an attention item puts on a VM (revert, creation, migration from outside)."""
    if attention.trigger is Trigger.REVERTED:
        return "reverted to a snapshot"
    if attention.trigger is Trigger.CREATED:
        return f"created, cloned or registered ({attention.cause})"
    if attention.trigger is Trigger.MIGRATED and attention.source_host \
            and attention.source_host not in watched_hosts:
        return "migrated in from an unwatched host"
    return None


def needs_instant_on(attention: Attention, *, running: bool, stale_reason: str | None) -> bool:
    """True when the VM must be contained and scanned ahead of all other work now."""
    if stale_reason is None or not running:
        return False
    return attention.trigger in (Trigger.POWERED_ON, Trigger.REVERTED, Trigger.CREATED,
                                 Trigger.MIGRATED, Trigger.TOOLS_READY)
