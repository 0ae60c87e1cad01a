"""A VM's virtual disks, snapshots taken for scanning them, and range reads of datastore files.

Called by the disk-scan path (which audits what it does: nothing is audited here), by
the controller at start, to remove scan snapshots a crash left behind, and by the engine
service of each host's appliance (:class:`GrantedFiles`, built by ``cli.py``). Calls
``Connection.call`` (PropertyCollector, ``CreateSnapshot_Task``, ``RemoveSnapshot_Task``,
``SessionManager.AcquireGenericServiceTicket``), ``tasks.wait_task``, and ``requests``
through the transfer trust of ``guest`` for the host's ``/folder`` interface. Returns
``models.VirtualDiskInfo`` / ``SnapshotRef`` / ``ScanSnapshot`` and :class:`DatastoreFile`,
never live vim objects.

Which files make up a disk: the device's backing chain (``backing.fileName``, then
``backing.parent``...) gives the order, the guest-visible level first; ``layoutEx.disk`` and
``layoutEx.file`` give each level's descriptor and extents with their sizes. After a
snapshot the VM writes to new delta disks; the disks to read are the levels the snapshot's
file layout (``layoutEx.snapshot``) lists: the chain as it was when it was taken. A VM's
disks come in the order the guest numbers them (controller bus number, then unit number:
``sda``, ``sdb``...), which is what the reader's ``/dev/sdX`` names and drive letters follow.

Errors: a snapshot that cannot be taken (independent disk, physical RDM, a snapshot fault
from vCenter) -> ``SnapshotError`` with the reason; the VM or snapshot gone -> ``NotFound``;
a VM busy with another task -> ``TransientError``. Datastore reads: HTTP 404 -> ``NotFound``
naming the file, 401/403 (after one fresh ticket) -> ``PermissionDenied``, a certificate
that is not the pinned one -> ``TlsVerificationError``, network trouble and 5xx ->
``TransientError``.

Datastore reads (``GET https://<host>/folder/<path>?dcPath=<dc>&dsName=<ds>`` with a
``Range`` header) go straight to the ESXi host the VM is on, so the bytes stay on that
host's network when the host's appliance reads them. Authentication is a generic service
ticket from vCenter bound to that URL and method (cookie ``vmware_cgi_ticket``): one ticket
per file, replaced once when the host answers 401/403; when a host turns out to accept each
ticket only once, every request to it gets a fresh one, taken from a small stock per file
that background threads keep filled while the reader uses the last one (``_TicketStock``:
a SOAP round trip to vCenter costs tens of milliseconds; a few tickets ahead at most, dropped
unused after ``SPARE_TTL``, nothing fetched once the file is closed or no longer read). The
pyVmomi connection is already shared by threads (its SOAP adapter pools its HTTP
connections). Tickets are never logged. The host certificate is pinned
exactly as for guest transfers (``guest._http_session``). Each host gets one keep-alive
session with at most ``pool_size`` connections (requests wait for a free one); at most
``max_hosts`` sessions are kept, the least recently used closed first.

When the host's appliance reads instead (``scan.sources.remote_disk``), the controller only
grants: :meth:`DatastoreFiles.grant` gives the URL, a fresh ticket and the host pin as a
``models.FolderGrant``, and the appliance's :class:`GrantedFiles` reads with the same
:class:`DatastoreFile` (same ticket rules, same errors), its stock filled by grants (each a
round trip to the controller carrying up to ``1 + MAX_SPARE`` tickets, asked for ahead of
need as above); the controller issues a grant's tickets side by side, not one SOAP call
after another. It holds no vCenter connection and reads only https
``/folder`` URLs with a SHA-256 pin (never unverified).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests
import urllib3
from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.models import (
    DatastoreId,
    DatastoreInfo,
    DiskFile,
    DiskUnit,
    FolderGrant,
    HostId,
    HostInfo,
    ScanSnapshot,
    SnapshotId,
    SnapshotRef,
    VirtualDiskInfo,
    VmId,
)
from vsphere_av.vsphere.connection import Connection, TlsTrust
from vsphere_av.vsphere.faults import is_not_authenticated, translate
from vsphere_av.vsphere.guest import _http_session
from vsphere_av.vsphere.inventory import read_host
from vsphere_av.vsphere.tasks import wait_task

log = logging.getLogger(__name__)

SNAPSHOT_DESCRIPTION = "vsphere-av disk scan: temporary, removed when the scan ends"
SNAPSHOT_TIMEOUT = 900.0        # create (quiesced: the guest flushes first) or remove+consolidate
HTTP_TIMEOUT = (15.0, 120.0)
MAX_SPARE = 15                  # spare tickets one grant carries at most (GrantedFiles)
SPARE_TTL = 60.0                # seconds a ticket fetched ahead is kept before it is dropped
MAX_AHEAD = 4                   # tickets kept ahead per file read in this process
TICKET_THREADS = 4              # background ticket fetches at once (one DatastoreFiles)
MAX_RANGE = 64 * 1024 * 1024    # one read_range call; callers read in blocks far below this
ESXI_HTTPS_PORT = 443
DISK_FILE_TYPES = ("diskDescriptor", "diskExtent")

VM_PATHS = ["name", "config.hardware.device", "layoutEx.file", "layoutEx.disk",
            "layoutEx.snapshot", "runtime.host", "snapshot"]
UP_PATHS = ["name", "parent"]

_DS_PATH = re.compile(r"^\[(?P<ds>[^\]]*)\]\s*(?P<path>.*)$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<size>\d+|\*)$")


# --- Reading disks -------------------------------------------------------------------------

def split_datastore_path(name: str) -> tuple[str, str]:
    """``"[ds] dir/f.vmdk"`` -> ``("ds", "dir/f.vmdk")``; ValueError for anything else."""
    match = _DS_PATH.match(name.strip())
    if match is None:
        raise ValueError(f"not a datastore path: {name!r}")
    return match["ds"], match["path"]


def _retrieve(conn: Connection, what: str, specs: Sequence[Any]) -> list[Any]:
    """Every ObjectContent of one RetrievePropertiesEx (all pages)."""
    pc = vmodl.query.PropertyCollector

    def fetch(content: Any) -> list[Any]:
        collector = content.propertyCollector
        out: list[Any] = []
        result = collector.RetrievePropertiesEx(list(specs), pc.RetrieveOptions())
        while result is not None:
            out.extend(result.objects)
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return out

    return conn.call(what, fetch)


def _props(obj: Any) -> dict[str, Any]:
    return {p.name: p.val for p in (obj.propSet or [])}


def _vm_filter(vm: Any) -> Any:
    """The VM with its datastores and their datacenters' paths."""
    pc = vmodl.query.PropertyCollector
    up = [pc.SelectionSpec(name="folderUp"), pc.SelectionSpec(name="dcUp")]
    traversals = [
        pc.TraversalSpec(name="vmDatastores", type=vim.VirtualMachine, path="datastore",
                         skip=False, selectSet=[pc.SelectionSpec(name="dsUp")]),
        pc.TraversalSpec(name="dsUp", type=vim.Datastore, path="parent", skip=False,
                         selectSet=up),
        pc.TraversalSpec(name="folderUp", type=vim.Folder, path="parent", skip=False,
                         selectSet=up),
        pc.TraversalSpec(name="dcUp", type=vim.Datacenter, path="parent", skip=False,
                         selectSet=up),
    ]
    objects = [pc.ObjectSpec(obj=vm, skip=False, selectSet=traversals)]
    props = [pc.PropertySpec(type=vim.VirtualMachine, pathSet=VM_PATHS),
             pc.PropertySpec(type=vim.Datastore, pathSet=UP_PATHS),
             pc.PropertySpec(type=vim.Folder, pathSet=UP_PATHS),
             pc.PropertySpec(type=vim.Datacenter, pathSet=UP_PATHS)]
    return pc.FilterSpec(objectSet=objects, propSet=props)


def _moid(ref: Any) -> str:
    return str(ref._moId) if ref is not None else ""


def _datacenter_path(start: str, up: dict[str, tuple[str, str, bool]]) -> str:
    """Inventory path of the datacenter above ``start``: folder names below the root, then
    the datacenter's name ("DC0", "EU/DC1")."""
    node, seen = start, set()
    while node and node in up and not up[node][2]:       # climb to the datacenter
        seen.add(node)
        node = up[node][1]
        if node in seen:
            return ""
    if node not in up:
        return ""
    names = [up[node][0]]
    node = up[node][1]
    while node in up and up[node][1] and node not in seen:   # the root folder has no parent
        seen.add(node)
        names.append(up[node][0])
        node = up[node][1]
    return "/".join(reversed(names))


def _backing_kind(backing: Any) -> str:
    if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
        mode = str(getattr(backing, "compatibilityMode", "") or "")
        return "rdm-physical" if mode == "physicalMode" else "rdm-virtual"
    kinds = (
        (vim.vm.device.VirtualDisk.FlatVer2BackingInfo, "flat"),
        (vim.vm.device.VirtualDisk.FlatVer1BackingInfo, "flat"),
        (vim.vm.device.VirtualDisk.SparseVer2BackingInfo, "sparse"),
        (vim.vm.device.VirtualDisk.SparseVer1BackingInfo, "sparse"),
        (vim.vm.device.VirtualDisk.SeSparseBackingInfo, "seSparse"),
    )
    for cls, kind in kinds:
        if isinstance(backing, cls):
            return kind
    return type(backing).__name__


def _guest_order(devices: Iterable[Any]) -> dict[int, tuple[int, ...]]:
    """Sort key of each VirtualDisk: the order the guest numbers its disks in (``sda``,
    ``sdb``... / disk 0, 1...): by controller bus number, then unit number. Device keys say
    nothing about it: a disk added later may get a lower key than the first one."""
    devices = list(devices)
    bus = {int(dev.key): int(dev.busNumber or 0) for dev in devices
           if isinstance(dev, vim.vm.device.VirtualController)}
    order: dict[int, tuple[int, ...]] = {}
    for dev in devices:
        if isinstance(dev, vim.vm.device.VirtualDisk):
            controller = int(dev.controllerKey or 0)
            unit = int(dev.unitNumber) if dev.unitNumber is not None else -1
            order[int(dev.key)] = (bus.get(controller, 0), controller, unit, int(dev.key))
    return order


class _DiskReader:
    """Turns one collector read (VM, datastores, folders, maybe a snapshot) into models."""

    def __init__(self, vm_id: VmId, objects: Iterable[Any]) -> None:
        self.vm_id = vm_id
        self.vm: dict[str, Any] | None = None
        datastores: dict[str, tuple[str, str]] = {}
        up: dict[str, tuple[str, str, bool]] = {}     # moref -> (name, parent, is datacenter)
        for obj in objects:
            ref, p = obj.obj, _props(obj)
            if isinstance(ref, vim.VirtualMachine):
                if obj.missingSet and not obj.propSet:
                    break
                self.vm = p
            elif isinstance(ref, vim.Datastore):
                datastores[_moid(ref)] = (str(p.get("name", "")), _moid(p.get("parent")))
            else:
                up[_moid(ref)] = (str(p.get("name", "")), _moid(p.get("parent")),
                                  isinstance(ref, vim.Datacenter))
        if self.vm is None:
            raise errors.NotFound(f"VM {vm_id} no longer exists")
        self.datastores = {
            name: DatastoreInfo(moref=DatastoreId(moref), name=name,
                                datacenter_path=_datacenter_path(parent, up))
            for moref, (name, parent) in datastores.items()}
        self.files = {int(f.key): f for f in self.vm.get("layoutEx.file") or []}
        self.units = self._units()

    def _datastore(self, name: str) -> DatastoreInfo:
        found = self.datastores.get(name)
        if found is None:       # a datastore the VM's datastore list misses: name only
            found = DatastoreInfo(moref=DatastoreId(""), name=name, datacenter_path="")
        return found

    def _file(self, name: str, type_: str, size: int) -> DiskFile:
        try:
            ds, path = split_datastore_path(name)
        except ValueError as exc:
            raise errors.VsphereError(f"VM {self.vm_id}: disk file {name!r} is not a "
                                      f"datastore path") from exc
        return DiskFile(name=name, datastore=self._datastore(ds), path=path, type=type_,
                        size=size)

    def _units(self) -> dict[str, DiskUnit]:
        """Every disk level vCenter lists (now and in snapshots), by descriptor name."""
        layouts = list(self.vm.get("layoutEx.disk") or []) if self.vm else []
        for snap in (self.vm.get("layoutEx.snapshot") or []) if self.vm else []:
            layouts.extend(snap.disk or [])
        units: dict[str, DiskUnit] = {}
        for layout in layouts:
            for unit in layout.chain or []:
                files = []
                for key in unit.fileKey or []:
                    f = self.files.get(int(key))
                    if f is not None and f.type in DISK_FILE_TYPES:
                        files.append(self._file(str(f.name), str(f.type), int(f.size or 0)))
                if files:
                    level = DiskUnit(files=tuple(files))
                    units.setdefault(level.descriptor.name, level)
        return units

    def disks(self, devices: Iterable[Any]) -> tuple[VirtualDiskInfo, ...]:
        """The VirtualDisks among ``devices``, each with its chain of files, in the order
        the guest numbers them."""
        devices = list(devices)
        assert self.vm is not None
        host = _moid(self.vm.get("runtime.host"))
        out = []
        for dev in devices:
            if not isinstance(dev, vim.vm.device.VirtualDisk):
                continue
            backing: Any = dev.backing
            chain: list[DiskUnit] = []
            level, seen = backing, set()
            while level is not None and getattr(level, "fileName", None):
                name = str(level.fileName)
                if name in seen:
                    break
                seen.add(name)
                chain.append(self.units.get(name) or DiskUnit(
                    files=(self._file(name, "diskDescriptor", -1),)))
                level = getattr(level, "parent", None)
            top = chain[0].descriptor.datastore if chain else self._datastore("")
            out.append(VirtualDiskInfo(
                vm=self.vm_id, key=int(dev.key),
                label=str(dev.deviceInfo.label if dev.deviceInfo else f"disk {dev.key}"),
                capacity=int(dev.capacityInBytes or (dev.capacityInKB or 0) * 1024),
                disk_mode=str(getattr(backing, "diskMode", "") or ""),
                backing=_backing_kind(backing), datastore=top,
                host=HostId(host) if host else None, chain=tuple(chain)))
        order = _guest_order(devices)
        return tuple(sorted(out, key=lambda d: order.get(d.key, (d.key,))))

    def frozen(self, snapshot: SnapshotId) -> tuple[VirtualDiskInfo, ...]:
        """The disks as ``snapshot`` froze them: each current chain cut at the first level
        the snapshot's file layout lists (the levels above it were made by later snapshots).

        ``layoutEx.snapshot`` says which files belong to a snapshot; the current backing
        chain says in which order. Both are read in the same collector call.
        """
        assert self.vm is not None
        layout = next((s for s in self.vm.get("layoutEx.snapshot") or []
                       if _moid(s.key) == snapshot), None)
        if layout is None:
            raise errors.SnapshotError(
                f"VM {self.vm_id}: vCenter lists no files for snapshot {snapshot}")
        members: dict[int, set[str]] = {}
        for disk_layout in layout.disk or []:
            names = members.setdefault(int(disk_layout.key), set())
            for unit in disk_layout.chain or []:
                names.update(str(self.files[int(k)].name) for k in unit.fileKey or []
                             if int(k) in self.files)
        out = []
        for disk in self.disks(self.vm.get("config.hardware.device") or []):
            names = members.get(disk.key, set())
            cut = next((i for i, unit in enumerate(disk.chain)
                        if unit.descriptor.name in names), None)
            if cut is None:
                raise errors.SnapshotError(
                    f"VM {self.vm_id}: {disk.label} is not in snapshot {snapshot}: "
                    f"its contents are not frozen")
            chain = disk.chain[cut:]          # the delta above may live elsewhere
            out.append(replace(disk, chain=chain, datastore=chain[0].descriptor.datastore))
        return tuple(out)

    def snapshots(self) -> list[SnapshotRef]:
        """Every snapshot of the VM (the whole tree)."""
        assert self.vm is not None
        info = self.vm.get("snapshot")
        return list(_walk(self.vm_id, info.rootSnapshotList if info is not None else []))


def _walk(vm_id: VmId, trees: Iterable[Any]) -> Iterable[SnapshotRef]:
    stack = list(trees or [])
    while stack:
        node = stack.pop()
        created = node.createTime
        yield SnapshotRef(
            vm=vm_id, moref=SnapshotId(_moid(node.snapshot)), name=str(node.name or ""),
            created=created.isoformat() if isinstance(created, datetime) else str(created or ""),
            description=str(node.description or ""))
        stack.extend(node.childSnapshotList or [])


def _read(conn: Connection, vm_id: VmId) -> _DiskReader:
    vm = conn.ref("VirtualMachine", vm_id)
    return _DiskReader(vm_id, _retrieve(conn, f"read disks of {vm_id}", [_vm_filter(vm)]))


def disks_of(conn: Connection, vm_id: VmId) -> tuple[VirtualDiskInfo, ...]:
    """The VM's virtual disks as it runs now, each with its chain of files (one read)."""
    reader = _read(conn, vm_id)
    assert reader.vm is not None
    return reader.disks(reader.vm.get("config.hardware.device") or [])


# --- Snapshots -----------------------------------------------------------------------------

def _snapshot_error(fault: Any, what: str) -> errors.VsphereAvError:
    """A snapshot fault as the error the scan reports (the reason in plain words)."""
    text = " ".join(str(getattr(fault, "msg", "") or "").split())
    detail = type(fault).__name__.rsplit(".", 1)[-1] + (f" ({text})" if text else "")
    if isinstance(fault, vim.fault.TaskInProgress):
        return errors.TransientError(f"{what}: the VM is busy with another task ({detail})")
    if isinstance(fault, vim.fault.SnapshotIncompatibleDeviceInVm):
        return errors.SnapshotError(
            f"{what}: the VM has a device snapshots cannot cover, such as an independent "
            f"disk or a physical-mode RDM ({detail})")
    if isinstance(fault, vim.fault.ApplicationQuiesceFault):
        return errors.SnapshotError(f"{what}: the guest could not be quiesced ({detail})")
    if isinstance(fault, vim.fault.SnapshotFault | vim.fault.FileFault
                  | vmodl.fault.NotSupported | vim.fault.InvalidState):
        return errors.SnapshotError(f"{what}: {detail}")
    return translate(fault, what=what)


def _unsnapshottable(disks: Iterable[VirtualDiskInfo]) -> list[str]:
    reasons = []
    for disk in disks:
        if disk.independent:
            reasons.append(f"{disk.label} is {disk.disk_mode}")
        elif disk.backing == "rdm-physical":
            reasons.append(f"{disk.label} is a physical-mode RDM")
    return reasons


def create_scan_snapshot(conn: Connection, vm_id: VmId, *, name: str,
                         quiesce: bool = False) -> ScanSnapshot:
    """Snapshot the VM (no memory) and return it with the disks to read under it.

    The disks are the chains as the snapshot froze them: the files the VM had before the
    snapshot, which it no longer writes (it writes to the new deltas above them). A VM
    with an independent disk or a physical-mode RDM is refused before anything is created
    (a snapshot would not freeze that disk).
    """
    what = f"snapshot {vm_id} for scanning"
    refused = _unsnapshottable(disks_of(conn, vm_id))
    if refused:
        raise errors.SnapshotError(
            f"{what}: {'; '.join(refused)}: snapshots leave such disks out, so their "
            f"contents cannot be frozen for a scan")
    ref = conn.ref("VirtualMachine", vm_id)

    def start(_content: Any) -> Any:
        try:
            return ref.CreateSnapshot_Task(name=name, description=SNAPSHOT_DESCRIPTION,
                                           memory=False, quiesce=quiesce)
        except vmodl.MethodFault as exc:
            if is_not_authenticated(exc):
                raise           # Connection.call logs in again and retries
            raise _snapshot_error(exc, what) from exc

    task = conn.call(what, start)
    snapshot = SnapshotId(_moid(wait_task(conn, task, what, timeout=SNAPSHOT_TIMEOUT,
                                          fault_error=_snapshot_error)))
    try:
        reader = _read(conn, vm_id)
        refs = [s for s in reader.snapshots() if s.moref == snapshot]
        if not refs:
            raise errors.NotFound(f"{what}: snapshot {snapshot} vanished")
        return ScanSnapshot(snapshot=refs[0], disks=reader.frozen(snapshot))
    except errors.VsphereAvError:
        # Do not leave it for the next start to find if it can go now.
        try:
            remove_snapshot(conn, SnapshotRef(vm=vm_id, moref=snapshot, name=name))
        except errors.VsphereAvError as exc:
            log.warning("%s: snapshot %s left behind: %s", what, snapshot, exc)
        raise


def remove_snapshot(conn: Connection, ref: SnapshotRef) -> bool:
    """Remove one snapshot (children kept, disks consolidated); False when it was gone."""
    what = f"remove snapshot {ref.name!r} ({ref.moref}) of {ref.vm}"
    snap = conn.ref("VirtualMachineSnapshot", ref.moref)
    try:
        task = conn.call(what, lambda _c: snap.RemoveSnapshot_Task(removeChildren=False,
                                                                    consolidate=True))
        wait_task(conn, task, what, timeout=SNAPSHOT_TIMEOUT)
    except errors.NotFound:
        return False
    return True


def find_scan_snapshots(conn: Connection, vm_id: VmId | None, *,
                        prefix: str) -> tuple[SnapshotRef, ...]:
    """Snapshots whose name starts with ``prefix``, of one VM or (``None``) of every VM."""
    if not prefix.strip():
        raise ValueError("a snapshot name prefix is needed (an empty one matches every snapshot)")
    found = _read(conn, vm_id).snapshots() if vm_id is not None else _all_snapshots(conn)
    return tuple(sorted((s for s in found if s.name.startswith(prefix)),
                        key=lambda s: (s.vm, s.created, s.moref)))


def _all_snapshots(conn: Connection) -> list[SnapshotRef]:
    """Every snapshot of every VM, through a container view destroyed afterwards."""
    pc = vmodl.query.PropertyCollector

    def fetch(content: Any) -> list[SnapshotRef]:
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[pc.TraversalSpec(
                    name="view", type=vim.view.ContainerView, path="view", skip=False)])],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=["snapshot"])])
            collector = content.propertyCollector
            found: list[SnapshotRef] = []
            result = collector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
            while result is not None:
                for obj in result.objects:
                    snap = _props(obj).get("snapshot")
                    if snap is not None:
                        found.extend(_walk(VmId(_moid(obj.obj)), snap.rootSnapshotList or []))
                if not result.token:
                    break
                result = collector.ContinueRetrievePropertiesEx(result.token)
            return found
        finally:
            view.DestroyView()

    return conn.call("read snapshots of every VM", fetch)


# --- Datastore files on a host ------------------------------------------------------------

def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/n`` -> (a, b, n); ``bytes */n`` -> (None, None, n); unknown parts None."""
    match = _CONTENT_RANGE.match(value.strip())
    if match is None:
        return None, None, None
    size = match["size"]
    return (int(match["start"]) if match["start"] else None,
            int(match["end"]) if match["end"] else None,
            int(size) if size != "*" else None)


def folder_url(address: str, port: int, datastore: DatastoreInfo, path: str) -> str:
    """``https://<address>[:port]/folder/<path>?dcPath=<dc>&dsName=<ds>``.

    dcPath is the vCenter datacenter path; ESXi itself knows only ``ha-datacenter`` (its
    default when dcPath is left out; govmomi drops dcPath for host URLs). The simulator
    needs it: check this against a real host before relying on it.
    """
    host = f"[{address}]" if ":" in address else address
    netloc = host if port == ESXI_HTTPS_PORT else f"{host}:{port}"
    query = urlencode({"dcPath": datastore.datacenter_path, "dsName": datastore.name},
                      quote_via=quote)
    return f"https://{netloc}/folder/{quote(path.lstrip('/'), safe='/')}?{query}"


@dataclass(frozen=True)
class ReadStatistics:
    """What a DatastoreFiles has done: host sessions open, connections made, requests sent,
    service tickets acquired, of those the ones a request took and the ones dropped unused
    (fetched ahead of a read that never came: at most ``MAX_AHEAD`` a file; one still
    coming is counted when it lands). Connections far below requests: keep-alive works."""

    hosts: int
    connections: int
    requests: int
    tickets: int
    tickets_used: int = 0
    tickets_unused: int = 0


class _HostSession:
    """The keep-alive session to one host, and what we learnt about its tickets."""

    def __init__(self, host: HostInfo, session: requests.Session, verify: bool | str) -> None:
        self.host = host
        self.session = session
        self.verify = verify
        self.single_use_tickets = False


def _close_sessions(lock: threading.Lock, sessions: MutableMapping[Any, _HostSession]) -> None:
    """Empty ``sessions`` under ``lock`` and close each host session outside it."""
    with lock:
        closing = list(sessions.values())
        sessions.clear()
    for s in closing:
        s.session.close()


class _Fetcher:
    """Background threads for ticket fetches (at most ``TICKET_THREADS`` at once), started
    on first use; :meth:`close` cancels what has not started, waits for what has and
    leaves no thread behind."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def _running(self) -> ThreadPoolExecutor | None:
        """With the lock held: the threads, started on first use; None once closed."""
        if self._closed:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=TICKET_THREADS,
                                            thread_name_prefix=self._name)
        return self._pool

    def submit(self, job: Callable[[], list[str]],
               done: Callable[[Future[list[str]]], None]) -> bool:
        """Run ``job`` in the background, then ``done`` with its future (also when it is
        cancelled by close); False, and nothing run, once closed."""
        with self._lock:
            pool = self._running()
            if pool is None:
                return False
            future = pool.submit(job)
        future.add_done_callback(done)
        return True

    def all(self, fetch: Callable[[], str], n: int) -> list[str]:
        """``n`` results of ``fetch``, run side by side (in the caller when n is 1 or after
        close); the first error is raised once all have ended."""
        if n == 1:
            return [fetch()]
        with self._lock:
            pool = self._running()
            futures = [pool.submit(fetch) for _ in range(n)] if pool is not None else []
        if pool is None:
            return [fetch() for _ in range(n)]
        wait(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        with self._lock:
            self._closed, pool, self._pool = True, self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class _TicketStock:
    """Fresh service tickets for one file's URL, for the :class:`DatastoreFile` reading it;
    the one mechanism of both readers (this process's and the appliance's).

    ``take(ahead=False)`` (a host that lets a ticket be used again: one ticket a file) hands
    out one in stock or fetches one. ``take(ahead=True)`` (a host that takes each ticket
    once: one a read) also keeps tickets coming in the background (``fetcher``) while the
    reader uses this one, so the read does not wait for vCenter's round trip: when the
    stock is half gone it is filled up to a depth that grows with use (the tickets taken so
    far, at most ``most``), so a short file wastes little. Tickets older than ``SPARE_TTL``
    are dropped unused, as are those in stock at close and fetches that end after it;
    nothing is fetched but from ``take``, so a file no longer read costs nothing more.

    ``fetch(n)`` returns up to ``n`` tickets (at least one) in one round trip: ``per_call``
    is 1 for vCenter (one SOAP call a ticket, several in flight), more for a grant from
    the controller. ``counted(used, unused)`` counts tickets handed out and dropped unused.
    Tickets are never logged.
    """

    def __init__(self, *, url: str, fetch: Callable[[int], list[str]], per_call: int,
                 most: int, fetcher: _Fetcher, counted: Callable[[int, int], None] | None = None,
                 first: Sequence[str] = ()) -> None:
        self.url = url
        self._fetch = fetch
        self._per_call = per_call
        self._most = most
        self._fetcher = fetcher
        self._counted = counted
        self._cond = threading.Condition()
        now = time.monotonic()
        self._stock: deque[tuple[float, str]] = deque((now, t) for t in first)
        self._coming = 0
        self._taken = 0
        self._closed = False

    def _want(self) -> int:
        return min(self._most, max(1, self._taken))

    def take(self, *, ahead: bool) -> str:
        """A ticket for the next request (see the class)."""
        stale = 0
        with self._cond:
            while True:
                now = time.monotonic()
                while self._stock and now - self._stock[0][0] >= SPARE_TTL:
                    self._stock.popleft()
                    stale += 1
                if self._stock or not (ahead and self._coming):
                    break
                self._cond.wait()       # one is on its way: sooner than a fetch of our own
            ticket = self._stock.popleft()[1] if self._stock else ""
            self._taken += 1
            if ahead:
                self._refill()
        self._drop(stale)
        if not ticket:
            got = self._fetch(min(self._per_call, self._want()) if ahead else 1)
            if not got:
                raise errors.VsphereError("no service ticket came with the grant")
            self._keep(got[1:])
            ticket = got[0]
        if self._counted is not None:
            self._counted(1, 0)
        return ticket

    def _refill(self) -> None:
        """With the lock held: fetch in the background up to the depth, when half gone."""
        want = self._want()
        have = len(self._stock) + self._coming
        if self._closed or have > want // 2:
            return
        need = want - have
        while need > 0:
            n = min(need, self._per_call)
            self._coming += n
            if not self._fetcher.submit(partial(self._fetch, n), partial(self._landed, n=n)):
                self._coming -= n
                return
            need -= n

    def _landed(self, future: Future[list[str]], n: int) -> None:
        got: list[str] = []
        if not future.cancelled():
            failed = future.exception()
            if failed is None:
                got = future.result()
            else:   # the reader's own fetch reports it, when it needs one
                log.debug("fetching a ticket ahead for %s failed: %s",
                          self.url.split("?", 1)[0], failed)
        self._keep(got, landed=n)

    def _keep(self, tickets: Sequence[str], *, landed: int = 0) -> None:
        """Stock fetched tickets (``landed``: how many of those counted as coming this
        fetch was for); once closed they are dropped unused."""
        with self._cond:
            self._coming -= landed
            closed = self._closed
            if not closed:
                now = time.monotonic()
                self._stock.extend((now, t) for t in tickets)
            self._cond.notify_all()
        if closed:
            self._drop(len(tickets))

    def _drop(self, n: int) -> None:
        if n and self._counted is not None:
            self._counted(0, n)

    def close(self) -> None:
        """Drop the stock; what is still coming is dropped when it lands."""
        with self._cond:
            self._closed = True
            n = len(self._stock)
            self._stock.clear()
            self._cond.notify_all()
        self._drop(n)


class DatastoreFiles:
    """Range reads of datastore files on ESXi hosts, for one vCenter session (thread-safe)."""

    def __init__(self, *, connection: Connection, host_port: int | None = None,
                 pool_size: int = 4, max_hosts: int = 32) -> None:
        self._conn = connection
        self._host_port = host_port
        self._pool_size = pool_size
        self._max_hosts = max_hosts
        self._sessions: OrderedDict[tuple[str, str, str, bool], _HostSession] = OrderedDict()
        self._lock = threading.Lock()
        self._tickets = 0
        self._used = self._unused = 0
        self._granting: dict[HostId, HostInfo] = {}     # hosts read once for grant()
        self._fetcher = _Fetcher("datastore-tickets")

    def __repr__(self) -> str:
        return f"DatastoreFiles(hosts={len(self._sessions)}, pool_size={self._pool_size})"

    def statistics(self) -> ReadStatistics:
        """Counts over the open host sessions (and every ticket so far)."""
        with self._lock:
            links = list(self._sessions.values())
            tickets, used, unused = self._tickets, self._used, self._unused
        connections = requests_sent = 0
        for link in links:
            for adapter in link.session.adapters.values():
                pools: Any = getattr(getattr(adapter, "poolmanager", None), "pools", None)
                for key in list(pools.keys()) if pools is not None else []:
                    pool = pools.get(key)
                    connections += getattr(pool, "num_connections", 0)
                    requests_sent += getattr(pool, "num_requests", 0)
        return ReadStatistics(hosts=len(links), connections=connections,
                              requests=requests_sent, tickets=tickets, tickets_used=used,
                              tickets_unused=unused)

    def port_for(self, host: HostInfo) -> int:
        """The host's HTTPS port: 443 (ESXi's reverse proxy), unless given.

        The bundled simulator is vCenter and every host at one address and port: a host
        whose address is vCenter's own is reached on vCenter's port.
        """
        if self._host_port is not None:
            return self._host_port
        return self._conn.port if host.address == self._conn.server else ESXI_HTTPS_PORT

    def _session(self, host: HostInfo) -> _HostSession:
        trust = self._conn.trust
        key = (host.address, host.certificate_sha256, trust.thumbprint or trust.ca_file,
               trust.insecure)
        with self._lock:
            found = self._sessions.get(key)
            if found is not None:
                self._sessions.move_to_end(key)
                return found
            session, verify = _http_session(host, trust, keep_alive=True,
                                            pool_maxsize=self._pool_size)
            found = self._sessions[key] = _HostSession(host, session, verify)
            while len(self._sessions) > self._max_hosts:
                _, old = self._sessions.popitem(last=False)
                old.session.close()
            return found

    def ticket(self, url: str) -> str:
        """A generic service ticket for ``GET url`` (vCenter checks the privileges)."""
        spec = vim.SessionManager.HttpServiceRequestSpec(method="httpGet", url=url)
        with self._lock:
            self._tickets += 1
        ticket = self._conn.call(
            f"acquire a service ticket for {url.split('?', 1)[0]}",
            lambda c: c.sessionManager.AcquireGenericServiceTicket(spec=spec))
        return str(ticket.id)

    def grant(self, host_id: HostId, datastore: DatastoreInfo, path: str, *,
              tickets: int = 1) -> FolderGrant:
        """Leave for another process (the host's appliance) to read ``[datastore] path``.

        ``tickets`` fresh service tickets (the first, then ``spare``; at most
        ``MAX_SPARE`` spares) for the file's ``/folder`` URL on the host and the host
        certificate's SHA-256 to pin (vCenter's pinned thumbprint when vCenter reports none
        for the host, as for guest transfers); no pin at all -> TlsVerificationError: the
        reader would have nothing to verify the host with.
        """
        with self._lock:
            host = self._granting.get(host_id)
        if host is None:
            host = read_host(self._conn, host_id)
            with self._lock:
                self._granting[host_id] = host
        if not host.address:
            raise errors.VsphereError(f"host {host.name} reports no management address")
        pin = host.certificate_sha256 or self._conn.trust.thumbprint
        if not pin:
            raise errors.TlsVerificationError(
                f"host {host.name}: no certificate thumbprint to pin, so its datastore files "
                "cannot be read by its appliance")
        url = folder_url(host.address, self.port_for(host), datastore, path)
        # The tickets at once (TICKET_THREADS SOAP calls in flight), not one after another:
        # the appliance's read waits for this answer.
        issued = self._fetcher.all(lambda: self.ticket(url),
                                   max(1, min(tickets, MAX_SPARE + 1)))
        return FolderGrant(url=url, ticket=issued[0], thumbprint=pin, spare=tuple(issued[1:]))

    def _count(self, used: int, unused: int) -> None:
        with self._lock:
            self._used += used
            self._unused += unused

    def open(self, host_id: HostId, datastore: DatastoreInfo, path: str) -> DatastoreFile:
        """Open ``[datastore] path`` for range reads on that host; its size is known after."""
        host = read_host(self._conn, host_id)
        if not host.address:
            raise errors.VsphereError(f"host {host.name} reports no management address")
        url = folder_url(host.address, self.port_for(host), datastore, path)
        stock = _TicketStock(url=url, fetch=lambda n: [self.ticket(url)], per_call=1,
                             most=MAX_AHEAD, fetcher=self._fetcher, counted=self._count)
        return _probed(DatastoreFile(tickets=stock, link=self._session(host), url=url,
                                     name=f"[{datastore.name}] {path}"))

    def close(self) -> None:
        """Stop fetching tickets ahead and close every host session (open files cannot read
        afterwards)."""
        self._fetcher.close()
        _close_sessions(self._lock, self._sessions)

    def __enter__(self) -> DatastoreFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DatastoreFile:
    """One datastore file on one host: :meth:`read_range` reads exactly the bytes asked for."""

    size: int = -1

    def __init__(self, *, tickets: _TicketStock, link: _HostSession, url: str,
                 name: str) -> None:
        self._tickets = tickets
        self._link = link
        self.url = url
        self.name = name
        self._ticket = ""
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DatastoreFile({self.name!r}, host={self._link.host.name!r}, size={self.size})"

    @property
    def _what(self) -> str:
        return f"read {self.name} on host {self._link.host.name}"

    def _get(self, start: int, end: int) -> requests.Response:
        """GET one byte range with a service ticket; one fresh ticket on 401/403."""
        for attempt in (1, 2):
            with self._lock:
                ticket, reused = self._ticket, bool(self._ticket)
            if not ticket or self._link.single_use_tickets:
                ticket = self._tickets.take(ahead=self._link.single_use_tickets)
                reused = False
            try:
                response = self._link.session.get(
                    self.url, stream=True, allow_redirects=False, verify=self._link.verify,
                    timeout=HTTP_TIMEOUT,
                    headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity",
                             "Cookie": f"vmware_cgi_ticket={ticket}"})
            except requests.exceptions.SSLError as exc:
                raise self._tls_error(exc) from exc
            except requests.exceptions.RequestException as exc:
                raise translate(exc, what=self._what) from exc
            if response.status_code in (401, 403):
                response.close()
                with self._lock:
                    self._ticket = ""
                if reused:
                    # A ticket that worked before was refused: this host takes each once.
                    self._link.single_use_tickets = True
                if attempt == 1:
                    continue
                raise errors.PermissionDenied(
                    f"{self._what}: the host refused the service ticket (HTTP "
                    f"{response.status_code}): the vCenter account needs Datastore.Browse and "
                    f"Datastore.FileManagement on this datastore")
            with self._lock:
                self._ticket = ticket
            return response
        raise AssertionError("unreachable")

    def _tls_error(self, exc: requests.exceptions.SSLError) -> errors.VsphereAvError:
        if "fingerprint" in str(exc).lower():
            host = self._link.host
            return errors.TlsVerificationError(
                f"{self._what}: the certificate of {host.address} does not match the pinned "
                f"thumbprint")
        return translate(exc, what=self._what)

    def _check(self, response: requests.Response) -> None:
        """Raise the error for anything but 206 (and 416, handled by the caller)."""
        status = response.status_code
        if status in (206, 416):
            return
        response.close()
        if status == 404:
            raise errors.NotFound(f"{self._what}: no such file on the datastore (HTTP 404)")
        if status == 200:
            raise errors.VsphereError(
                f"{self._what}: the host ignored the Range header (HTTP 200)")
        if status >= 500:
            raise errors.TransientError(f"{self._what}: HTTP {status}")
        raise errors.VsphereError(f"{self._what}: HTTP {status}")

    def probe_size(self) -> int:
        """The file's size, from the answer to a one-byte range (``bytes 0-0/SIZE``)."""
        response = self._get(0, 0)
        try:
            self._check(response)
            start, _, size = _content_range(response.headers.get("Content-Range", ""))
            if size is None or (response.status_code == 206 and start != 0):
                raise errors.VsphereError(
                    f"{self._what}: unusable Content-Range "
                    f"{response.headers.get('Content-Range', '')!r}")
            response.content  # noqa: B018 -- drain the byte so the connection is reused
            return size
        finally:
            response.close()

    def read_range(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the end of the file)."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative range {offset}+{length}")
        if length > MAX_RANGE:
            raise ValueError(f"range of {length} bytes is larger than {MAX_RANGE}")
        end = min(offset + length, self.size) - 1
        if length == 0 or offset >= self.size:
            return b""
        response = self._get(offset, end)
        try:
            self._check(response)
            if response.status_code == 416:
                raise errors.TransientError(
                    f"{self._what}: bytes {offset}-{end} are past the end: the file shrank")
            start, stop, _ = _content_range(response.headers.get("Content-Range", ""))
            if start != offset or stop != end:
                raise errors.VsphereError(
                    f"{self._what}: asked for bytes {offset}-{end}, got Content-Range "
                    f"{response.headers.get('Content-Range', '')!r}")
            try:
                # One read of the whole range: requests' .content goes in 10 KiB pieces.
                data = response.raw.read(end - offset + 1, decode_content=False)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise errors.TransientError(f"{self._what}: read broke off: {exc}") from exc
        finally:
            response.close()
        if len(data) != end - offset + 1:
            raise errors.TransientError(
                f"{self._what}: got {len(data)} of {end - offset + 1} bytes at {offset}")
        return data

    def close(self) -> None:
        """Forget the ticket and drop those fetched ahead (the host session stays open for
        other files)."""
        with self._lock:
            self._ticket = ""
        self._tickets.close()

    def __enter__(self) -> DatastoreFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _probed(handle: DatastoreFile) -> DatastoreFile:
    """``handle`` with its size known; closed (its tickets dropped) when the probe fails."""
    try:
        handle.size = handle.probe_size()
    except BaseException:
        handle.close()
        raise
    return handle


# --- Datastore files granted by the controller (the appliance's side) -----------------------

def check_grant(grant: FolderGrant) -> HostInfo:
    """The host a grant sends us to; VsphereError / TlsVerificationError for a grant that is
    not an https ``/folder`` URL without credentials, with a SHA-256 pin."""
    parts = urlsplit(grant.url)
    if parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise errors.VsphereError("a granted datastore URL must be https, name a host and "
                                  "carry no credentials")
    if not parts.path.startswith("/folder/"):
        raise errors.VsphereError("a granted datastore URL must be a /folder URL")
    pin = grant.thumbprint.replace(":", "").lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise errors.TlsVerificationError("a granted datastore URL needs the SHA-256 of the "
                                          "host certificate to pin")
    return HostInfo(moref=HostId(""), name=parts.hostname, address=parts.hostname,
                    certificate_sha256=grant.thumbprint)


class GrantedFiles:
    """Range reads of datastore files on leave from someone else (``DatastoreReader``).

    Used by the host's appliance (``scan.sources.disk_service``): ``grant(datastore, path,
    tickets=N)`` asks the controller for a ``FolderGrant`` (URL, service tickets, host pin);
    every read is then :class:`DatastoreFile`'s, with the same ticket reuse, single-use
    detection, errors and the host certificate pinned to the granted thumbprint (never
    unverified). Holds no vCenter connection.
    """

    def __init__(self, *, grant: Callable[..., FolderGrant], pool_size: int = 4) -> None:
        self._grant = grant
        self._pool_size = pool_size
        self._sessions: dict[tuple[str, str], _HostSession] = {}
        self._lock = threading.Lock()
        self._fetcher = _Fetcher("granted-tickets")

    def open(self, host_id: HostId, datastore: DatastoreInfo, path: str) -> DatastoreFile:
        """Open ``[datastore] path`` (on the host the controller names in the grant)."""
        first = self._grant(datastore, path, tickets=1)
        host = check_grant(first)
        key = (first.url.split("/folder/", 1)[0], host.certificate_sha256)
        with self._lock:
            link = self._sessions.get(key)
            if link is None:
                session, verify = _http_session(host, TlsTrust(), keep_alive=True,
                                                pool_maxsize=self._pool_size)
                link = self._sessions[key] = _HostSession(host, session, verify)
        def fetch(n: int) -> list[str]:
            grant = self._grant(datastore, path, tickets=n)
            if grant.url != first.url:
                raise errors.VsphereError("a service ticket was granted for another file")
            return [grant.ticket, *grant.spare]

        stock = _TicketStock(url=first.url, fetch=fetch, per_call=MAX_SPARE + 1,
                             most=MAX_SPARE + 1, fetcher=self._fetcher,
                             first=[first.ticket, *first.spare])
        return _probed(DatastoreFile(tickets=stock, link=link, url=first.url,
                                     name=f"[{datastore.name}] {path}"))

    def close(self) -> None:
        """Stop fetching grants ahead and close the host sessions."""
        self._fetcher.close()
        _close_sessions(self._lock, self._sessions)
