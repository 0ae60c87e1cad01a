"""Plain data shared by every layer: frozen dataclasses and NewType ids. No behaviour.

Built by the vSphere adapter (``vsphere_av.vsphere``) and the state store; read by
``scanning``, ``app``, the CLI and the controller. Nothing here talks to anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType

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
