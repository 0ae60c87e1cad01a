"""The disk path of one VM's scan: its virtual disks read as the guest's files.

Called by ``app.App.scan_one`` (``via="disk"``), which hands :class:`DiskGuest` to
``scanning.scan_vm`` in place of the Guest Operations source, so filters, archives, the
verdict cache, remediation and the incomplete/skipped accounting are the scan job's own.
Calls ``scan.sources.disk`` (VMDK chains, volumes, file systems: Dissect) and
``scan.sources.rangefile`` (a block cache over each datastore file); the datastore files
come from a ``DatastoreReader`` (``vsphere.disks.DatastoreFiles``), given as a collaborator.
No vSphere call is made here: snapshots are the caller's (``app.App``).

What is read: each disk's chain as given (``VirtualDiskInfo.chain``, the level the guest
sees first), through HTTP range reads of the files on the VM's host; only the blocks the
file systems and the scanned files need, cached per extent, never a copy on disk. Nothing
is ever written to a disk.

What cannot be read is reported through the walk's ``on_error`` (the scan job makes each an
``incomplete`` path, so the VM is never "protected" past it) and the rest is still scanned:
a disk whose chain is corrupt, truncated or not on a datastore the host can read (one path
per disk, ``[ds] vm/disk.vmdk``); a volume with a problem: encrypted (LUKS, BitLocker),
unknown or damaged file system (one path per volume, where it would be mounted or
``<disk label> <volume>``). A walk that finds no volume for its root at all raises
``errors.DiskError`` (the scan ends ``incomplete`` with that reason). What the transport
raises otherwise passes through: vCenter or the host unreachable is
``errors.ConnectionLost``, which the scan job treats as an outage (failed, the VM
unprotected, retried by the controller) even when it breaks a file's read off. A disk file
that opened but then fails to read (HTTP 5xx, 404, a read cut short) is made
``ConnectionLost`` too: it is the datastore's trouble, never one guest file's.
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, ClassVar, Protocol, cast

from vsphere_av import errors
from vsphere_av.models import DatastoreInfo, GuestFile, HostId, VirtualDiskInfo, VmInfo
from vsphere_av.scan.sources.diskimage import (
    DiskFile,
    DiskFiles,
    DiskLimits,
    FileStream,
    VirtualDisk,
    Volume,
    open_virtual_disk,
)
from vsphere_av.scan.sources.guest import DEFERRED
from vsphere_av.scan.sources.rangefile import RangeFile

# Index rows of disk scans live under "<VM moref>@disk", never a moref: guest-path rows
# (under the moref itself) and disk rows cannot meet.
INDEX_OWNER_SUFFIX = "@disk"
# Walked files kept for open_download: the files a scan has been told of but not yet read,
# at most one walk page of the appliance service plus the job's files ahead (disk_service
# WALK_PAGE + job.BATCH_AHEAD), with room to spare.
RECENT_FILES = 2048


class RangeReadable(Protocol):
    """One datastore file open for range reads (``vsphere.disks.DatastoreFile``)."""

    size: int

    def read_range(self, offset: int, length: int) -> bytes: ...
    def close(self) -> None: ...


class DatastoreReader(Protocol):
    """Opens datastore files on a host (``vsphere.disks.DatastoreFiles``)."""

    def open(self, host_id: HostId, datastore: DatastoreInfo, path: str) -> RangeReadable: ...


class DiskGuest:
    """A VM's files on its virtual disks, in the shape of ``scanning.GuestAccess``.

    ``remediation``: the guest access that quarantines or deletes (a running VM with guest
    credentials and tools), or None: a detection then waits (``remediation_pending``) for
    the VM's next guest scan, at its power-on.
    """

    local_downloads: ClassVar[bool] = True     # the bytes come through this process
    reads_disks: ClassVar[bool] = True         # the VM may be off: its disks are read

    def __init__(self, *, vm: VmInfo, disks: Sequence[VirtualDiskInfo],
                 files: DatastoreReader, remediation: Any = None,
                 remediation_pending: str = DEFERRED,
                 limits: DiskLimits | None = None) -> None:
        self.vm = vm
        self.windows = vm.is_windows
        self.disks = tuple(disks)
        self.remediation = remediation
        self.remediation_pending = remediation_pending
        self._files = files
        self._limits = limits or DiskLimits()
        self._mounted: DiskFiles | None = None
        self._extents: list[RangeFile] = []
        self._handles: list[RangeReadable] = []
        self._recent: collections.OrderedDict[str, DiskFile] = collections.OrderedDict()
        self._lock = threading.Lock()
        # which VirtualDiskInfo each DiskFiles disk index is (disks that failed are left out)
        self._opened: list[VirtualDiskInfo] = []
        self._tried = False
        self._problems = 0          # disks and volumes reported unreadable

    def __repr__(self) -> str:
        return f"<DiskGuest {self.vm.name} disks={[d.file_name for d in self.disks]}>"

    # --- reading ----------------------------------------------------------------------------

    def bytes_read(self) -> int:
        """Bytes fetched from the datastores so far (whole blocks, every extent)."""
        return sum(f.statistics().bytes_fetched for f in self._extents)

    def _opener(self, disk: VirtualDiskInfo) -> Callable[[str], BinaryIO]:
        """Names the descriptors give (relative to the top descriptor) -> range files."""
        top = disk.chain[0].descriptor
        known = {f.path: f for unit in disk.chain for f in unit.files}
        host = disk.host or (self.vm.host.moref if self.vm.host else None)
        if host is None:
            raise errors.DiskError(f"{disk.label}: the VM is on no host: its datastore files "
                                   "cannot be read")

        def open_file(name: str) -> BinaryIO:
            listed = known.get(name)
            datastore = listed.datastore if listed is not None else top.datastore
            handle = self._files.open(host, datastore, name)
            self._handles.append(handle)
            shown = f"[{datastore.name}] {name}"

            def read_range(offset: int, length: int) -> bytes:
                try:
                    return handle.read_range(offset, length)
                except errors.ConnectionLost:
                    raise
                except (errors.TransientError, errors.NotFound) as exc:
                    # A file the host served a moment ago fails or is gone: the datastore
                    # (or the VM's disk layout) changed under the scan, not one guest file.
                    # The whole scan fails as an outage, to be run again.
                    raise errors.ConnectionLost(
                        f"{shown}: the host stopped serving it mid-scan: {exc}") from exc

            extent = RangeFile(read_range, handle.size, name=shown)
            self._extents.append(extent)
            return cast(BinaryIO, extent)

        return open_file

    def _open_disks(self, on_error: Callable[[str, errors.VsphereAvError], None]
                    ) -> list[VirtualDisk]:
        opened: list[VirtualDisk] = []
        for disk in self.disks:
            if not disk.chain:
                on_error(disk.label, errors.DiskImageError(f"{disk.label}: no disk file"))
                continue
            name = disk.chain[0].descriptor.name
            try:
                opened.append(open_virtual_disk(disk.chain[0].descriptor.path,
                                                open_file=self._opener(disk),
                                                limits=self._limits))
                self._opened.append(disk)
            except errors.DiskError as exc:
                on_error(name, exc)
            except (errors.NotFound, errors.PermissionDenied) as exc:
                # A datastore this host cannot read (or may not): that disk is unreadable.
                on_error(name, errors.DiskImageError(f"{name}: cannot be read: {exc}"))
        return opened

    def _volume_path(self, volume: Volume) -> str:
        if volume.mount:
            return volume.mount + "\\" if self.windows and volume.mount.endswith(":") \
                else volume.mount
        label = self._opened[volume.disk].label if volume.disk < len(self._opened) else "disk"
        return f"{label} {volume.name}"

    def walk(self, roots: Sequence[str], *, prune: Callable[[str], bool],
             on_error: Callable[[str, errors.VsphereAvError], None]) -> Iterator[GuestFile]:
        """Every regular file under ``roots`` on the VM's disks (disks mounted on first use)."""
        def report(path: str, exc: errors.VsphereAvError) -> None:
            self._problems += 1
            on_error(path, exc)

        if self._mounted is None:
            if self._tried:
                return              # a second walk (resuming) of disks that did not open
            self._tried = True
            opened = self._open_disks(report)
            if not opened:
                return
            try:
                self._mounted = DiskFiles.mount(opened, windows=self.windows,
                                                limits=self._limits)
            except errors.DiskImageError as exc:
                report(", ".join(d.file_name for d in self._opened), exc)
                return
            # Once per scan, even when the walk runs twice (a resume point not met).
            for volume in self._mounted.problems:
                report(self._volume_path(volume), errors.DiskFileError(
                    f"{volume.kind} {volume.name}: {volume.problem}"))
        mounted = self._mounted
        roots = self._whole_machine(roots, mounted)
        missing: list[str] = []

        def walk_error(path: str, exc: errors.DiskError) -> None:
            if path in roots:
                missing.append(str(exc))   # explained by the problems above, or raised below
            else:
                on_error(path, exc)

        try:
            for entry in mounted.walk(roots, prune=prune, on_error=walk_error):
                with self._lock:
                    self._recent[entry.path] = entry
                    while len(self._recent) > RECENT_FILES:
                        self._recent.popitem(last=False)
                yield entry
        except errors.DiskImageError as exc:
            report(", ".join(d.file_name for d in self._opened), exc)
        if missing and not self._problems:
            found = "; ".join(f"{v.name} {v.filesystem or 'no file system'}"
                              + (f" on {v.mount}" if v.mount else "") for v in mounted.volumes)
            raise errors.DiskError(f"{'; '.join(missing)} (volumes: {found or 'none'})")

    def _whole_machine(self, roots: Sequence[str], mounted: DiskFiles) -> Sequence[str]:
        """On Windows the system drive's root ``C:\\`` stands for every drive, as ``/`` does
        on Linux (where each other volume is mounted below it): the root of each other
        drive on the VM's disks is walked too, so a default scan reads a data disk (D:), and
        so is the EFI system partition, which Windows gives no letter
        (``[unmounted]\\diskN-pN``: a bootkit's place; a Linux guest's is under ``/``, at
        ``/boot/efi`` or ``/[unmounted]/...``)."""
        if not self.windows or not any(r.rstrip("\\/").lower() == "c:" for r in roots):
            return roots
        named = {r.rstrip("\\/").lower() for r in roots}
        drives = [v.mount + "\\" for v in mounted.volumes if v.readable
                  and re.fullmatch(r"[A-Za-z]:", v.mount) and v.mount.lower() not in named]
        esps = [self._volume_path(v) for v in mounted.volumes if v.esp and v.readable
                and v.mount and v.mount.lower() not in named]
        return [*roots, *drives, *esps]

    def open_download(self, path: str) -> _Download:
        """A stream over one walked file (``size``, ``chunks()``, ``close()``)."""
        with self._lock:
            entry = self._recent.get(path)
        if entry is None or self._mounted is None:
            raise errors.DiskFileError(f"{path}: not met by the walk")
        return _Download(self._mounted.open(entry))

    def delete_file(self, path: str) -> None:
        """Never: a disk scan does not write to a disk (remediation goes through the guest)."""
        raise errors.DiskError(f"{path}: a disk scan never changes a disk")

    def index_key(self, entry: GuestFile) -> tuple[str, str, str]:
        """(owner, key, mtime) of the file's incremental index row: per disk, volume and
        file id (the guest path too, so a rename reads again), mtime in nanoseconds."""
        if not isinstance(entry, DiskFile):
            raise TypeError(f"not a disk file: {entry!r}")
        disk = self._opened[self._volume(entry).disk]
        stream = f":{entry.stream}" if entry.stream else ""
        key = f"{disk.key}/{self._volume(entry).name}/{entry.file_id}{stream} {entry.path}"
        return f"{self.vm.moref}{INDEX_OWNER_SUFFIX}", key, str(entry.mtime_ns)

    def _volume(self, entry: DiskFile) -> Volume:
        assert self._mounted is not None
        return self._mounted.volumes[entry.volume]

    def close(self) -> None:
        """Close the disks and forget the datastore files' tickets."""
        if self._mounted is not None:
            self._mounted.close()
        for handle in self._handles:
            handle.close()


class _Download:
    """One file's stream as the scan job takes it (``local``: its bytes come through here)."""

    local = True

    def __init__(self, stream: FileStream) -> None:
        self._stream = stream
        self.size = stream.size

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes in order."""
        return self._stream.chunks()

    def close(self) -> None:
        """Release the stream (the disks stay open for the next file)."""
        self._stream.close()
