"""The Guest Operations file source of a scan: its interface and the per-VM transfer pipeline.

Called by ``scan.job`` (one :class:`Transfers` per job) and ``scan.remediate`` (quarantine
copies take the job's transfer slot). :class:`GuestAccess` is what the job reads a VM's
files through: ``vsphere.guest.GuestFiles`` (Guest Operations, InitiateFileTransferFromGuest
+ GET), its appliance wrapper ``vsphere.appliances.ApplianceGuestFiles`` and the disk
source ``scan.sources.disk.DiskGuest`` all have that shape. Calls only what it is given: the
guest access and the engine session's ``receive`` / ``scan_stream`` / ``scan_batch``.

Pipeline: a job's :class:`Transfers` owns one transfer slot (one transfer per VM at a time:
read-ahead, retries and quarantine copies all take it) and one thread, started on first use
and joined by :meth:`Transfers.close`, that receives the next files into the engine
(``Session.receive``: hashed, in memory up to the engine's spool threshold, in a spool file
beyond) while the job matches the previous one. A file is read ahead only when its bytes
come through this process (``GuestAccess.local_downloads`` on the type and ``local`` on the
download); others are handed back ``deferred`` and streamed by the job
(:meth:`Transfers.stream`), unless the session scans files where they are read
(:class:`BatchScanner`: a disk read by the host's appliance): then the thread hands the
queued files over several per call, and the job books one batch's verdicts while the next
is scanned. The thread holds the slot only while it reads or waits for a batch (never while
a file waits in the queue), so the job can always get it.

What breaks a download off (``errors.TransientError``, ``errors.ConnectionLost``) is kept
(:class:`Feed`) and handed to the job with the file, which retries it once or ends the scan
as an outage; the engine alone would turn it into one file's "error" verdict.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from vsphere_av import errors
from vsphere_av.models import GuestFile

log = logging.getLogger(__name__)

BATCH_FILES = 64                  # files handed to a batch scanner in one call, at most
BATCH_BYTES = 4 * 1024 * 1024     # their bytes, at most (a larger file goes alone)
# What a detection found by reading a VM's disks waits for when no guest access can
# remediate it now (the disk sources' default ``remediation_pending``).
DEFERRED = "will be quarantined at the next power-on through guest operations"


# --- what a file source and the engine give the scan ------------------------------------------

class DownloadLike(Protocol):
    """An open guest file stream (``local`` True: its bytes come through this process)."""

    size: int

    def chunks(self) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class GuestAccess(Protocol):
    """Guest file access on one VM (``vsphere.guest.GuestFiles``, ``disk.DiskGuest``).

    A class attribute ``local_downloads = True`` says its downloads bring the bytes into
    this process, so they may be fetched ahead (read on the type: wrappers that hand
    transfers to someone else, like the appliance dispatch, do not inherit it).

    What a disk reader (``scan.sources.disk.DiskGuest``) adds, read with ``getattr`` so the
    guest source needs none of it: ``reads_disks = True`` (class attribute: the VM's power
    state does not matter, its disks are read), ``index_key(entry)`` (the incremental index
    row a file is kept under, so disk and guest entries never mix) and ``remediation`` (the
    guest access that changes files, or None when nothing can be changed now; then a
    detection waits with ``remediation_pending`` as its detail).
    """

    windows: bool

    def walk(self, roots: Sequence[str], *, prune: Callable[[str], bool],
             on_error: Callable[[str, errors.VsphereAvError], None]) -> Iterator[GuestFile]: ...
    def open_download(self, path: str) -> DownloadLike: ...
    def delete_file(self, path: str) -> None: ...


class StreamScanner(Protocol):
    """The engine half that scans a stream as it arrives (``engine.Session.scan_stream``)."""

    def scan_stream(self, chunks: Iterable[bytes], *, path: str, name: str | None = None,
                    owner: str = "", size_hint: int | None = None) -> Any: ...


class Receiver(Protocol):
    """The engine half that takes a file's bytes in, to be matched later (``Session.receive``)."""

    def receive(self, chunks: Iterable[bytes], *, size_hint: int | None = None) -> Any: ...


@dataclass(frozen=True)
class Stream:
    """One file handed to a :class:`BatchScanner`: what ``scan_stream`` would be given."""

    chunks: Iterable[bytes]
    path: str
    name: str | None
    size_hint: int | None
    owner: str = ""


@runtime_checkable
class BatchScanner(StreamScanner, Protocol):
    """The engine half that reads and matches files where they are, several per call
    (``scan.sources.remote_disk.RemoteDiskSession``: the host's appliance)."""

    def scan_batch(self, streams: Sequence[Stream]) -> list[Any]:
        """One result per stream, in order: its outcome, or the ``errors.VsphereAvError``
        it met (an outage, ``ConnectionLost``: for that file and every one after it)."""
        ...


# --- the transfer pipeline -------------------------------------------------------------------

@dataclass
class Fetched:
    """One file from the transfer thread: received, what went wrong, or "do it yourself"."""

    entry: GuestFile
    received: Any = None        # engine.Received: owned here until taken
    error: BaseException | None = None
    deferred: bool = False      # not read ahead (the bytes never come here, or stopping)
    outcome: Any = None         # already scanned where it was read (a batch)

    def take(self) -> Any:
        """The received file, handed over (whoever takes it frees it)."""
        received, self.received = self.received, None
        return received

    def discard(self) -> None:
        """Free a received file nobody took."""
        if self.received is not None:
            self.take().discard()


class _Stopped(Exception):
    pass


class Feed:
    """A download's chunks on their way into the engine, keeping what broke them off.

    The engine turns a failing producer into an "error" verdict of that file; the scan
    needs the exception itself (:meth:`check`), so that a transfer that broke off is retried
    and an outage (``ConnectionLost``) ends the scan instead of counting as one file's error.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.error: errors.VsphereAvError | None = None

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        except errors.VsphereAvError as exc:
            self.error = exc
            raise

    def check(self) -> None:
        """Raise what broke the download off, if anything did."""
        if self.error is not None:
            raise self.error


class SlotStream:
    """A download's chunks that give the transfer slot back as soon as they are read."""

    def __init__(self, download: DownloadLike, slot: threading.Lock) -> None:
        self._download = download
        self._slot = slot
        self._held = True

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._download.chunks()
        finally:
            self.close()

    def close(self) -> None:
        """Close the download and release the slot (once)."""
        if self._held:
            self._held = False
            try:
                self._download.close()
            finally:
                self._slot.release()


class Transfers:
    """One VM's transfer slot and the thread that receives the next files ahead, or hands
    them, several per call, to a session that scans them where they are read.

    The slot is held for every transfer of the job, whoever makes it; the thread holds it
    only while it is reading a file or waiting for a batch (never while a file waits in the
    queue), so the calling thread can always get it for a retry or a quarantine copy.

    ``batcher`` (a :class:`BatchScanner`, the job's session when it is one): the thread
    takes what is queued, up to ``BATCH_FILES`` files and ``BATCH_BYTES`` (a larger file
    goes alone), and hands it over in one ``scan_batch`` call while the job books the
    results of the previous one; a download whose bytes would come here is handed back
    ``deferred``. Without one, the thread receives one file at a time into ``receiver``.
    An outage (``errors.ConnectionLost``) is the connection's, never one file's: once the
    thread met one, every later file is answered with it, nothing more is read.
    """

    def __init__(self, guest: GuestAccess, receiver: Receiver | None, *, name: str,
                 enabled: bool, batcher: BatchScanner | None = None) -> None:
        self.guest = guest
        self.receiver = receiver
        self.batcher = batcher
        self.enabled = enabled
        self.slot = threading.Lock()
        self.pending = 0
        self._name = name
        self._todo: collections.deque[GuestFile | None] = collections.deque()
        self._queued = threading.Condition()
        self._done: queue.SimpleQueue[Fetched] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lost: BaseException | None = None     # the outage the thread met, if any
        self._thread: threading.Thread | None = None

    def submit(self, entry: GuestFile) -> None:
        """Queue a file to be received ahead (starts the thread on first use)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"transfer-{self._name}",
                                            daemon=True)
            self._thread.start()
        self.pending += 1
        with self._queued:
            self._todo.append(entry)
            self._queued.notify()

    def take(self) -> Fetched:
        """The next fetched file, in submission order (waits for it)."""
        fetched = self._done.get()
        self.pending -= 1
        return fetched

    def stream(self, entry: GuestFile, session: StreamScanner) -> Any:
        """Download one file into the engine now (``session.scan_stream``), holding the slot.

        Raises what broke the download off (:class:`Feed`), not only the engine's verdict.
        """
        slot = self.slot
        slot.acquire()
        try:
            download = self.guest.open_download(entry.path)
        except BaseException:
            slot.release()
            raise
        if not getattr(download, "local", False):
            # The bytes may never come here (an appliance pulls them): hand it over as is.
            try:
                return session.scan_stream(download.chunks(), path=entry.path,
                                           name=entry.name, size_hint=download.size)
            finally:
                try:
                    download.close()
                finally:
                    slot.release()
        chunks = SlotStream(download, slot)
        feed = Feed(chunks)
        try:
            outcome = session.scan_stream(feed, path=entry.path, name=entry.name,
                                          size_hint=download.size)
        finally:
            chunks.close()
        feed.check()
        return outcome

    def close(self, *, timeout: float = 30.0) -> None:
        """Stop the thread and free what it received; waits for a read in progress."""
        self._stop.set()
        if self._thread is None:
            return
        with self._queued:
            self._todo.append(None)
            self._queued.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: transfer thread still reading after %.0f s", self._name, timeout)
        while True:
            try:
                self._done.get_nowait().discard()
            except queue.Empty:
                return

    def _run(self) -> None:
        while True:
            entries = self._next()
            if not entries:
                return
            if self._lost is not None:
                fetched = [Fetched(entry=e, error=self._lost) for e in entries]
            else:
                try:
                    fetched = (self._scan_batch(entries) if self.batcher is not None
                               else [self._fetch(entries[0])])
                except BaseException as exc:      # never leave the scan thread waiting
                    fetched = [Fetched(entry=e, error=exc) for e in entries]
            for f in fetched:
                if isinstance(f.error, errors.ConnectionLost) and self._lost is None:
                    self._lost = f.error
                self._done.put(f)

    def _next(self) -> list[GuestFile]:
        """The next queued files (waits for one; none: closing): one at a time, or for a
        batch scanner what is queued, up to ``BATCH_FILES`` files and ``BATCH_BYTES``."""
        with self._queued:
            while not self._todo:
                self._queued.wait()
            first = self._todo[0]
            if first is None:
                return []
            self._todo.popleft()
            entries, size = [first], first.size
            most = BATCH_FILES if self.batcher is not None else 1
            while self._todo and len(entries) < most:
                following = self._todo[0]
                if following is None or size + following.size > BATCH_BYTES:
                    break
                entries.append(following)
                size += following.size
                self._todo.popleft()
            return entries

    def _scan_batch(self, entries: list[GuestFile]) -> list[Fetched]:
        """Hand files to the batch scanner in one call, holding the slot; one Fetched each."""
        assert self.batcher is not None
        if self._stop.is_set():
            return [Fetched(entry=e, error=_Stopped("scan stopped")) for e in entries]
        fetched: list[Fetched] = []
        handed: list[tuple[int, Stream]] = []      # (index in fetched, the file handed over)
        downloads: list[DownloadLike] = []
        with self.slot:
            try:
                for entry in entries:
                    try:
                        download = self.guest.open_download(entry.path)
                    except BaseException as exc:   # handed to the scan thread, which decides
                        fetched.append(Fetched(entry=entry, error=exc))
                        continue
                    downloads.append(download)
                    # Bytes that would come through here: the job streams them itself.
                    fetched.append(Fetched(entry=entry,
                                           deferred=bool(getattr(download, "local", False))))
                    if not fetched[-1].deferred:
                        handed.append((len(fetched) - 1, Stream(
                            chunks=download.chunks(), path=entry.path, name=entry.name,
                            size_hint=download.size)))
                if handed:
                    answers = self.batcher.scan_batch([stream for _, stream in handed])
                    for (i, _), answer in zip(handed, answers, strict=True):
                        if isinstance(answer, BaseException):
                            fetched[i].error = answer
                        else:
                            fetched[i].outcome = answer
            finally:
                for download in downloads:
                    download.close()
        return fetched

    def _fetch(self, entry: GuestFile) -> Fetched:
        if self._stop.is_set():
            return Fetched(entry=entry, error=_Stopped("scan stopped"))
        with self.slot:
            try:
                download = self.guest.open_download(entry.path)
            except BaseException as exc:       # handed to the scan thread, which decides
                return Fetched(entry=entry, error=exc)
            try:
                if not getattr(download, "local", False) or self.receiver is None:
                    return Fetched(entry=entry, deferred=True)
                feed = Feed(download.chunks())
                received = self.receiver.receive(self._until_stopped(feed),
                                                 size_hint=download.size)
                if feed.error is not None:
                    received.discard()
                    return Fetched(entry=entry, error=feed.error)
                if self._stop.is_set():
                    received.discard()
                    return Fetched(entry=entry, deferred=True)
                return Fetched(entry=entry, received=received)
            except BaseException as exc:
                return Fetched(entry=entry, error=exc)
            finally:
                download.close()

    def _until_stopped(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._stop.is_set():
                return          # the caller sees the stop and drops what was received
            yield chunk
