"""Scanning local files and directories on all cores (``vsphere-av scan-files``, the benchmark).

Called by ``cli.scan_files`` and ``bench/engine.py``; calls ``engine.Engine`` (signatures, cache)
and starts worker processes (multiprocessing), each loading the compiled rules once.

The parent walks the trees, asks the verdict cache in batches (local files whose inode,
size and timestamps are unchanged skip even the hashing), and hands only the misses to the
workers, largest files first, small ones grouped into one task. After the first window the
walk runs in the pool's feeder thread, beside the scanning. Workers only read the cache
(identical content under another inode); the parent alone writes verdicts, so there is one
SQLite writer. One signature version is pinned for the whole run.
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vsphere_av.engine import Detection, Engine, FileOutcome, Session, _owner_name, cacheable
from vsphere_av.engine.cache import CachedVerdict, FileStat, VerdictCache
from vsphere_av.engine.matcher import utf8_name
from vsphere_av.engine.signatures import SignatureStore
from vsphere_av.models import Audit

BATCH = 256            # files per verdict-cache query
WINDOW = 2_000         # files walked (and sorted by size) before their misses are scheduled
TASK_BYTES = 4 << 20   # a worker task: up to this many bytes ...
TASK_FILES = 64        # ... or this many files

Progress = Callable[[int, int], None]   # (files done, bytes done)
_REPORT_LOCK = threading.Lock()


@dataclass
class ScanReport:
    """Everything ``scan-files`` prints."""

    signature_version: int
    files: int = 0
    bytes: int = 0
    cached: int = 0
    seconds: float = 0.0
    detected: list[FileOutcome] = field(default_factory=list)
    skipped: list[FileOutcome] = field(default_factory=list)
    errors: list[FileOutcome] = field(default_factory=list)

    def add(self, outcome: FileOutcome) -> None:
        """Count one outcome (thread-safe: the walk runs beside the result loop)."""
        with _REPORT_LOCK:
            self._add(outcome)

    def _add(self, outcome: FileOutcome) -> None:
        self.files += 1
        self.bytes += outcome.size
        self.cached += outcome.cached
        if outcome.status == "infected":
            self.detected.append(outcome)
        elif outcome.status == "skipped":
            self.skipped.append(outcome)
        elif outcome.status == "error":
            self.errors.append(outcome)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document of ``scan-files --json``."""
        return {
            "files": self.files, "bytes": self.bytes,
            "signature_version": self.signature_version, "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "detections": [{"path": utf8_name(detection_path(o.path, d.member)),
                            "file": utf8_name(o.path), "threat": d.threat, "sha256": o.sha256,
                            "source": d.source, "rule": d.rule, "member": utf8_name(d.member)}
                           for o in self.detected for d in o.detections],
            "skipped": [{"path": utf8_name(o.path), "reason": utf8_name(o.reason)}
                        for o in self.skipped],
            "errors": [{"path": utf8_name(o.path), "reason": utf8_name(o.reason)}
                       for o in self.errors],
        }


def detection_path(path: str, member: str) -> str:
    """'/dir/outer.zip!inner/x.exe' for a hit in an archive member, else the file's path."""
    return f"{path}!{member.split('!', 1)[1]}" if "!" in member else path


def walk(paths: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, os.stat_result | None,
                                                                    str]]:
    """(path, stat or None, error) for every regular file under ``paths`` (symlinks skipped)."""
    for top in paths:
        text = os.fspath(top)
        try:
            st = os.stat(text)
        except OSError as exc:
            yield text, None, f"cannot stat: {exc.strerror or exc}"
            continue
        if stat.S_ISREG(st.st_mode):
            yield text, st, ""
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        stack = [text]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as listing:
                    entries = list(listing)
            except OSError as exc:
                yield directory, None, f"cannot list: {exc.strerror or exc}"
                continue
            subdirs = []
            for entry in entries:
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        yield entry.path, entry.stat(follow_symlinks=False), ""
                except OSError as exc:
                    yield entry.path, None, f"cannot stat: {exc.strerror or exc}"
            stack.extend(reversed(subdirs))


# -- worker side ------------------------------------------------------------------------
_WORKER: Session | None = None


def _init_worker(settings: Any, version: int, use_cache: bool) -> None:
    global _WORKER
    store = SignatureStore(state_dir=Path(settings.state_dir))
    # Workers read the cache (identical content under another inode) but never write it.
    cache = VerdictCache.open(Path(settings.state_dir),
                              max_entries=settings.engine.cache_max_entries) if use_cache else None
    _WORKER = Session(loaded=store.load(version), settings=settings, cache=cache,
                      cache_writes=False)


_Packed = tuple[str, str, str, int, str, bool, tuple[tuple[str, str, str, str], ...]]


def _pack(o: FileOutcome) -> _Packed:
    # Plain tuples cross the process boundary several times faster than dataclasses.
    return (o.path, o.status, o.sha256, o.size, o.reason, o.cached,
            tuple((d.threat, d.source, d.rule, d.member) for d in o.detections))


def _unpack(t: _Packed) -> FileOutcome:
    return FileOutcome(path=t[0], status=t[1], sha256=t[2], size=t[3],  # type: ignore[arg-type]
                       reason=t[4], cached=t[5],
                       detections=tuple(Detection(threat=a, source=b, rule=c, member=d)  # type: ignore[arg-type]
                                        for a, b, c, d in t[6]))


def _scan_many(paths: list[str]) -> list[_Packed]:
    assert _WORKER is not None
    return [_pack(_scan_one(_WORKER, path)) for path in paths]


def _scan_one(session: Session, path: str) -> FileOutcome:
    """One file's outcome; trouble with this file is its own "error", never the run's end."""
    try:
        return session.scan_file(path)
    except Exception as exc:
        return FileOutcome(path=path, status="error", sha256="", size=0,
                           reason=f"{type(exc).__name__}: {exc}")


def _tasks(items: list[tuple[str, os.stat_result]]) -> list[list[str]]:
    """Largest files first, small ones grouped: workers finish together, IPC stays cheap."""
    tasks: list[list[str]] = []
    current: list[str] = []
    weight = 0
    for path, st in sorted(items, key=lambda item: -item[1].st_size):
        current.append(path)
        weight += st.st_size + 16_384        # a file costs some time whatever its size
        if weight >= TASK_BYTES or len(current) >= TASK_FILES:
            tasks.append(current)
            current, weight = [], 0
    if current:
        tasks.append(current)
    return tasks


# -- parent side ------------------------------------------------------------------------
def _file_stat(st: os.stat_result) -> FileStat:
    return FileStat(dev=st.st_dev, ino=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns,
                    ctime_ns=st.st_ctime_ns)


def scan_paths(*, settings: Any, paths: Sequence[str | os.PathLike[str]], jobs: int | None = None,
               use_cache: bool = True, progress: Progress | None = None,
               audit: Audit | None = None, actor: str = "") -> ScanReport:
    """Scan files and directories recursively with the active signatures.

    ``audit`` and ``actor``: where the built-in signatures' import on a new state directory
    is recorded (see ``Engine.open``).
    """
    started = time.monotonic()
    jobs = max(1, jobs or os.cpu_count() or 1)
    engine = Engine.open(settings, audit=audit, actor=actor, use_cache=use_cache)
    cache = engine.cache
    try:
        with engine.session(lazy=jobs > 1) as session:
            report = ScanReport(signature_version=session.version)
            pool = None
            in_flight: dict[str, os.stat_result] = {}

            def settle(window: list[tuple[str, os.stat_result | None, str]],
                       ) -> list[tuple[str, os.stat_result]]:
                misses: list[tuple[str, os.stat_result]] = []
                for batch in _batches(window):
                    misses += _from_cache(batch, session=session, cache=cache, report=report,
                                          use_cache=use_cache, progress=progress)
                for path, st in misses:
                    in_flight[path] = st
                return misses

            def finish(outcome: FileOutcome) -> None:
                report.add(outcome)
                st = in_flight.pop(outcome.path, None)
                if use_cache and cache is not None and outcome.sha256 and st is not None:
                    _store(outcome, st, session=session, cache=cache)
                if progress:
                    progress(report.files, report.bytes)

            windows = _windows(walk(paths))
            try:
                if jobs == 1:
                    for window in windows:
                        for path, _ in settle(window):
                            finish(_scan_one(session, path))
                else:
                    first: list[tuple[str, os.stat_result]] = []
                    for window in windows:
                        first = settle(window)
                        if first:
                            break
                    if first:
                        # Started on the first miss only: a warm pass never pays for workers.
                        pool = multiprocessing.get_context("fork").Pool(
                            jobs, initializer=_init_worker,
                            initargs=(settings, session.version, use_cache))

                        def tasks() -> Iterator[list[str]]:
                            # Runs in the pool's feeder thread: the walk and the cache
                            # queries of later windows overlap with the scanning.
                            yield from _tasks(first)
                            for window in windows:
                                yield from _tasks(settle(window))

                        for done in pool.imap_unordered(_scan_many, tasks()):
                            for packed in done:
                                finish(_unpack(packed))
            except BaseException:
                if pool is not None:      # interrupted or failed: do not finish the queue
                    pool.terminate()
                    pool.join()
                    pool = None
                raise
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()
    finally:
        engine.close()
    report.seconds = time.monotonic() - started
    return report


def _windows(items: Iterator[tuple[str, os.stat_result | None, str]],
             ) -> Iterator[list[tuple[str, os.stat_result | None, str]]]:
    """Walk results in windows of WINDOW files: bounded memory, few scheduling barriers."""
    window: list[tuple[str, os.stat_result | None, str]] = []
    for item in items:
        window.append(item)
        if len(window) >= WINDOW:
            yield window
            window = []
    if window:
        yield window


def _batches(items: Iterable[tuple[str, os.stat_result | None, str]],
             ) -> Iterator[list[tuple[str, os.stat_result | None, str]]]:
    # The first batch is small so progress starts at once; later ones amortise the queries.
    size = 32
    batch: list[tuple[str, os.stat_result | None, str]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
            size = BATCH * 4
    if batch:
        yield batch


def _from_cache(batch: list[tuple[str, os.stat_result | None, str]], *, session: Session,
                cache: Any, report: ScanReport, use_cache: bool, progress: Progress | None,
                ) -> list[tuple[str, os.stat_result]]:
    """Settle what the cache knows; return the (path, stat) pairs that need scanning."""
    todo: list[tuple[str, os.stat_result]] = []
    for path, st, error in batch:
        if st is None:
            report.add(FileOutcome(path=path, status="error", sha256="", size=0, reason=error))
        else:
            todo.append((path, st))
    if not use_cache or cache is None or not todo:
        return todo
    stats = [_file_stat(st) for _, st in todo]
    known = cache.file_hashes(stats)
    if not known:
        return todo
    keyed: list[tuple[str, os.stat_result, tuple[str, str] | None]] = []
    for (path, st), fst in zip(todo, stats, strict=True):
        sha = known.get(fst)
        keyed.append((path, st, (sha, _context(session, path, st)) if sha else None))
    verdicts: dict[tuple[str, str], CachedVerdict] = cache.get_many(
        [key for _, _, key in keyed if key], session.version)
    misses = []
    for path, st, key in keyed:
        sha = key[0] if key else None
        hit = verdicts.get(key) if key else None
        if hit is None:
            misses.append((path, st))
            continue
        report.add(session._from_cached(hit, path=path, sha256=sha or "", size=st.st_size))
    if progress:
        progress(report.files, report.bytes)
    return misses


def _context(session: Session, path: str, st: os.stat_result) -> str:
    return session.cache_context(path=path, owner=_owner_name(st.st_uid) if session.uses_owner
                                 else "")


def _store(outcome: FileOutcome, st: os.stat_result, *, session: Session, cache: Any) -> None:
    if outcome.status not in ("clean", "infected"):
        return
    if outcome.cached:
        cache.remember_file(_file_stat(st), outcome.sha256)
        return
    cache.put(outcome.sha256, session.version, _context(session, outcome.path, st),
              cacheable(outcome))
    cache.remember_file(_file_stat(st), outcome.sha256)
