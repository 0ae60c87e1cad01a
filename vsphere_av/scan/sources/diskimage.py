"""The disk file source: a VM's files read from its virtual disks, without the guest.

Called by the scan job's disk path (issue 12) with each virtual disk's VMDK chain as a
descriptor name plus an opener ``open_file(name) -> BinaryIO`` (seekable, read-only; names as
the descriptors give them, relative to the disk's directory: extents ``x-flat.vmdk``,
parents through ``parentFileNameHint``). The production opener wraps datastore HTTP
``Range`` reads in a ``rangefile.RangeFile``; tests open local files. This module calls the
Dissect libraries and libyal's file system libraries and nothing else: ``dissect.hypervisor``
(VMDK sparse, flat, streamOptimized extents and parent chains), ``dissect.volume`` (MBR,
GPT, LVM2), ``pyfsext`` and ``pyfsxfs`` (libyal's libfsext and libfsxfs, C: ext2/3/4 and XFS
directories and file data, read through ``_LibyalIO``), ``dissect.extfs`` and
``dissect.xfs`` (their superblocks' identity, and what the libyal libraries refuse),
``dissect.ntfs``, ``dissect.fat`` (FAT12/16/32: the EFI system partition) and
``dissect.fve`` (LUKS and BitLocker, detected and named only). No vSphere, HTTP or store
here. Neither library family has type hints: their objects stay ``Any`` inside the
``_Unix``/``_Ntfs``/``_Fat`` adapters and the chain opener.

    disks = [open_virtual_disk("vm.vmdk", open_file=opener)]
    with DiskFiles.mount(disks) as files:        # volumes found, guest mount table built
        for volume in files.volumes: ...         # index, file system, mount, problem
        for f in files.walk(["/"], prune=skip, on_error=report):
            with files.open(f) as stream:
                for chunk in stream.chunks(): ...

The walk has the shape of ``vsphere.guest.GuestFiles.walk`` (roots, ``prune(dir)``,
``on_error(path, exc)``), yields ``DiskFile`` (a ``models.GuestFile`` plus volume, file id,
mtime in ns and NTFS stream name) for regular files only, never follows symlinks or
junctions, and stops at mount points (each mount under a root is walked as its own start,
in path order). Guest paths: Linux ``/etc/cron.d/x`` (the root file system is the one
holding ``/etc/fstab``; other volumes are mounted per that fstab by UUID=, LABEL=,
PARTUUID=, PARTLABEL=, LVM or /dev/sdXN names where they resolve, the rest under
``/[unmounted]/diskD-NAME``; the EFI system partition is where fstab puts it, usually
``/boot/efi/EFI/...``); Windows ``C:\\Windows\\Temp\\x.exe`` (the NTFS volume holding
``\\Windows`` is C:, other readable volumes take the next letters; the EFI system partition
gets none, as in Windows, and is ``[unmounted]\\diskD-NAME\\EFI\\...``; NTFS alternate data
streams are files of their own, ``path:stream``). FAT has no inode numbers: a FAT file's id
is its directory's first cluster and its slot in that directory.

Errors (``errors.DiskError``):
  DiskImageError  the VMDK chain is corrupt, truncated, incomplete or too large: raised by
                  ``open_virtual_disk``, or later from ``walk``/``chunks`` when a read lands
                  past the end of an extent; the whole disk is unreadable.
  DiskFileError   one directory or file: ``walk`` hands it to ``on_error`` and goes on;
                  ``DiskFiles.open`` and ``FileStream.chunks`` raise it.
  An unknown, damaged or encrypted volume is no exception: its ``Volume.problem`` says why.
  What the opener or its reads raise as ``errors.VsphereAvError`` (a ``TransientError``
  from the datastore, say) passes through unchanged, never as a file's or disk's fault.

Threads: a ``DiskFiles`` may be walked in one thread while files are read in another; one
lock per ``DiskFiles`` serializes the reads underneath.

Bounds (``DiskLimits``): chain length, descriptor size, disk size, single read size,
volumes, entries per directory, walk depth and entries, fstab size; files are streamed in
``chunk_size`` pieces, never held whole.
"""

from __future__ import annotations

import collections
import contextlib
import io
import posixpath
import re
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, BinaryIO, Protocol

from dissect.fve.bde import is_bde_volume
from dissect.fve.luks import is_luks_volume
from dissect.hypervisor.disk.c_vmdk import COWD_MAGIC, SESPARSE_MAGIC, VMDK_MAGIC
from dissect.hypervisor.disk.vmdk import VMDK, DiskDescriptor, RawDisk, SparseDisk
from dissect.util.stream import AlignedStream, RangeStream
from dissect.volume.disk import Disk
from dissect.volume.lvm import LVM2
from dissect.volume.lvm.physical import LVM2Device

from vsphere_av import errors
from vsphere_av.models import GuestFile
from vsphere_av.scan.sources.rangefile import RangeFile

Opener = Callable[[str], BinaryIO]

SECTOR = 512
NO_PARENT = "ffffffff"
UNMOUNTED_ROOT = "/[unmounted]"
FIRST_NTFS_USER_RECORD = 24          # MFT records below this are NTFS metadata files ($MFT...)
PROBE_BYTES = 64 * 1024              # read from each volume to tell what it holds
WALKED_NODES = 1024                  # file nodes the walk parsed, kept for open (per volume)
METADATA_BLOCK = 64 * 1024           # small reads of ext/XFS metadata served from blocks this
METADATA_BLOCKS = 64                 # big, this many kept (4 MiB per volume)

# File systems and other contents a volume can hold (Volume.filesystem).
EXT4, EXT3, EXT2, XFS, NTFS = "ext4", "ext3", "ext2", "xfs", "ntfs"
LVM2_PV, SWAP, LUKS, BITLOCKER, FAT = "LVM2_member", "swap", "LUKS", "BitLocker", "FAT"
READABLE = frozenset({EXT4, EXT3, EXT2, XFS, NTFS, FAT})
LINUX_FS = frozenset({EXT4, EXT3, EXT2, XFS})

# Partitions that hold no file system by design: no problem when nothing is found there.
_NO_FS_TYPES = frozenset({
    "21686148-6449-6e6f-744e-656564454649",   # BIOS boot
    "e3c9e316-0b5c-4db8-817d-f92dd00215ae",   # Microsoft reserved (MSR)
    "5808c8aa-7e8f-42e0-85d2-e1e90434cfb3",   # Windows LDM metadata
})
ESP_TYPE = "efi system partition"             # GPT C12A7328-... and MBR 0xEF, as dissect names them


@dataclass(frozen=True)
class DiskLimits:
    """Every size, depth and count the reader accepts."""

    max_chain: int = 32                      # VMDK links, base included (ESXi allows 32)
    max_descriptor_bytes: int = 64 * 1024
    max_disk_bytes: int = 64 * 1024 ** 4     # 64 TiB, the VMFS maximum
    max_read_bytes: int = 64 * 1024 ** 2     # one read from an extent (grain directory...)
    max_volumes: int = 128
    max_dir_entries: int = 200_000
    max_depth: int = 64
    max_entries: int = 5_000_000
    max_fstab_bytes: int = 64 * 1024
    chunk_size: int = 1024 * 1024


_LOOKUP_LIMIT = DiskLimits.max_dir_entries   # entries listed to find one name (roots, fstab)


# --- the VMDK chain -----------------------------------------------------------------------

class _Extent:
    """One file of the chain: reads past its end are a truncated disk, not zeros."""

    def __init__(self, fh: BinaryIO, *, name: str, max_read: int) -> None:
        self.fh = fh
        self.name = name
        self._max_read = max_read
        fh.seek(0, io.SEEK_END)
        self.size = fh.tell()
        fh.seek(0)

    def read(self, n: int = -1) -> bytes:
        pos = self.fh.tell()
        if n is None or n < 0:
            n = self.size - pos
        if n > self._max_read:
            raise errors.DiskImageError(
                f"{self.name}: a read of {n} bytes at offset {pos} is over the "
                f"{self._max_read}-byte limit: corrupt header?")
        data = self.fh.read(n)
        if len(data) < n:
            raise errors.DiskImageError(
                f"{self.name}: truncated ({self.size} bytes; needed {n} at offset {pos})")
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def close(self) -> None:
        self.fh.close()


class _Chain(VMDK):  # type: ignore[misc]
    """dissect's VMDK read path over extents opened here (its own constructor opens extents
    and parents by local path, which a datastore reader cannot serve)."""

    def __init__(self, disks: list[Any], *, parent: _Chain | None, descriptor: Any) -> None:
        self.disks = disks
        self.parent = parent
        self.descriptor = descriptor
        self._disk_offsets: list[int] = []
        self.sector_count = 0
        size = 0
        for disk in disks:
            if size != 0:
                self._disk_offsets.append(self.sector_count)
            disk.offset = size
            disk.sector_offset = self.sector_count
            size += disk.size
            self.sector_count += disk.sector_count
        AlignedStream.__init__(self, size)


@dataclass(frozen=True)
class VirtualDisk:
    """One virtual disk's VMDK chain opened as the guest sees its bytes."""

    name: str                      # the descriptor given to open_virtual_disk
    size: int                      # bytes the guest sees
    create_type: str               # of the top link: monolithicSparse, monolithicFlat, ...
    chain: tuple[str, ...]         # descriptor names, this disk first, its base last
    stream: Any = field(repr=False, compare=False)
    _files: tuple[_Extent, ...] = field(repr=False, compare=False, default=())

    def close(self) -> None:
        """Close every file the chain opened."""
        for f in self._files:
            with contextlib.suppress(OSError):    # read-only: a failed close loses nothing
                f.close()


def open_virtual_disk(descriptor: str, *, open_file: Opener,
                      limits: DiskLimits = DiskLimits()) -> VirtualDisk:
    """Open a VMDK chain (descriptor or monolithic sparse file, parents followed)."""
    files: list[_Extent] = []
    chain: list[str] = []
    try:
        stream, create_type = _open_link(descriptor, open_file=open_file, limits=limits,
                                         files=files, chain=chain)
        if stream.size > limits.max_disk_bytes:
            raise errors.DiskImageError(
                f"{descriptor}: {stream.size} bytes is over the {limits.max_disk_bytes}-byte "
                f"limit")
        return VirtualDisk(name=descriptor, size=stream.size, create_type=create_type,
                           chain=tuple(chain), stream=stream, _files=tuple(files))
    except BaseException:
        for f in files:
            with contextlib.suppress(OSError):
                f.close()
        raise


def _open_link(name: str, *, open_file: Opener, limits: DiskLimits, files: list[_Extent],
               chain: list[str]) -> tuple[_Chain, str]:
    if name in chain:
        raise errors.DiskImageError(f"{name}: the parent chain loops ({' -> '.join(chain)})")
    if len(chain) >= limits.max_chain:
        raise errors.DiskImageError(
            f"{chain[0]}: more than {limits.max_chain} links in the snapshot chain")
    chain.append(name)
    top = _open_file(name, open_file=open_file, limits=limits, files=files)
    magic = top.read(min(4, top.size)) if top.size else b""
    top.seek(0)
    try:
        if magic == b"# Di":
            return _open_descriptor(name, top, open_file=open_file, limits=limits,
                                    files=files, chain=chain)
        if magic in (VMDK_MAGIC, COWD_MAGIC, SESPARSE_MAGIC):
            sparse = _sparse(top, limits=limits)
            desc = sparse.descriptor
            attr = dict(desc.attr) if desc is not None else {}
            parent = _parent(name, attr, open_file=open_file, limits=limits, files=files,
                             chain=chain)
            sparse.parent = parent
            stream = _Chain([sparse], parent=parent, descriptor=desc)
            _check_parent_size(name, stream, parent)
            return stream, str(attr.get("createType", "monolithicSparse"))
    except errors.VsphereAvError:
        raise
    except Exception as exc:   # dissect raises many kinds on bad bytes: one line for all
        raise errors.DiskImageError(f"{name}: corrupt VMDK: {_reason(exc)}") from exc
    raise errors.DiskImageError(
        f"{name}: not a VMDK descriptor or sparse extent (starts with {magic!r})")


def _open_file(name: str, *, open_file: Opener, limits: DiskLimits,
               files: list[_Extent]) -> _Extent:
    try:
        fh = open_file(name)
    except errors.VsphereAvError:
        raise
    except (OSError, ValueError) as exc:
        raise errors.DiskImageError(f"{name}: cannot open: {_reason(exc)}") from exc
    try:
        extent = _Extent(fh, name=name, max_read=limits.max_read_bytes)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            fh.close()
        if isinstance(exc, OSError | ValueError):
            raise errors.DiskImageError(f"{name}: cannot open: {_reason(exc)}") from exc
        raise
    files.append(extent)
    return extent


def _open_descriptor(name: str, fh: _Extent, *, open_file: Opener, limits: DiskLimits,
                     files: list[_Extent], chain: list[str]) -> tuple[_Chain, str]:
    if fh.size > limits.max_descriptor_bytes:
        raise errors.DiskImageError(
            f"{name}: descriptor of {fh.size} bytes is over the "
            f"{limits.max_descriptor_bytes}-byte limit")
    try:
        text = fh.read(fh.size).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.DiskImageError(f"{name}: descriptor is not text: {exc}") from exc
    desc = DiskDescriptor.parse(text)
    attr = dict(desc.attr)
    if not desc.extents:
        raise errors.DiskImageError(f"{name}: descriptor names no extent")
    parent = _parent(name, attr, open_file=open_file, limits=limits, files=files, chain=chain)
    disks: list[Any] = []
    for extent in desc.extents:
        declared = int(extent.sectors) * SECTOR
        if not extent.filename:
            raise errors.DiskImageError(f"{name}: extent {extent.raw!r} names no file")
        path = _relative(name, str(extent.filename))
        if extent.type in ("SPARSE", "VMFSSPARSE", "SESPARSE"):
            sparse = _sparse(_open_file(path, open_file=open_file, limits=limits, files=files),
                             limits=limits)
            sparse.parent = parent
            disks.append(sparse)
        elif extent.type in ("FLAT", "VMFS"):
            if extent.start_sector:
                raise errors.DiskImageError(
                    f"{name}: extent {path} starts at sector {extent.start_sector}: "
                    "not supported")
            flat = _open_file(path, open_file=open_file, limits=limits, files=files)
            if flat.size < declared:
                raise errors.DiskImageError(
                    f"{path}: truncated ({flat.size} bytes; the descriptor declares "
                    f"{declared})")
            disks.append(RawDisk(flat, declared))
        else:
            raise errors.DiskImageError(
                f"{name}: extent type {extent.type} ({path}) cannot be read from a datastore "
                "file")
    stream = _Chain(disks, parent=parent, descriptor=desc)
    _check_parent_size(name, stream, parent)
    return stream, str(attr.get("createType", ""))


def _sparse(fh: _Extent, *, limits: DiskLimits) -> Any:
    disk = SparseDisk(fh)
    if disk.size <= 0 or disk.size > limits.max_disk_bytes:
        raise errors.DiskImageError(f"{fh.name}: implausible capacity {disk.size} bytes")
    if not disk.is_sesparse:
        # Every grain table the directory points to must lie inside the file: a file cut
        # short loses its tables or grains, and this finds the first kind without reading
        # any table.
        table_bytes = disk._grain_table_size * 4
        for entry in disk._grain_directory:
            if entry and int(entry) * SECTOR + table_bytes > fh.size:
                raise errors.DiskImageError(
                    f"{fh.name}: truncated ({fh.size} bytes; a grain table lies at "
                    f"{int(entry) * SECTOR})")
    return disk


def _parent(name: str, attr: dict[str, Any], *, open_file: Opener, limits: DiskLimits,
            files: list[_Extent], chain: list[str]) -> _Chain | None:
    parent_cid = _cid(name, "parentCID", attr.get("parentCID", NO_PARENT))
    if parent_cid == int(NO_PARENT, 16):
        return None
    hint = str(attr.get("parentFileNameHint", ""))
    if not hint:
        raise errors.DiskImageError(f"{name}: a delta disk without parentFileNameHint")
    parent, _ = _open_link(_relative(name, hint), open_file=open_file, limits=limits,
                           files=files, chain=chain)
    parent_attr = parent.descriptor.attr if parent.descriptor else {}
    if "CID" in parent_attr:
        cid = _cid(hint, "CID", parent_attr["CID"])
        if cid != parent_cid:
            raise errors.DiskImageError(
                f"{name}: its parent {hint} changed after the snapshot (CID {cid:08x}, the "
                f"delta expects {parent_cid:08x})")
    return parent


def _cid(name: str, key: str, value: Any) -> int:
    """A content id (hex; compared as a number, written with or without leading zeros)."""
    try:
        return int(str(value), 16)
    except ValueError:
        raise errors.DiskImageError(f"{name}: {key} {value!r} is not hexadecimal") from None


def _check_parent_size(name: str, stream: _Chain, parent: _Chain | None) -> None:
    if parent is not None and parent.size != stream.size:
        raise errors.DiskImageError(
            f"{name}: {stream.size} bytes but its parent has {parent.size}")


def _relative(referrer: str, name: str) -> str:
    """A name a descriptor gives, as the opener knows it (relative to the referrer)."""
    name = name.replace("\\", "/")
    if name.startswith("/"):
        return name
    return posixpath.normpath(posixpath.join(posixpath.dirname(referrer), name))


# --- volumes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Volume:
    """One volume found on a VM's disks."""

    index: int                 # position in DiskFiles.volumes
    disk: int                  # which of the disks given to DiskFiles.open
    name: str                  # p1, vg0/root, disk (no partition table)
    kind: str                  # partition | logical volume | whole disk
    size: int
    filesystem: str            # ext4 | xfs | ntfs | FAT | LVM2_member | swap | LUKS | BitLocker...
    label: str = ""
    uuid: str = ""             # ext/XFS UUID; NTFS serial as 16 hex digits, FAT as XXXX-XXXX
                               # (as fstab has them)
    partition_type: str = ""
    partition_uuid: str = ""   # GPT partition GUID (fstab PARTUUID=)
    partition_name: str = ""   # GPT partition name (fstab PARTLABEL=)
    partition_number: int = 0
    mount: str = ""            # "/", "/boot", "C:", "/[unmounted]/disk0-p2"; "" not mounted
    problem: str = ""          # one line when its files cannot be read; "" otherwise

    @property
    def readable(self) -> bool:
        """Files on it can be walked."""
        return self.filesystem in READABLE and not self.problem

    @property
    def esp(self) -> bool:
        """The EFI system partition (by its partition type)."""
        return self.partition_type.lower() == ESP_TYPE


class _Readable(Protocol):
    """One file's data as an adapter opens it (a dissect stream or a _LibyalFile)."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...
    def read(self, size: int = ..., /) -> bytes: ...


class _Fs(Protocol):
    """What the walk needs from one file system (an adapter over a dissect or libyal one)."""

    windows: bool

    def root(self) -> Any: ...
    def children(self, node: Any, *, limit: int) -> list[_Entry]: ...
    def lookup(self, node: Any, name: str) -> _Entry | None: ...
    def open(self, file_id: int, stream: str) -> tuple[_Readable, int]: ...


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: str                  # dir | file | symlink | other
    file_id: int
    node: Any = field(repr=False, compare=False, default=None)
    size: int = 0
    mtime_ns: int = 0
    mode: int | None = None
    streams: tuple[tuple[str, int], ...] = ()   # NTFS alternate data streams: (name, size)
    problem: str = ""          # read but not scannable as it is (EFS, reparse data)


def _unix_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


class _Walked:
    """File nodes the walk just parsed, so opening one of them does not parse it again (an
    inode or MFT record costs more to parse than a small file costs to read). Bounded;
    callers hold the DiskFiles lock."""

    def __init__(self) -> None:
        self._nodes: collections.OrderedDict[int, Any] = collections.OrderedDict()

    def keep(self, entries: list[_Entry]) -> list[_Entry]:
        for entry in entries:
            if entry.kind == "file" and entry.node is not None:
                self._nodes[entry.file_id] = entry.node
        while len(self._nodes) > WALKED_NODES:
            self._nodes.popitem(last=False)
        return entries

    def node(self, file_id: int) -> Any:
        """The node the walk parsed for ``file_id`` (None: not kept); kept for its streams."""
        return self._nodes.get(file_id)


class _Unix:
    """ext2/3/4 and XFS. A libyal library (``pyfsext``, ``pyfsxfs``: C; a walk costs a
    quarter of dissect's cstruct parsing) lists directories and reads files; the dissect file
    system reads the superblock's identity (type, UUID, label: the libyal bindings give no
    UUID) and takes over a directory, a file or the whole volume the library refuses (an
    inode it will not parse, a name that is not UTF-8, a feature it does not know), so
    nothing dissect reads is lost. Directory nodes are inode numbers; file nodes are the
    library's file entries. Callers hold the DiskFiles lock (libyal objects are not
    thread-safe)."""

    windows = False

    def __init__(self, fs: Any, *, fh: Any, library: Any, mode: Callable[[Any], int]) -> None:
        self.fs = fs
        self._mode = mode                  # a dissect inode's mode (i_mode, di_mode)
        self._walked = _Walked()
        self._io = _LibyalIO(fh)
        self._volume: Any = None          # None: the library refused the volume
        volume = library.volume()
        with contextlib.suppress(_Refused), self._io.calls():
            volume.open_file_object(self._io)
            self._volume = volume

    def root(self) -> Any:
        return int(self.fs.root.inum)

    def children(self, node: Any, *, limit: int) -> list[_Entry]:
        if self._volume is not None:
            with contextlib.suppress(_Refused), self._io.calls():
                return self._walked.keep(self._list(node, limit))
        out: list[_Entry] = []
        for inode in self.fs.get_inode(node).iterdir():
            if inode.filename in (".", ".."):
                continue
            if len(out) >= limit:
                raise _TooMany(limit)
            mode = int(self._mode(inode.inode))
            kind = _unix_kind(mode)
            out.append(_Entry(name=str(inode.filename), kind=kind, file_id=int(inode.inum),
                              node=int(inode.inum) if kind == "dir" else None,
                              size=int(inode.size), mtime_ns=int(inode.mtime_ns),
                              mode=stat.S_IMODE(mode)))
        return out

    def _list(self, node: int, limit: int) -> list[_Entry]:
        directory = self._volume.get_file_entry_by_inode(node)
        count = directory.number_of_sub_file_entries
        if count > limit:
            raise _TooMany(limit)
        out: list[_Entry] = []
        for i in range(count):
            entry = directory.get_sub_file_entry(i)
            mode = entry.file_mode
            kind = _unix_kind(mode)
            inode = entry.inode_number
            out.append(_Entry(name=entry.name, kind=kind, file_id=inode,
                              node=inode if kind == "dir" else entry, size=entry.size,
                              # ns since 1970 (seconds x 10^9 where the inode keeps no ns)
                              mtime_ns=entry.get_modification_time_as_integer(),
                              mode=stat.S_IMODE(mode)))
        return out

    def lookup(self, node: Any, name: str) -> _Entry | None:
        return next((e for e in self.children(node, limit=_LOOKUP_LIMIT) if e.name == name), None)

    def open(self, file_id: int, stream: str) -> tuple[_Readable, int]:
        if self._volume is not None:
            with contextlib.suppress(_Refused), self._io.calls():
                entry = self._walked.node(file_id) or self._volume.get_file_entry_by_inode(
                    file_id)
                return _LibyalFile(entry, source=self._io), int(entry.size)
        inode = self.fs.get_inode(file_id)
        return inode.open(), int(inode.size)


class _Refused(Exception):
    """The libyal library would not read something (its own error, no read failed under it)."""


class _LibyalIO:
    """A volume's stream in the shape libyal's Python bindings read a file object through
    (read, seek, tell, get_offset, get_size). What the stream raises inside a library call
    (``errors.ConnectionLost``, a truncated disk's ``DiskImageError``) comes out of the
    library as a bare IOError: it is kept here and ``calls`` raises it in that one's place,
    so an outage stays an outage and a truncated disk still names itself."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self._size = int(fh.seek(0, io.SEEK_END))
        self._pos = 0
        self._failure: BaseException | None = None
        # The library reads inodes 256 bytes at a time, and each read down the VMDK chain
        # costs more than reading their whole table: small reads come from whole blocks.
        self._metadata = RangeFile(self._read_at, self._size, block_size=METADATA_BLOCK,
                                   cache_blocks=METADATA_BLOCKS, max_fetch_blocks=1,
                                   readahead_blocks=0, name="volume metadata")

    def read(self, size: int = -1) -> bytes:
        try:
            if size is None or size < 0:
                size = self._size - self._pos
            start = self._pos
            if start % METADATA_BLOCK + size <= METADATA_BLOCK:   # an inode, a directory block
                self._metadata.seek(start)
                data = self._metadata.read(size)
            else:
                data = self._read_at(start, size)
        except BaseException as exc:
            self._failure = exc
            raise
        self._pos += len(data)
        return data

    def _read_at(self, offset: int, size: int) -> bytes:
        self._fh.seek(offset)
        return bytes(self._fh.read(size))

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def get_offset(self) -> int:
        return self._pos

    def get_size(self) -> int:
        return self._size

    @contextlib.contextmanager
    def calls(self) -> Iterator[None]:
        """Around library calls: a read that failed under one raises its own exception
        (even when the library went on regardless); the library's own error is _Refused."""
        self._failure = None
        try:
            yield
        except Exception as exc:
            failure, self._failure = self._failure, None
            if failure is not None:
                raise failure from None
            if isinstance(exc, OSError):
                raise _Refused(_reason(exc)) from exc
            raise
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure


class _LibyalFile:
    """One file's data read through the library (the seek and read FileStream uses)."""

    def __init__(self, entry: Any, *, source: _LibyalIO) -> None:
        self._entry = entry
        self._source = source
        self._pos = 0

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != io.SEEK_SET:
            raise ValueError("only absolute seeks")
        self._pos = offset
        return offset

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, int(self._entry.size) - self._pos)
        with self._source.calls():
            data = bytes(self._entry.read_buffer_at_offset(size, self._pos))
        self._pos += len(data)
        return data


class _Ntfs:
    windows = True

    def __init__(self, fs: Any) -> None:
        from dissect.ntfs.c_ntfs import ATTRIBUTE_TYPE_CODE
        self.fs = fs
        self._types = ATTRIBUTE_TYPE_CODE
        self._walked = _Walked()

    def root(self) -> Any:
        return self.fs.mft.get(5)

    def children(self, node: Any, *, limit: int) -> list[_Entry]:
        from dissect.ntfs.util import segment_reference
        out: list[_Entry] = []
        seen: set[tuple[int, str]] = set()
        for index_entry in node.iterdir(ignore_dos=True):
            name = str(index_entry.attribute.file_name)
            ref = int(segment_reference(index_entry.header.FileReference))
            if name in (".", "..") or ref < FIRST_NTFS_USER_RECORD or (ref, name) in seen:
                continue
            seen.add((ref, name))
            if len(out) >= limit:
                raise _TooMany(limit)
            out.append(self._entry(name, self.fs.mft.get(ref)))
        return self._walked.keep(out)

    def _entry(self, name: str, record: Any) -> _Entry:
        types = self._types
        ref = int(record.segment)
        si = record.attributes[types.STANDARD_INFORMATION]
        mtime = int(si.last_modification_time_ns) if len(si) else 0
        attributes = int(si.file_attributes) if len(si) else 0
        if record.is_reparse_point() and (
                record.is_symlink() or record.is_mount_point() or record.is_dir()):
            return _Entry(name=name, kind="symlink", file_id=ref, mtime_ns=mtime)
        if record.is_dir():
            return _Entry(name=name, kind="dir", file_id=ref, node=record, mtime_ns=mtime)
        problem = ""
        if record.is_reparse_point():
            tag = int(record.attributes[types.REPARSE_POINT].tag)
            problem = f"reparse point (tag 0x{tag:08x}): its data is not in the file"
        elif attributes & 0x4000:          # FILE_ATTRIBUTE_ENCRYPTED
            problem = "EFS-encrypted file: contents not readable"
        streams: dict[str, int] = {}
        for attr in record.attributes[types.DATA]:
            if attr.name and attr.name not in streams:
                streams[str(attr.name)] = int(record.size(attr.name))
        size = int(record.size()) if record.has_stream("") else 0
        return _Entry(name=name, kind="file", file_id=ref, node=record, size=size,
                      mtime_ns=mtime, streams=tuple(streams.items()), problem=problem)

    def lookup(self, node: Any, name: str) -> _Entry | None:
        want = name.lower()
        return next((e for e in self.children(node, limit=_LOOKUP_LIMIT) if e.name.lower() == want),
                    None)

    def open(self, file_id: int, stream: str) -> tuple[_Readable, int]:
        record = self._walked.node(file_id) or self.fs.mft.get(file_id)
        return record.open(stream), int(record.size(stream))


class _Fat:
    """FAT12/16/32 (dissect.fat): no inodes, so a file's id is where its entry sits."""

    windows = True

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self._walked = _Walked()
        self._dirs: dict[int, Any] = {0: fs.root}     # first cluster -> directory listed

    def root(self) -> Any:
        return self.fs.root

    def children(self, node: Any, *, limit: int) -> list[_Entry]:
        key = int(node.cluster or 0)
        self._dirs.setdefault(key, node)
        out: list[_Entry] = []
        for slot, dirent in enumerate(node.iterdir()):
            if slot > 0xFFFF:       # FAT allows 65,536 entries per directory
                raise _TooMany(0x10000)
            if dirent.name in (".", "..") or dirent.is_volume_id():
                continue
            if len(out) >= limit:
                raise _TooMany(limit)
            out.append(self._entry(dirent, file_id=(key << 16) | slot))
        return self._walked.keep(out)

    def _entry(self, dirent: Any, *, file_id: int) -> _Entry:
        try:    # FAT keeps local time without a zone: taken as UTC
            mtime = int(dirent.mtime.replace(tzinfo=UTC).timestamp()) * 1_000_000_000
        except (ValueError, OverflowError):     # a date field out of range: no mtime
            mtime = 0
        name = _fat_name(dirent)
        if dirent.is_directory():
            return _Entry(name=name, kind="dir", file_id=file_id, node=dirent, mtime_ns=mtime)
        return _Entry(name=name, kind="file", file_id=file_id, node=dirent,
                      size=int(dirent.size), mtime_ns=mtime)

    def lookup(self, node: Any, name: str) -> _Entry | None:
        want = name.lower()
        return next((e for e in self.children(node, limit=_LOOKUP_LIMIT)
                     if e.name.lower() == want), None)

    def open(self, file_id: int, stream: str) -> tuple[_Readable, int]:
        dirent = self._walked.node(file_id)
        if dirent is None:      # its directory was listed: find the entry in its slot again
            directory = self._dirs[file_id >> 16]
            dirent = next(d for i, d in enumerate(directory.iterdir())
                          if i == file_id & 0xFFFF)
        return dirent.open(), int(dirent.size)


def _fat_name(dirent: Any) -> str:
    """The name as Windows and Linux show it: a short name without a long one is in lower
    case where the entry's case flags say so (NT byte 0x08: base, 0x10: extension)."""
    name = str(dirent.name)
    if dirent.ldirents:
        return name
    flags = int(dirent.dirent.DIR_NTRes)
    base, dot, ext = name.partition(".")
    return ((base.lower() if flags & 0x08 else base) + dot
            + (ext.lower() if flags & 0x10 else ext))


class _TooMany(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} entries")


# --- guest files --------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DiskFile(GuestFile):
    """A regular file (or NTFS alternate data stream) found on a volume."""

    volume: int                # Volume.index
    file_id: int               # inode number / MFT record: stable per volume (the index key)
    mtime_ns: int
    stream: str = ""           # NTFS alternate data stream name ("" the file's data)


class FileStream:
    """One file's bytes in chunks (the ``DownloadLike`` shape of the guest source)."""

    def __init__(self, fh: _Readable, *, size: int, path: str, chunk_size: int,
                 lock: threading.RLock | None = None) -> None:
        self.size = size
        self.path = path
        self._fh = fh
        self._chunk_size = chunk_size
        self._lock = lock or threading.RLock()

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes from the start, at most ``chunk_size`` at a time."""
        offset = 0
        try:
            self._fh.seek(0)
        except errors.VsphereAvError:      # the disk or the transport: not this file's
            raise
        except Exception as exc:
            raise errors.DiskFileError(f"{self.path}: cannot read: {_reason(exc)}") from exc
        left = self.size
        while left > 0:
            try:
                with self._lock:
                    self._fh.seek(offset)
                    data = self._fh.read(min(self._chunk_size, left))
            except errors.VsphereAvError:      # the disk or the transport: not this file's
                raise
            except Exception as exc:
                raise errors.DiskFileError(f"{self.path}: cannot read at offset "
                                           f"{self.size - left}: {_reason(exc)}") from exc
            if not data:
                raise errors.DiskFileError(
                    f"{self.path}: ended after {self.size - left} of {self.size} bytes")
            left -= len(data)
            offset += len(data)
            yield data

    def close(self) -> None:
        """Nothing to release but the reference: the disk's files stay open."""
        self._fh = io.BytesIO()

    def __enter__(self) -> FileStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class FstabEntry:
    """One line of /etc/fstab the mount table cares about."""

    spec: str
    mount: str
    fstype: str


_NON_BLOCK_FS = frozenset({"swap", "proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "nfs",
                           "nfs4", "cifs", "smbfs", "sshfs", "fuse", "none", "bind",
                           "cgroup", "cgroup2", "debugfs", "securityfs", "efivarfs"})


def parse_fstab(text: str) -> list[FstabEntry]:
    """Block-device mounts from fstab text (comments, swap, pseudo and network fs left out)."""
    out: list[FstabEntry] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        spec, mount = (_unescape(f) for f in fields[:2])
        fstype = fields[2] if len(fields) > 2 else "auto"
        options = fields[3].split(",") if len(fields) > 3 else []
        if (fstype in _NON_BLOCK_FS or "bind" in options or not mount.startswith("/")
                or ":" in spec.split("=", 1)[-1].split("/", 1)[0]):
            continue
        out.append(FstabEntry(spec=spec, mount=posixpath.normpath(mount), fstype=fstype))
    return out


def _unescape(value: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), value)


def _lvm_mapper_name(name: str) -> str:
    vg, _, lv = name.partition("/")
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def resolve_spec(spec: str, volumes: Sequence[Volume]) -> Volume | None:
    """The volume an fstab device spec names, if it is on these disks."""
    key, _, value = spec.partition("=")
    by = {"UUID": "uuid", "LABEL": "label", "PARTUUID": "partuuid", "PARTLABEL": "partlabel"}
    kind = by.get(key) if value else None
    if kind is None:
        m = re.fullmatch(r"/dev/disk/by-(uuid|label|partuuid|partlabel)/(.+)", spec)
        if m:
            kind, value = m.group(1), _unescape(m.group(2).replace("\\x", "\\"))
    if kind is not None:
        for v in volumes:
            candidate = {"uuid": v.uuid, "label": v.label, "partuuid": v.partition_uuid,
                         "partlabel": v.partition_name}[kind]
            if candidate and (candidate.lower() == value.lower() if kind.endswith("uuid")
                              else candidate == value):
                return v
        return None
    m = re.fullmatch(r"/dev/mapper/(.+)", spec)
    if m:
        return next((v for v in volumes if v.kind == "logical volume"
                     and _lvm_mapper_name(v.name) == m.group(1)), None)
    m = re.fullmatch(r"/dev/(?:sd|vd|xvd|hd)([a-z]+)(\d*)", spec)
    if m:
        disk = 0
        for ch in m.group(1):
            disk = disk * 26 + (ord(ch) - ord("a") + 1)
        disk -= 1
        number = int(m.group(2) or 0)
        return next((v for v in volumes if v.disk == disk and (
            v.partition_number == number if number else v.kind == "whole disk")), None)
    m = re.fullmatch(r"/dev/([^/]+)/([^/]+)", spec)
    if m:
        name = f"{m.group(1)}/{m.group(2)}"
        return next((v for v in volumes if v.kind == "logical volume" and v.name == name), None)
    return None


def plan_mounts(volumes: Sequence[Volume], *, root: int | None, fstab: Sequence[FstabEntry],
                windows: bool, system: int | None) -> tuple[dict[int, str], list[str]]:
    """Mount point of each readable volume (pure), and notes on what did not resolve.

    Linux: ``root`` (the volume holding /etc/fstab) at ``/``, the others where ``fstab``
    puts them, the rest under ``/[unmounted]``. Windows: ``system`` (holding \\Windows) is
    C:, the other readable volumes take the next letters in disk order (D: first when no
    system volume is known); the EFI system partition gets no letter (Windows gives it none)
    and is ``[unmounted]\\diskD-NAME`` as a volume past Z: is.
    """
    mounts: dict[int, str] = {}
    notes: list[str] = []
    readable = [v for v in volumes if v.filesystem in READABLE]
    if windows:
        letters = iter("CDEFGHIJKLMNOPQRSTUVWXYZ" if system is not None
                       else "DEFGHIJKLMNOPQRSTUVWXYZ")
        order = sorted(readable, key=lambda v: (v.index != system, v.index))
        for v in order:
            letter = None if v.esp else next(letters, None)
            mounts[v.index] = f"{letter}:" if letter else f"[unmounted]\\disk{v.disk}-{v.name}"
        return mounts, notes
    if root is not None:
        mounts[root] = "/"
    for entry in fstab:
        if entry.mount == "/":
            continue
        target = resolve_spec(entry.spec, volumes)
        if target is None:
            notes.append(f"fstab: {entry.spec} on {entry.mount}: not on these disks")
        elif target.index in mounts:
            notes.append(f"fstab: {entry.spec} on {entry.mount}: already mounted on "
                         f"{mounts[target.index]}")
        else:
            mounts[target.index] = entry.mount
    for v in readable:
        if v.index not in mounts:
            mounts[v.index] = f"{UNMOUNTED_ROOT}/disk{v.disk}-{v.name.replace('/', '-')}"
    return mounts, notes


class DiskFiles:
    """The guest's files on its virtual disks: volumes, mount table, walk and reads."""

    def __init__(self, *, disks: Sequence[VirtualDisk], volumes: tuple[Volume, ...],
                 file_systems: dict[int, _Fs], windows: bool, notes: tuple[str, ...],
                 limits: DiskLimits) -> None:
        self.disks = tuple(disks)
        self.volumes = volumes
        self.windows = windows
        self.notes = notes          # fstab lines that did not resolve, ambiguities
        self.limits = limits
        self._fs = file_systems
        # Every layer below (dissect streams, extents, RangeFile) seeks then reads a shared
        # handle: one lock per guest serializes them, so a walk in one thread and reads in
        # another (the scan job's transfer thread) never interleave.
        self._lock = threading.RLock()

    @classmethod
    def mount(cls, disks: Sequence[VirtualDisk], *, windows: bool | None = None,
             limits: DiskLimits = DiskLimits()) -> DiskFiles:
        """Find the volumes on ``disks`` (one VM's, in its device order) and mount them.

        ``windows`` None: decided by what is found (an NTFS volume holding \\Windows and no
        volume holding /etc/fstab means Windows); True/False: the VM's guest OS as vSphere
        reports it. The result owns ``disks`` (its ``close`` closes them); when this raises,
        they are closed already.
        """
        try:
            return cls._mount(disks, windows=windows, limits=limits)
        except BaseException:
            for disk in disks:
                disk.close()
            raise

    @classmethod
    def _mount(cls, disks: Sequence[VirtualDisk], *, windows: bool | None,
               limits: DiskLimits) -> DiskFiles:
        found: list[tuple[Volume, Any]] = []
        pvs: list[tuple[Volume, Any]] = []
        for d, disk in enumerate(disks):
            for volume, fh in _partitions(d, disk, limits=limits, first=len(found)):
                volume, fs = _identify(volume, fh)
                if volume.filesystem == LVM2_PV:
                    pvs.append((volume, fh))
                found.append((volume, fs))
                if len(found) > limits.max_volumes:
                    raise errors.DiskImageError(
                        f"{disk.name}: more than {limits.max_volumes} volumes")
        for volume, fh in _logical_volumes(pvs, first=len(found)):
            found.append(_identify(volume, fh))
        volumes = [v for v, _ in found]
        file_systems: dict[int, _Fs] = {}
        for v, fs in found:
            if fs is not None:
                file_systems[v.index] = fs
        notes: list[str] = []
        linux_roots = [v.index for v in volumes if v.filesystem in LINUX_FS and v.readable
                       and _kind_at(file_systems[v.index], ["etc", "fstab"]) == "file"]
        systems = [v.index for v in volumes if v.filesystem == NTFS and v.readable
                   and _kind_at(file_systems[v.index], ["Windows"]) == "dir"]
        if windows is None:
            windows = bool(systems) and not linux_roots
        root = linux_roots[0] if linux_roots else None
        system = systems[0] if systems else None
        if len(linux_roots) > 1 and not windows:
            notes.append(f"/etc/fstab on several volumes: {_names(volumes, linux_roots)}; "
                         f"{volumes[linux_roots[0]].name} is /")
        if len(systems) > 1 and windows:
            notes.append(f"\\Windows on several volumes: {_names(volumes, systems)}; "
                         f"{volumes[systems[0]].name} is C:")
        fstab: list[FstabEntry] = []
        if root is not None and not windows:
            fstab = parse_fstab(_read_small(file_systems[root], ["etc", "fstab"],
                                            limit=limits.max_fstab_bytes))
        mounts, more = plan_mounts(volumes, root=root, fstab=fstab, windows=windows,
                                   system=system)
        notes.extend(more)
        volumes = [replace(v, mount=mounts.get(v.index, "")) for v in volumes]
        return cls(disks=disks, volumes=tuple(volumes), file_systems=file_systems,
                   windows=windows, notes=tuple(notes), limits=limits)

    def __repr__(self) -> str:
        return (f"<DiskFiles {'windows' if self.windows else 'linux'} "
                f"volumes={[(v.name, v.filesystem, v.mount) for v in self.volumes]}>")

    def __enter__(self) -> DiskFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the disks' files."""
        for disk in self.disks:
            disk.close()

    @property
    def problems(self) -> tuple[Volume, ...]:
        """Volumes whose files cannot be read, each with its reason."""
        return tuple(v for v in self.volumes if v.problem)

    # --- paths ---------------------------------------------------------------------------

    def _join(self, parent: str, name: str) -> str:
        sep = "\\" if self.windows else "/"
        return parent + name if parent.endswith(sep) else f"{parent}{sep}{name}"

    def _mount_path(self, volume: Volume) -> str:
        return volume.mount + "\\" if self.windows and volume.mount.endswith(":") \
            else volume.mount

    def _norm(self, path: str) -> str:
        if self.windows:
            p = path.replace("/", "\\").lower()
            return p if p.endswith("\\") else p + "\\"
        p = posixpath.normpath(path) if path else "/"
        return p if p.endswith("/") else p + "/"

    def _under(self, path: str, root: str) -> bool:
        return self._norm(path).startswith(self._norm(root))

    def _mounted(self) -> list[Volume]:
        return sorted((v for v in self.volumes if v.mount and v.readable),
                      key=lambda v: self._norm(v.mount))

    # --- walk ----------------------------------------------------------------------------

    def walk(self, roots: Sequence[str] = (), *,
             prune: Callable[[str], bool] = lambda p: False,
             on_error: Callable[[str, errors.DiskError], None] = lambda p, e: None,
             ) -> Iterator[DiskFile]:
        """Every regular file under ``roots`` (all mounted volumes when empty), depth first.

        Symlinks and junctions are not followed; each mount point under a root is walked as
        its own start after the root. ``prune(dir_path)`` True skips a directory; an
        unreadable directory or file goes to ``on_error`` and the walk goes on; a root no
        mounted volume covers goes to ``on_error`` too. A ``DiskImageError`` ends the walk.
        """
        mounted = self._mounted()
        mount_points = {self._norm(self._mount_path(v)) for v in mounted}
        starts: list[tuple[str, Volume, Any]] = []
        budget = _Budget(self.limits.max_entries)
        for root in (roots or [self._mount_path(v) for v in mounted]):
            covered = False
            owner = next((v for v in reversed(mounted)
                          if self._under(root, self._mount_path(v))), None)
            if owner is not None:
                with self._lock:
                    resolved = self._resolve(owner, root, on_error=on_error)
                if resolved is not None:
                    starts.append((resolved[0], owner, resolved[1]))
                    covered = True
            for v in mounted:
                path = self._mount_path(v)
                if v is not owner and self._under(path, root) and roots:
                    starts.append((path, v, None))
                    covered = True
            if not covered and owner is None:
                on_error(root, errors.DiskFileError(f"{root}: on no volume of these disks"))
        done: set[tuple[int, str]] = set()
        for path, volume, node in starts:
            key = (volume.index, self._norm(path))
            if key in done:
                continue
            done.add(key)
            if node is None:
                node = self._fs[volume.index].root()
            yield from self._walk_from(path, volume, node, mount_points=mount_points,
                                       prune=prune, on_error=on_error, budget=budget)
            if budget.exhausted:
                return

    def _resolve(self, volume: Volume, root: str,
                 on_error: Callable[[str, errors.DiskError], None]) -> tuple[str, Any] | None:
        """The root's directory node and its path as the guest spells it."""
        fs = self._fs[volume.index]
        path = self._mount_path(volume)
        rest = self._norm(root)[len(self._norm(path)):]
        node = fs.root()
        try:
            for part in (p for p in re.split(r"[\\/]", rest) if p):
                entry = fs.lookup(node, part)
                if entry is None or entry.kind != "dir":
                    on_error(root, errors.DiskFileError(f"{root}: no such directory"))
                    return None
                node = entry.node
                path = self._join(path, entry.name)
        except errors.VsphereAvError:      # the disk or the transport: not this file's
            raise
        except Exception as exc:
            on_error(root, errors.DiskFileError(f"{root}: cannot list: {_reason(exc)}"))
            return None
        return path, node

    def _walk_from(self, start: str, volume: Volume, node: Any, *, mount_points: set[str],
                   prune: Callable[[str], bool],
                   on_error: Callable[[str, errors.DiskError], None],
                   budget: _Budget) -> Iterator[DiskFile]:
        fs = self._fs[volume.index]
        limits = self.limits
        stack: list[tuple[str, Any, int]] = [(start, node, 0)]
        visited: set[int] = set()
        while stack:
            directory, dir_node, depth = stack.pop()
            try:
                with self._lock:
                    entries = fs.children(dir_node, limit=limits.max_dir_entries)
            except errors.VsphereAvError:      # the disk or the transport: not this file's
                raise
            except Exception as exc:
                on_error(directory, errors.DiskFileError(
                    f"{directory}: cannot list: {_reason(exc)}"))
                continue
            subdirs: list[tuple[str, Any]] = []
            for entry in entries:
                path = self._join(directory, entry.name)
                if not budget.take():
                    on_error(directory, errors.DiskFileError(
                        f"{directory}: more than {limits.max_entries} entries: walk stopped"))
                    return
                if entry.kind == "dir":
                    if self._norm(path) in mount_points or entry.file_id in visited:
                        continue      # another volume's (walked on its own) or a loop
                    if depth + 1 > limits.max_depth:
                        on_error(path, errors.DiskFileError(
                            f"{path}: deeper than {limits.max_depth} levels: not walked"))
                    elif not prune(path):
                        visited.add(entry.file_id)
                        subdirs.append((path, entry.node))
                elif entry.kind == "file":
                    if entry.problem:
                        on_error(path, errors.DiskFileError(f"{path}: {entry.problem}"))
                        continue
                    yield self._file(path, entry, volume, stream="", size=entry.size)
                    for stream_name, size in entry.streams:
                        yield self._file(f"{path}:{stream_name}", entry, volume,
                                         stream=stream_name, size=size)
            stack.extend((p, n, depth + 1) for p, n in reversed(subdirs))

    def _file(self, path: str, entry: _Entry, volume: Volume, *, stream: str,
              size: int) -> DiskFile:
        mtime = datetime.fromtimestamp(entry.mtime_ns / 1e9, tz=UTC).isoformat()
        name = entry.name if not stream else f"{entry.name}:{stream}"
        return DiskFile(path=path, name=name, type="file", size=size, mtime=mtime,
                        permissions=entry.mode, volume=volume.index, file_id=entry.file_id,
                        mtime_ns=entry.mtime_ns, stream=stream)

    # --- reads ---------------------------------------------------------------------------

    def open(self, file: DiskFile) -> FileStream:
        """A stream over one file the walk yielded (re-read by its file id)."""
        fs = self._fs.get(file.volume)
        if fs is None:
            raise errors.DiskFileError(f"{file.path}: volume {file.volume} is not readable")
        try:
            with self._lock:
                fh, size = fs.open(file.file_id, file.stream)
        except errors.VsphereAvError:      # the disk or the transport: not this file's
            raise
        except Exception as exc:
            raise errors.DiskFileError(f"{file.path}: cannot open: {_reason(exc)}") from exc
        return FileStream(fh, size=size, path=file.path, chunk_size=self.limits.chunk_size,
                          lock=self._lock)


class _Budget:
    def __init__(self, total: int) -> None:
        self.left = total
        self.exhausted = False

    def take(self) -> bool:
        self.left -= 1
        if self.left < 0:
            self.exhausted = True
        return not self.exhausted


# --- finding volumes ----------------------------------------------------------------------

def _partitions(d: int, disk: VirtualDisk, *, limits: DiskLimits,
                first: int) -> Iterator[tuple[Volume, Any]]:
    stream = disk.stream
    # The partition table's sectors are read here first: dissect's scheme detection turns
    # every exception into "no scheme", and a truncated disk must not pass for a bare one.
    stream.seek(0)
    stream.read(min(PROBE_BYTES, disk.size))
    stream.seek(0)
    try:
        table = Disk(stream)
        parts = list(table.partitions)
    except errors.VsphereAvError:      # the disk or the transport: not this file's
        raise
    except Exception:
        yield (Volume(index=first, disk=d, name="disk", kind="whole disk", size=disk.size,
                      filesystem=""), RangeStream(stream, 0, disk.size))
        return
    if len(parts) > limits.max_volumes:
        raise errors.DiskImageError(f"{disk.name}: more than {limits.max_volumes} partitions")
    for i, p in enumerate(parts):
        guid = str(p.guid).lower() if getattr(p, "guid", None) else ""
        type_id = str(p.type).lower()
        volume = Volume(index=first + i, disk=d, name=f"p{p.number}", kind="partition",
                        size=int(p.size), filesystem="", partition_type=str(p.type_name),
                        partition_uuid=guid, partition_name=str(p.name or ""),
                        partition_number=int(p.number))
        if p.offset + p.size > disk.size:
            yield (replace(volume, problem=f"partition {p.number} runs past the end of the "
                           f"disk ({p.offset + p.size} > {disk.size}): damaged table"), None)
            continue
        if type_id in _NO_FS_TYPES:
            volume = replace(volume, filesystem="none")
        yield volume, p.open()


def _logical_volumes(pvs: list[tuple[Volume, Any]], *,
                     first: int) -> Iterator[tuple[Volume, Any]]:
    if not pvs:
        return
    groups: dict[str, list[tuple[Volume, Any]]] = {}
    for volume, fh in pvs:
        try:
            device = LVM2Device(fh)
            meta = device.metadata or {}
            vg = next((str(k) for k, v in meta.items() if isinstance(v, dict)), "")
        except errors.VsphereAvError:      # the disk or the transport: not this file's
            raise
        except Exception:
            continue    # a PV label without readable metadata: no LV to read there
        if vg:
            groups.setdefault(vg, []).append((volume, device))
    index = first
    for vg, members in groups.items():
        pv_names = ", ".join(v.name for v, _ in members)
        try:
            lvm = LVM2([dev for _, dev in members])
            lvs = [lv for lv in lvm.vg.lv if lv.is_visible]
        except errors.VsphereAvError:      # the disk or the transport: not this file's
            raise
        except Exception as exc:
            yield (Volume(index=index, disk=members[0][0].disk, name=vg, kind="logical volume",
                          size=0, filesystem="", problem=f"LVM volume group {vg} on "
                          f"{pv_names} cannot be read: {_reason(exc)}"), None)
            index += 1
            continue
        for lv in lvs:
            name = f"{vg}/{lv.name}"
            volume = Volume(index=index, disk=members[0][0].disk, name=name,
                            kind="logical volume", size=0, filesystem="")
            index += 1
            try:
                fh = lv.open()
                size = int(sum(s.extent_count for s in lv.segments)
                           * lvm.vg.extent_size * SECTOR)
                yield replace(volume, size=size), fh
            except errors.VsphereAvError:      # the disk or the transport: not this file's
                raise
            except Exception as exc:
                yield (replace(volume, problem=f"logical volume {name} ({lv.type}) cannot be "
                                               f"read: {_reason(exc)}"), None)


def _identify(volume: Volume, fh: Any) -> tuple[Volume, Any]:
    """What the volume holds; its file system opened when it is one we read."""
    if fh is None or volume.problem:
        return volume, None
    fh.seek(0)
    head = fh.read(min(PROBE_BYTES, volume.size or PROBE_BYTES))
    if len(head) < min(PROBE_BYTES, volume.size or 0):
        return replace(volume, problem="volume shorter than its table says"), None
    try:
        if is_luks_volume(fh):
            version = int.from_bytes(head[6:8], "big") if head[:6] == b"LUKS\xba\xbe" else 0
            name = f"{LUKS}{version}" if version else LUKS
            return replace(volume, filesystem=LUKS, problem=(
                f"encrypted volume ({name}): contents not readable without its key")), None
        fh.seek(0)
        if is_bde_volume(fh):
            return replace(volume, filesystem=BITLOCKER, problem=(
                "encrypted volume (BitLocker): contents not readable without its key")), None
    except errors.VsphereAvError:      # the disk or the transport: not this file's
        raise
    except Exception:   # a probe that cannot parse says "not encrypted": the magic decides
        pass
    kind = _magic(head)
    if kind in (EXT4, XFS, NTFS, FAT):
        try:
            fh.seek(0)
            fs = _open_fs(kind, fh)
            fs.children(fs.root(), limit=_LOOKUP_LIMIT)     # the root must list
        except errors.VsphereAvError:      # the disk or the transport: not this file's
            raise
        except Exception as exc:
            return replace(volume, filesystem=kind,
                           problem=f"damaged {kind} file system: {_reason(exc)}"), None
        return replace(volume, **_identity(kind, fs)), fs
    if kind in (LVM2_PV, SWAP):
        return replace(volume, filesystem=kind), None
    if volume.filesystem == "none" and not any(head):
        return volume, None
    if not any(head):
        return replace(volume, filesystem="", problem=(
            f"no file system found (the first {len(head)} bytes are zeros)")), None
    return replace(volume, filesystem="", problem="unknown file system"), None


def _magic(head: bytes) -> str:
    if head[1080:1082] == b"\x53\xef":
        return EXT4
    if head[:4] == b"XFSB":
        return XFS
    if head[3:11] == b"NTFS    ":
        return NTFS
    if any(head[s * SECTOR:s * SECTOR + 8] == b"LABELONE" for s in range(4)):
        return LVM2_PV
    if head[4086:4096] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return SWAP
    if head[82:87] == b"FAT32" or head[54:57] == b"FAT":
        return FAT
    return ""


def _open_fs(kind: str, fh: Any) -> _Fs:
    if kind == EXT4:
        import pyfsext
        from dissect.extfs import ExtFS
        return _Unix(ExtFS(fh), fh=fh, library=pyfsext, mode=lambda inode: inode.i_mode)
    if kind == XFS:
        import pyfsxfs
        from dissect.xfs import XFS as DissectXFS
        return _Unix(DissectXFS(fh), fh=fh, library=pyfsxfs, mode=lambda inode: inode.di_mode)
    if kind == FAT:
        from dissect.fat.fat import FATFS
        return _Fat(FATFS(fh))
    from dissect.ntfs import NTFS as DissectNTFS
    return _Ntfs(DissectNTFS(fh))


def _identity(kind: str, fs: _Fs) -> dict[str, Any]:
    raw: Any = getattr(fs, "fs", None)
    if isinstance(fs, _Ntfs):
        serial = raw.serial
        return {"filesystem": NTFS, "label": str(raw.volume_name or ""),
                "uuid": f"{int(serial):016X}" if serial is not None else ""}
    if kind == XFS:
        return {"filesystem": XFS, "label": str(raw.name), "uuid": str(raw.uuid)}
    if isinstance(fs, _Fat):
        serial = int(raw.bpb_ext.BS_VolID)
        return {"filesystem": FAT, "label": str(raw.volume_label),
                "uuid": f"{serial >> 16:04X}-{serial & 0xFFFF:04X}"}
    names = {2: EXT2, 3: EXT3, 4: EXT4}
    return {"filesystem": names.get(int(raw.type), EXT4), "label": str(raw.volume_name),
            "uuid": str(raw.uuid)}


def _find(fs: _Fs, parts: list[str]) -> _Entry | None:
    node = fs.root()
    entry: _Entry | None = None
    for i, part in enumerate(parts):
        entry = fs.lookup(node, part)
        if entry is None or (i < len(parts) - 1 and entry.kind != "dir"):
            return None
        node = entry.node
    return entry


def _kind_at(fs: _Fs, parts: list[str]) -> str | None:
    """``"file"``, ``"dir"`` (or another entry kind) at ``parts``; None when nothing is there."""
    try:
        entry = _find(fs, parts)
    except errors.VsphereAvError:      # the disk or the transport: not this file's
        raise
    except Exception:
        return None
    return entry.kind if entry is not None else None


def _read_small(fs: _Fs, parts: list[str], *, limit: int) -> str:
    entry = _find(fs, parts)
    if entry is None:
        return ""
    fh, size = fs.open(entry.file_id, "")
    data = fh.read(min(size, limit))
    return bytes(data).decode("utf-8", errors="replace")


def _names(volumes: Sequence[Volume], indexes: list[int]) -> str:
    return ", ".join(volumes[i].name for i in indexes)


def _reason(exc: BaseException) -> str:
    """One line for an exception from dissect (its messages can span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
