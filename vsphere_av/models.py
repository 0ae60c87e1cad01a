"""Plain data shared by every layer: frozen dataclasses and NewType ids. No behaviour.

Built by the vSphere adapter (``vsphere_av.vsphere``) and the stores; read by every layer
above them (``scan``, ``controller``, ``fleet``, ``app``, the CLI and the API). Nothing here
talks to anything. The types two layers exchange live here, so that neither imports the
other: the watch stream (:class:`ObjectChange`, :class:`VcEvent`, :class:`EventCursor`), scan
jobs (:class:`Job`, :class:`Priority`, :class:`TimeWindow`), guest transfers handed to an
appliance (:class:`TransferChunks`), the appliance inventory the adapter reads for the fleet
plan (:class:`Observed` and its parts, the extraConfig keys, :class:`ApplianceImage`) and the
one audit interface (:class:`Audit`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from enum import IntEnum
from pathlib import Path
from typing import Any, NewType, Protocol

from vsphere_av.errors import ConfigError

_HHMM = re.compile(r"^\d{2}:\d{2}$")

VmId = NewType("VmId", str)              # VirtualMachine moref value, e.g. "vm-42"
HostId = NewType("HostId", str)          # HostSystem moref value, e.g. "host-21"
ScanId = NewType("ScanId", int)          # row id in the scans table
DetectionId = NewType("DetectionId", int)
QuarantineId = NewType("QuarantineId", str)

POWERED_ON = "poweredOn"
POWERED_OFF = "poweredOff"
SUSPENDED = "suspended"

# Protection states reported by `vsphere-av status`.
PROTECTED = "protected"
STALE = "stale"
INFECTED = "infected"
UNPROTECTED = "unprotected"
UNREACHABLE = "unreachable"
PROTECTION_STATES = (PROTECTED, STALE, INFECTED, UNPROTECTED, UNREACHABLE)


@dataclass(frozen=True)
class HostInfo:
    """One ESXi host as seen through vCenter."""

    moref: HostId
    name: str
    address: str                 # management address: replaces `*` in guest transfer URLs
    certificate_sha256: str = ""  # pinned host certificate (colon hex) when vCenter knows it
    connection_state: str = "connected"
    in_maintenance: bool = False


@dataclass(frozen=True)
class VmInfo:
    """One virtual machine, with what a scan needs to reach it."""

    moref: VmId
    name: str
    instance_uuid: str
    power_state: str             # poweredOn | poweredOff | suspended
    tools_running: bool
    guest_id: str
    host: HostInfo | None        # None when vCenter reports no host (orphaned / inaccessible)
    folder_path: str = ""        # inventory path of the VM's folder, e.g. "/DC0/vm/web"
    template: bool = False
    markers: tuple[tuple[str, str], ...] = ()   # extraConfig keys starting "vsphere-av."

    @property
    def is_windows(self) -> bool:
        """Windows guest: its guestId starts with "win" (as vSphere names them)."""
        return self.guest_id.lower().startswith("win")

    @property
    def powered_on(self) -> bool:
        """True when the VM is running."""
        return self.power_state == POWERED_ON

    def marker(self, key: str, default: str = "") -> str:
        """Value of an extraConfig marker such as ``vsphere-av.role``."""
        return dict(self.markers).get(key, default)

    @property
    def is_appliance(self) -> bool:
        """One of our security appliances (extraConfig ``vsphere-av.role = appliance``)."""
        return self.marker("vsphere-av.role") == "appliance"


@dataclass(frozen=True)
class GuestFile:
    """One entry of a guest directory listing (ListFilesInGuest)."""

    path: str                    # full guest path
    name: str
    type: str                    # file | directory | symlink
    size: int
    mtime: str = ""              # ISO 8601 modification time as the guest reports it
    permissions: int | None = None   # POSIX mode bits (Linux guests)


@dataclass(frozen=True)
class DetectionRecord:
    """One detection as stored and reported."""

    id: DetectionId
    scan_id: ScanId
    vm_moref: VmId
    vm_name: str
    path: str
    threat: str
    sha256: str
    size: int
    action: str                  # reported | quarantined | deleted | failed
    time: str
    member: str = ""
    rule: str = ""
    source: str = ""
    detail: str = ""
    quarantine_id: str = ""


@dataclass(frozen=True)
class QuarantineItem:
    """One quarantined file kept in the state directory."""

    id: QuarantineId
    vm_moref: VmId
    vm_name: str
    guest_path: str
    threat: str
    sha256: str
    size: int
    time: str
    is_windows: bool = False
    permissions: int | None = None
    key: bytes = field(default=b"", repr=False)   # obfuscation key of the stored blob
    restored_at: str = ""
    purged_at: str = ""


@dataclass(frozen=True)
class VmState:
    """A VM's protection record in the state store."""

    moref: VmId
    name: str
    instance_uuid: str
    host: str
    host_moref: str
    state: str
    reason: str
    last_scan: str
    last_full_scan: str
    signature_version: int | None   # version of the last clean scan
    updated: str = ""


@dataclass(frozen=True)
class FileRecord:
    """What the per-file index remembers about one guest file."""

    vm_moref: VmId
    path: str
    size: int
    mtime: str
    sha256: str
    signature_version: int
    verdict: str                 # clean | infected


# --- Virtual disks (read by the disk-scan path) ----------------------------------------------

DatastoreId = NewType("DatastoreId", str)    # Datastore moref value, e.g. "datastore-61"
SnapshotId = NewType("SnapshotId", str)      # VirtualMachineSnapshot moref value

INDEPENDENT_DISK_MODES = ("independent_persistent", "independent_nonpersistent")


@dataclass(frozen=True)
class DatastoreInfo:
    """A datastore as the datastore HTTP interface names it (``dsName`` and ``dcPath``)."""

    moref: DatastoreId
    name: str
    datacenter_path: str         # inventory path of its datacenter, e.g. "DC0" or "EU/DC1"


@dataclass(frozen=True)
class DiskFile:
    """One file of a virtual disk, from ``layoutEx.file``."""

    name: str                    # datastore path, e.g. "[LocalDS_0] vm/vm.vmdk"
    datastore: DatastoreInfo
    path: str                    # path inside the datastore, e.g. "vm/vm.vmdk"
    type: str                    # diskDescriptor | diskExtent
    size: int                    # bytes; -1 when vCenter does not list the file


@dataclass(frozen=True)
class DiskUnit:
    """One level of a disk chain (the base disk or one delta): its descriptor and extents."""

    files: tuple[DiskFile, ...]

    @property
    def descriptor(self) -> DiskFile:
        """The descriptor file (``.vmdk``); for a one-file disk, that file."""
        for f in self.files:
            if f.type == "diskDescriptor":
                return f
        return self.files[0]

    @property
    def extents(self) -> tuple[DiskFile, ...]:
        """The data files of this level (empty for a one-file sparse disk)."""
        top = self.descriptor
        return tuple(f for f in self.files if f is not top)


@dataclass(frozen=True)
class VirtualDiskInfo:
    """One virtual disk of a VM and the chain of files that make it up.

    ``chain[0]`` is the level the guest sees (the running point, or the point in time of a
    snapshot), each next one its parent, the last one the base disk.
    """

    vm: VmId
    key: int                     # device key in config.hardware.device
    label: str                   # "Hard disk 1"
    capacity: int                # bytes
    disk_mode: str               # persistent | independent_persistent | ...
    backing: str                 # backing type: flat | sparse | seSparse | rdm-virtual | ...
    datastore: DatastoreInfo     # where the disk's own descriptor lives
    host: HostId | None          # host the VM runs on (or is registered on)
    chain: tuple[DiskUnit, ...]

    @property
    def independent(self) -> bool:
        """Independent disks are left out of snapshots: their contents cannot be frozen."""
        return self.disk_mode in INDEPENDENT_DISK_MODES

    @property
    def file_name(self) -> str:
        """Datastore path of the descriptor the guest sees (``chain[0]``)."""
        return self.chain[0].descriptor.name if self.chain else ""


@dataclass(frozen=True)
class FolderGrant:
    """Leave to read one datastore file on a host, as plain data for another process.

    Made by the controller (``vsphere.disks.DatastoreFiles.grant``) for the host's
    appliance, which reads the bytes itself (``vsphere.disks.GrantedFiles``): the
    ``/folder`` URL on the host, a generic service ticket for it (vCenter's; the appliance
    holds no vCenter credentials) and the SHA-256 of the host certificate to pin.
    """

    url: str
    ticket: str
    thumbprint: str
    spare: tuple[str, ...] = ()  # more tickets for the same URL, for hosts that take each once


@dataclass(frozen=True)
class SnapshotRef:
    """One VM snapshot, by moref and name."""

    vm: VmId
    moref: SnapshotId
    name: str
    created: str = ""            # ISO 8601 creation time as vCenter reports it
    description: str = ""


@dataclass(frozen=True)
class ScanSnapshot:
    """A snapshot taken for scanning and the disks to read under it (the pre-snapshot chain)."""

    snapshot: SnapshotRef
    disks: tuple[VirtualDiskInfo, ...]


@dataclass(frozen=True)
class ObjectChange:
    """One object's changed properties from WaitForUpdatesEx, as plain values."""

    kind: str                                    # "VirtualMachine" | "HostSystem"
    moref: str
    op: str                                      # "enter" | "modify" | "leave"
    changes: tuple[tuple[str, Any], ...] = ()    # (property path, plain value or None)


@dataclass(frozen=True)
class VcEvent:
    """One vCenter event, reduced to what the controller reads."""

    key: int
    created: datetime
    type_id: str                 # class name ("VmPoweredOnEvent") or EventEx eventTypeId
    vm: str = ""                 # VM moref the event is about
    vm_name: str = ""
    host: str = ""               # host moref (the destination for migrations)
    source_host: str = ""        # migrations: where the VM came from
    description_id: str = ""     # TaskEvent: the task's descriptionId
    message: str = ""


# -- what the controller gets back ------------------------------------------------------


VM_PROPERTIES: tuple[str, ...] = (
    "name", "runtime.powerState", "runtime.host", "guest.toolsRunningStatus",
    "snapshot.currentSnapshot", "config.template", "config.instanceUuid",
)


HOST_PROPERTIES: tuple[str, ...] = ("name", "runtime.connectionState",
                                    "runtime.inMaintenanceMode")


@dataclass(frozen=True)
class EventCursor:
    """Where the event tail stopped: last processed key and that event's createdTime (ISO)."""

    key: int
    time: str


class Priority(IntEnum):
    """Lower value runs first."""

    INSTANT_ON = 0
    ON_DEMAND = 1
    SWEEP = 2
    SCHEDULED = 3

    @property
    def label(self) -> str:
        """Lower-case name used in the store, JSON and the audit log."""
        return self.name.lower().replace("_", "-")

    @classmethod
    def parse(cls, value: str | int) -> Priority:
        """Accept a Priority value, its number or its label."""
        if isinstance(value, int):
            return cls(value)
        for member in cls:
            if value in (member.label, member.name):
                return member
        raise ConfigError(f"unknown priority {value!r}")


@dataclass(frozen=True)
class TimeWindow:
    """Daily window [start, end) in UTC; end before start wraps midnight (22:00-06:00)."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        """Parse 'HH:MM-HH:MM'."""
        try:
            left, right = text.split("-")
            if not all(_HHMM.match(part.strip()) for part in (left, right)):
                raise ValueError(text)
            start = time.fromisoformat(left.strip())
            end = time.fromisoformat(right.strip())
        except ValueError as exc:
            raise ConfigError(f"time window must look like 22:00-06:00, got {text!r}") from exc
        if start == end:
            raise ConfigError(f"time window {text!r} is empty")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start.strftime('%H:%M')}-{self.end.strftime('%H:%M')}"

    def contains(self, at: datetime) -> bool:
        """True when ``at`` falls inside the window."""
        t = at.astimezone(UTC).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_open(self, after: datetime) -> datetime:
        """The moment the window is next open at or after ``after`` (``after`` if open now)."""
        after = after.astimezone(UTC)
        if self.contains(after):
            return after
        candidate = after.replace(hour=self.start.hour, minute=self.start.minute, second=0,
                                  microsecond=0)
        if candidate <= after:
            candidate += timedelta(days=1)
        return candidate

    def closes_at(self, at: datetime) -> datetime:
        """When the window that contains ``at`` closes (``at`` itself if it is closed)."""
        at = at.astimezone(UTC)
        if not self.contains(at):
            return at
        candidate = at.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if candidate <= at:
            candidate += timedelta(days=1)
        return candidate


@dataclass(frozen=True)
class Job:
    """One unit of scan work for one VM. The worker re-reads the VM's state before acting."""

    job_id: int
    vm: str                      # VM moref
    host: str                    # host moref the VM runs on (the queue it waits in)
    priority: Priority
    seq: int                     # arrival order; FIFO within a priority
    full: bool = False           # read every byte (no incremental / shared-verdict shortcuts)
    reason: str = ""
    not_before: float = 0.0      # epoch seconds; jitter and retry backoff
    window: TimeWindow | None = None
    attempts: int = 0
    resume_after: str = ""       # guest path a window-limited scan stopped after


# ----------------------------------------------------------------------------- transfers


class TransferChunks:
    """A guest file not yet downloaded: its single-use transfer URL, for the appliance to pull.

    Made by the adapter (``vsphere.appliances.ApplianceGuestFiles``), read by the engine
    client (``engine.remote.client.RemoteSession`` hands the URL to the appliance).
    Iterating it streams the file through the controller instead (``fallback``), so code that
    only knows ``Iterable[bytes]`` (the in-process engine, quarantine) still works.
    """

    def __init__(self, *, url: str, thumbprint: str, size: int,
                 fallback: Callable[[], Iterable[bytes]]) -> None:
        self.url = url
        self.thumbprint = thumbprint
        self.size = size
        self._fallback = fallback

    def __repr__(self) -> str:
        return f"TransferChunks(size={self.size})"   # the URL carries a ticket: not shown

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._fallback())


# ----------------------------------------------------------------------------- appliances
# What the adapter (``vsphere.appliances``) reads and ``fleet.plan`` plans from.

ROLE_KEY = "vsphere-av.role"        # extraConfig marker of every appliance VM ...
ROLE_VALUE = "appliance"            # ... with this value
HOST_KEY = "vsphere-av.host"        # extraConfig: the moref of the host the appliance serves
ADDRESS_KEY = "guestinfo.ipaddress"  # extraConfig / OVF property: a pool address given at deploy
# On an appliance deployed by `appliances upgrade` beside the one it replaces, until the
# work moves to it: the moref of the old one. Scans and health rounds skip a standby;
# reconcile neither counts it as a duplicate nor removes the appliance it replaces.
STANDBY_KEY = "vsphere-av.standby"


@dataclass(frozen=True)
class FleetHost:
    """One ESXi host as vCenter sees it, for the appliance plan."""

    id: str                     # moref value, e.g. "host-21"
    name: str
    cluster_id: str | None      # None for a standalone host
    cluster_name: str = ""
    connected: bool = True
    maintenance: bool = False


@dataclass(frozen=True)
class ApplianceVm:
    """A VM carrying our appliance marker (``vsphere-av.role = appliance``)."""

    id: str
    name: str
    marker_host: str            # the host moref in ``vsphere-av.host``
    host_id: str | None         # where it runs now
    power_state: str            # poweredOn | poweredOff | suspended
    extra_config: Mapping[str, str] = field(default_factory=dict)
    drs_disabled: bool = False  # a cluster DRS override with enabled = False exists
    ha_disabled: bool = False   # a cluster HA override with restartPriority = disabled exists
    address: str = ""           # guest.ipAddress reported by VMware Tools
    tools_running: bool = False


@dataclass(frozen=True)
class HostPin:
    """The groups and rule that pin one host's appliance, as found in its cluster."""

    cluster_id: str
    host_id: str
    vm_group: frozenset[str] | None     # None: the VM group does not exist
    host_group: frozenset[str] | None   # None: the host group does not exist
    rule_ok: bool                       # rule exists, mandatory, enabled, names both groups
    rule_exists: bool = False


@dataclass(frozen=True)
class Observed:
    """Everything ``fleet.plan.plan`` needs to know about the inventory."""

    hosts: tuple[FleetHost, ...] = ()
    appliances: tuple[ApplianceVm, ...] = ()
    pins: tuple[HostPin, ...] = ()


@dataclass(frozen=True)
class ApplianceAddress:
    """Where the controller reaches one appliance (SSH, engine service)."""

    host_id: str
    host: str
    vm_id: str
    vm: str
    address: str        # guest.ipAddress from VMware Tools ("" while unknown)
    powered_on: bool
    standby: bool = False   # deployed by an upgrade, not serving yet (see STANDBY_KEY)


class ApplianceImage(Protocol):
    """What an OVF deploy imports (``fleet.image.ConfiguredImage``, read by the adapter)."""

    def descriptor(self) -> AbstractContextManager[Path]:
        """The checked OVF descriptor, its disks beside it, while the block runs."""
        ...

    def properties(self, *, extra_config: Mapping[str, str], descriptor: str
                   ) -> Mapping[str, str]:
        """The OVF property values to set, of those ``descriptor`` declares."""
        ...


class Audit(Protocol):
    """Where security-relevant actions are recorded: ``store.audit.AuditLog`` (the one
    implementation) as every layer that records sees it."""

    def append(self, *, actor: str, action: str, details: Mapping[str, Any] | None = None) -> Any:
        """Record one entry; raise rather than lose it."""
        ...
