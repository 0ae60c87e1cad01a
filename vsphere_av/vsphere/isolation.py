"""Network isolation without NSX: disconnect every vNIC of a VM, and restore it exactly.

Called by ``controller`` (instant-on containment, release after a clean scan). Calls
pyVmomi through ``Connection.call``; waits for the ReconfigVM task. Returns plain
:class:`NicState` records; the caller stores them (``store.jobs.JobStore.record_isolation``)
*before* cutting, so the exact previous state survives a crash in between.

Isolation sets ``connectable.connected = False`` and ``startConnected = False`` on every
``VirtualEthernetCard`` (so the NIC stays down across a guest reboot, a reset or a snapshot
revert), and ``allowGuestControl = False`` so the guest cannot reconnect it. Guest operations
go through the host, not the guest network, so scanning and remediation keep working.
Restore writes back the three recorded flags per NIC key, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.vsphere.connection import Connection
from vsphere_av.vsphere.tasks import wait_task

TASK_TIMEOUT = 60.0


@dataclass(frozen=True)
class NicState:
    """One vNIC's connection flags, keyed by device key."""

    key: int
    label: str
    mac: str
    connected: bool
    start_connected: bool
    allow_guest_control: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for the job store."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NicState:
        """Inverse of :meth:`as_dict`."""
        return cls(key=int(data["key"]), label=str(data.get("label", "")),
                   mac=str(data.get("mac", "")), connected=bool(data["connected"]),
                   start_connected=bool(data["start_connected"]),
                   allow_guest_control=bool(data.get("allow_guest_control", True)))


def _nics(content: Any, vm: Any) -> list[Any]:
    """The VM's virtual Ethernet cards, reading only ``config.hardware.device``."""
    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=vm, skip=False)],
                         propSet=[pc.PropertySpec(type=vim.VirtualMachine,
                                                  pathSet=["config.hardware.device"])])
    result = content.propertyCollector.RetrieveContents([spec])
    devices: list[Any] = []
    for obj in result or []:
        for prop in obj.propSet or []:
            devices.extend(prop.val or [])
        for missing in obj.missingSet or []:
            if isinstance(missing.fault, vmodl.fault.ManagedObjectNotFound):
                raise errors.NotFound(f"VM {vm._moId} no longer exists")
    return [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def _state(dev: Any) -> NicState:
    c = dev.connectable
    return NicState(key=int(dev.key), label=str(dev.deviceInfo.label if dev.deviceInfo else ""),
                    mac=str(getattr(dev, "macAddress", "") or ""),
                    connected=bool(c.connected) if c else False,
                    start_connected=bool(c.startConnected) if c else False,
                    allow_guest_control=bool(c.allowGuestControl) if c else False)


def read_nics(conn: Connection, vm_moref: str) -> list[NicState]:
    """The VM's vNICs and their connection flags, by device key."""
    ref = conn.ref("VirtualMachine", vm_moref)
    devs = conn.call(f"read NICs of {vm_moref}", lambda c: _nics(c, ref))
    return sorted((_state(d) for d in devs), key=lambda n: n.key)


def _apply(conn: Connection, vm_moref: str, wanted: Mapping[int, NicState], what: str,
           *, devs: Sequence[Any] | None = None) -> int:
    """Edit the NICs whose flags differ from ``wanted``; returns how many were changed."""
    ref = conn.ref("VirtualMachine", vm_moref)
    if devs is None:
        devs = conn.call(what, lambda c: _nics(c, ref))
    changes = []
    for dev in devs:
        target = wanted.get(int(dev.key))
        if target is None:
            continue
        if _state(dev) == target:
            continue
        if dev.connectable is None:
            dev.connectable = vim.vm.device.VirtualDevice.ConnectInfo()
        dev.connectable.connected = target.connected
        dev.connectable.startConnected = target.start_connected
        dev.connectable.allowGuestControl = target.allow_guest_control
        changes.append(vim.vm.device.VirtualDeviceSpec(
            operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=dev))
    if not changes:
        return 0
    spec = vim.vm.ConfigSpec(deviceChange=changes)
    task = conn.call(what, lambda _c: ref.ReconfigVM_Task(spec=spec))
    wait_task(conn, task, what, timeout=TASK_TIMEOUT)
    return len(changes)


def disconnect_all(conn: Connection, vm_moref: str, nics: Sequence[NicState]) -> int:
    """Cut every NIC in ``nics`` (connected, startConnected, guest control off); edits made."""
    wanted = {n.key: NicState(key=n.key, label=n.label, mac=n.mac, connected=False,
                              start_connected=False, allow_guest_control=False) for n in nics}
    return _apply(conn, vm_moref, wanted, f"isolate {vm_moref}")


def isolate(conn: Connection, vm_moref: str, *,
            before_cut: Callable[[list[NicState]], None]) -> tuple[list[NicState], int]:
    """Read the NICs once, hand their state to ``before_cut`` (to save it), then cut them all."""
    ref = conn.ref("VirtualMachine", vm_moref)
    what = f"isolate {vm_moref}"
    devs = conn.call(what, lambda c: _nics(c, ref))
    before = sorted((_state(d) for d in devs), key=lambda n: n.key)
    before_cut(before)
    wanted = {n.key: NicState(key=n.key, label=n.label, mac=n.mac, connected=False,
                              start_connected=False, allow_guest_control=False) for n in before}
    return before, _apply(conn, vm_moref, wanted, what, devs=devs)


def restore(conn: Connection, vm_moref: str, nics: Sequence[NicState]) -> int:
    """Put back the exact recorded flags of every NIC that still exists; returns edits made."""
    return _apply(conn, vm_moref, {n.key: n for n in nics}, f"restore network of {vm_moref}")
