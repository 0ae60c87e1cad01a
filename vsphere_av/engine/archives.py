"""Opening archives: zip, tar (plain, gz, bz2, xz) and single-file gzip / bz2 / xz streams.

Called by ``engine.Session`` for every scanned file (and archive member) whose first bytes
say "archive"; calls zipfile, tarfile, gzip, bz2, lzma. Yields members as chunk streams and
never extracts anything to disk itself. Every limit (depth is enforced by the caller;
member count, total extracted size and compression ratio here) ends the walk with a
``Limit`` item (or ``ArchiveLimit`` inside a member stream) naming the limit, so a hostile
archive is reported (a detection of its own, or an incomplete file), not crashed on.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

CHUNK = 1024 * 1024
RATIO_FLOOR = 1024 * 1024   # below this many extracted bytes the ratio is not judged


@dataclass
class Budget:
    """Limits shared by one top-level file and everything nested in it."""

    max_members: int
    max_total: int
    max_ratio: int
    members: int = 0
    total: int = 0


@dataclass(frozen=True)
class Member:
    """One archive member: its name, declared size and a way to stream it."""

    name: str
    size: int
    open: Callable[[], Iterator[bytes]]


@dataclass(frozen=True)
class Skip:
    """A member that cannot be scanned (encrypted, unsupported)."""

    name: str
    reason: str


# Which limit ended a walk (the last part of ``Heuristics.Limits.Exceeded.<name>``).
MAX_DEPTH = "MaxDepth"
MAX_MEMBERS = "MaxMembers"
MAX_TOTAL_SIZE = "MaxTotalSize"
MAX_RATIO = "MaxRatio"
MAX_FILE_SIZE = "MaxFileSize"


@dataclass(frozen=True)
class Limit:
    """A limit ended the walk of this archive (``name``: which one, e.g. ``MAX_MEMBERS``)."""

    reason: str
    name: str


Item = Member | Skip | Limit


def kind_of(head: bytes) -> str:
    """'zip', 'gzip', 'bz2', 'xz', 'tar' or '' from a file's first 512 bytes."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:3] == b"BZh" and head[3:4].isdigit():
        return "bz2"
    if head[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if head[257:262] == b"ustar":
        return "tar"
    return ""


_Readable = IO[bytes] | gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile


def _chunks(fh: _Readable, budget: Budget, *, compressed: int, label: str) -> Iterator[bytes]:
    """Read a member, charging the budget; stop (ArchiveLimit) when a bound is crossed."""
    while True:
        data = fh.read(CHUNK)
        if not data:
            return
        budget.total += len(data)
        if budget.total > budget.max_total:
            raise ArchiveLimit(f"archive total extracted size limit ({budget.max_total} bytes) "
                               f"reached at {label}", MAX_TOTAL_SIZE)
        yield data


class ArchiveLimit(Exception):
    """Raised inside a member stream when a limit is crossed while extracting."""

    def __init__(self, reason: str, name: str) -> None:
        super().__init__(reason)
        self.name = name


def _ratio_exceeded(extracted: int, compressed: int, budget: Budget) -> bool:
    return extracted > RATIO_FLOOR and extracted > budget.max_ratio * max(compressed, 1)


def _zip_members(source: str | IO[bytes], budget: Budget, label: str) -> Iterator[Item]:
    with zipfile.ZipFile(source) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            budget.members += 1
            if budget.members > budget.max_members:
                yield Limit(f"archive member limit ({budget.max_members}) reached in {label}",
                    MAX_MEMBERS)
                return
            if info.flag_bits & 0x1:
                yield Skip(info.filename, "encrypted archive member")
                continue
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED,
                                          zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
                yield Skip(info.filename, f"unsupported compression method {info.compress_type}")
                continue
            if _ratio_exceeded(info.file_size, info.compress_size, budget):
                yield Limit(f"compression ratio limit ({budget.max_ratio}:1) exceeded by "
                            f"{label}!{info.filename}", MAX_RATIO)
                return
            if budget.total + info.file_size > budget.max_total:
                yield Limit(f"archive total extracted size limit ({budget.max_total} bytes) "
                            f"reached at {label}!{info.filename}", MAX_TOTAL_SIZE)
                return

            def opener(info: zipfile.ZipInfo = info) -> Iterator[bytes]:
                with zf.open(info) as fh:
                    yield from _chunks(fh, budget, compressed=info.compress_size,
                                       label=f"{label}!{info.filename}")

            yield Member(info.filename, info.file_size, opener)


def _tar_members(fileobj: IO[bytes], budget: Budget, label: str, compressed: int) -> Iterator[Item]:
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError as exc:
                yield Skip("", f"damaged tar archive: {exc}")
                return
            if info is None:
                return
            if not info.isfile():
                continue
            budget.members += 1
            if budget.members > budget.max_members:
                yield Limit(f"archive member limit ({budget.max_members}) reached in {label}",
                    MAX_MEMBERS)
                return
            if budget.total + info.size > budget.max_total:
                yield Limit(f"archive total extracted size limit ({budget.max_total} bytes) "
                            f"reached at {label}!{info.name}", MAX_TOTAL_SIZE)
                return
            if _ratio_exceeded(budget.total + info.size, compressed, budget):
                yield Limit(f"compression ratio limit ({budget.max_ratio}:1) exceeded by {label}",
                            MAX_RATIO)
                return

            def opener(info: tarfile.TarInfo = info) -> Iterator[bytes]:
                fh = tar.extractfile(info)
                if fh is None:
                    return
                with fh:
                    yield from _chunks(fh, budget, compressed=compressed,
                                       label=f"{label}!{info.name}")

            yield Member(info.name, info.size, opener)


def _single_stream(kind: str, fileobj: IO[bytes], budget: Budget, label: str, name: str,
                   compressed: int) -> Iterator[Item]:
    budget.members += 1
    if budget.members > budget.max_members:
        yield Limit(f"archive member limit ({budget.max_members}) reached in {label}",
                    MAX_MEMBERS)
        return
    inner = name
    for suffix in (".gz", ".tgz", ".bz2", ".xz", ".z"):
        if inner.lower().endswith(suffix):
            inner = inner[: -len(suffix)] + (".tar" if suffix == ".tgz" else "")
            break
    else:
        inner = inner + ".out"

    def opener() -> Iterator[bytes]:
        stream: gzip.GzipFile | bz2.BZ2File | lzma.LZMAFile
        if kind == "gzip":
            stream = gzip.GzipFile(fileobj=fileobj, mode="rb")
        elif kind == "bz2":
            stream = bz2.BZ2File(fileobj, mode="rb")
        else:
            stream = lzma.LZMAFile(fileobj, mode="rb")  # noqa: SIM115 - closed just below
        with stream:
            extracted = 0
            for data in _chunks(stream, budget, compressed=compressed, label=f"{label}!{inner}"):
                extracted += len(data)
                if _ratio_exceeded(extracted, compressed, budget):
                    raise ArchiveLimit(f"compression ratio limit ({budget.max_ratio}:1) "
                                       f"exceeded by {label}", MAX_RATIO)
                yield data

    yield Member(os.path.basename(inner) or "data", -1, opener)


def members(*, kind: str, data: bytes | None, path: str | None, name: str, label: str,
            compressed: int, budget: Budget) -> Iterator[Item]:
    """Members of an archive held in memory (``data``) or in a file (``path``)."""
    def fileobj() -> IO[bytes]:
        if data is not None:
            return io.BytesIO(data)
        assert path is not None
        return open(path, "rb")

    with fileobj() as fh:
        if kind == "zip":
            yield from _zip_members(fh, budget, label)
            return
        if kind == "tar":
            yield from _tar_members(fh, budget, label, compressed)
            return
        # gzip / bz2 / xz: a compressed tar, or one compressed file
        is_tar = False
        try:
            with tarfile.open(fileobj=fh, mode="r:*") as probe:
                is_tar = probe.next() is not None
        except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib_error()):
            is_tar = False
        fh.seek(0)
        if is_tar:
            yield from _tar_members(fh, budget, label, compressed)
        else:
            yield from _single_stream(kind, fh, budget, label, name, compressed)


def zlib_error() -> type[Exception]:
    """zlib.error (imported lazily to keep the exception tuple readable)."""
    import zlib

    return zlib.error
