"""The controller's side of a disk scan read by the VM's host appliance.

Called by ``app.App._scan_disks`` when the VM's host has a healthy appliance, or a local
disk-scan worker process (``app.disk_workers``, the same routes) reads in its place: it
hands :class:`RemoteDiskGuest` to ``scan.job.scan_vm`` in place of
``scan.sources.disk.DiskGuest``, and the reader's engine session wrapped in
:class:`RemoteDiskSession`. Below, "the appliance" is whichever reads; the caller names it
(``reader``: "the host's appliance", "the disk-scan worker"), and every error and log line
says that name, so that an admin looks for the process that actually stopped. Calls the
appliance's engine service (``engine.remote.EngineClient.call``: the ``/v1/disk/*`` routes of
``scan.sources.disk_service``, whose docstring has the design and the protocol) and a
``grant(host, datastore, path)`` collaborator (``vsphere.disks.DatastoreFiles.grant``: a
``/folder`` URL, a fresh vCenter service ticket, the host pin) for every ticket the
appliance's reader asks for. Nothing else is called: no file byte comes here.

The scan job is the same as for ``DiskGuest``: this source walks (the appliance's walk,
page by page, its errors given to ``on_error`` in order), says each file's incremental
index row (computed on the appliance from the disk, volume and file id, as ``DiskGuest``
does) and opens "downloads" that are not local: their chunks are a :class:`DiskChunks`
handle that :class:`RemoteDiskSession` sends to the appliance, which reads and matches the
file there and answers a ``FileOutcome``. The session is a ``BatchScanner``: the job's
transfer thread (``scan.sources.guest.Transfers``) hands it the queued files several per
``/v1/disk/scan`` call (:meth:`RemoteDiskGuest.scan`: one engine session on the appliance
per call), one call in flight while the job books the previous one's verdicts; the walk
(the job's thread) and the scans (the transfer thread) share the client, one call at a
time (the appliance serves one session's calls one at a time anyway). So include globs,
the size limit, the index,
archives (the engine's, on the appliance), the verdict cache (the appliance engine's,
content SHA-256 x signature version) and incomplete accounting are the job's own.

Grants run in one thread per scan (a long poll, so a reader waiting for a ticket never
waits for the job's thread), and only for files in the datastore folders of the VM's disk
files (a descriptor names its extents relative to itself), whatever the appliance asks.
Errors: what the appliance raises is raised here again (same
class and message); the appliance itself unreachable or failing mid-scan is
``errors.ConnectionLost`` (an outage: the scan fails, the VM stays unprotected, the
controller retries); an appliance whose engine service cannot read disks, or only one file
per call (an older one), is ``errors.DiskError`` ending "upgrade the appliance" (the VM
unprotected with that reason; not an outage: retrying will not heal it).
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from vsphere_av import errors
from vsphere_av.engine.remote import MAX_JSON_BODY, outcome_from_json
from vsphere_av.models import (
    DatastoreInfo,
    FolderGrant,
    GuestFile,
    HostId,
    VirtualDiskInfo,
    VmInfo,
)
from vsphere_av.scan.sources.disk_service import (
    MAX_POLL_WAIT,
    WALK_PAGE,
    disks_json,
    error_from,
    error_json,
    vm_json,
)
from vsphere_av.scan.sources.guest import DEFERRED, Stream

log = logging.getLogger(__name__)

Grant = Callable[..., FolderGrant]    # (host, datastore, path, *, tickets=1) -> FolderGrant


@dataclass(frozen=True)
class RemoteDiskFile(GuestFile):
    """A file the appliance walked, with the index row it computed for it."""

    index: tuple[str, str, str] = ("", "", "")


class DiskChunks(Iterator[bytes]):
    """A file on the appliance's mounted disks: scanned there (:class:`RemoteDiskSession`).

    Reading it here is refused: the bytes of a disk read by the appliance never come here.
    """

    def __init__(self, guest: RemoteDiskGuest, path: str) -> None:
        self.guest = guest
        self.path = path

    def __repr__(self) -> str:
        return f"DiskChunks({self.path!r})"

    def __next__(self) -> bytes:
        raise errors.DiskError(f"{self.path}: read by {self.guest.reader}, not here")


class _RemoteDownload:
    """What ``open_download`` gives the job: not local, its chunks a :class:`DiskChunks`."""

    local = False

    def __init__(self, chunks: DiskChunks, size: int) -> None:
        self._chunks = chunks
        self.size = size

    def chunks(self) -> DiskChunks:
        return self._chunks

    def close(self) -> None:
        """Nothing is open here."""


class RemoteDiskGuest:
    """A VM's files on its virtual disks as another process reads them (see module):
    ``reader`` names it in every message ("the host's appliance", "the disk-scan worker")."""

    local_downloads: ClassVar[bool] = False    # the bytes stay on the appliance
    reads_disks: ClassVar[bool] = True

    def __init__(self, *, vm: VmInfo, disks: Sequence[VirtualDiskInfo], client: Any,
                 reader: str, grant: Grant, excludes: Sequence[str], remediation: Any = None,
                 remediation_pending: str = DEFERRED, poll_wait: float = 20.0) -> None:
        self.vm = vm
        self.reader = reader
        self.windows = vm.is_windows
        self.disks = tuple(disks)
        self.remediation = remediation
        self.remediation_pending = remediation_pending
        self._client = client
        self._grant = grant
        self._excludes = tuple(excludes)
        self._poll_wait = min(poll_wait, MAX_POLL_WAIT)
        self._session = ""
        self._host = HostId("")
        # Tickets are granted only for files in the folders of the VM's disk files.
        self._folders = {(f.datastore.name, posixpath.dirname(f.path))
                         for d in self.disks for unit in d.chain for f in unit.files}
        self._sizes: dict[str, int] = {}
        self._calls = threading.Lock()
        self._bytes_read = 0
        self._walks = 0
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._poll_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<RemoteDiskGuest {self.vm.name} read by {self.reader} via {self._client!r}>"

    # --- the appliance ----------------------------------------------------------------------

    def _call(self, route: str, document: dict[str, Any]) -> dict[str, Any]:
        from vsphere_av.errors import EngineError

        try:
            with self._calls:       # the job's thread walks, its transfer thread scans
                answer: dict[str, Any] = self._client.call(route, document)
        except EngineError as exc:
            if route == "/v1/disk/open" and "HTTP 404" in str(exc):
                raise errors.DiskError(f"{self.reader} cannot read disks (its engine service "
                                       "has no /v1/disk routes): upgrade the appliance") from exc
            raise errors.ConnectionLost(f"{self.reader} stopped reading the disks: "
                                        f"{exc}") from exc
        if "bytes_read" in answer:
            self._bytes_read = int(answer["bytes_read"])
        return answer

    def _open(self) -> str:
        if not self._session:
            host = self.vm.host.moref if self.vm.host else None
            if host is None:
                raise errors.DiskError(f"{self.vm.name} is on no host: its datastore files "
                                       "cannot be read")
            self._host = HostId(host)
            answer = self._call("/v1/disk/open", {"vm": vm_json(self.vm),
                                                  "disks": disks_json(self.disks)})
            self._session = str(answer["session"])
            self._poller = threading.Thread(target=self._poll, daemon=True,
                                            name=f"disk-grants-{self.vm.name}")
            self._poller.start()
        return self._session

    def _poll(self) -> None:
        """Answer the appliance's readers' needs with grants until the session ends."""
        client = self._client.clone()       # its own connections: this is another thread
        answers: list[dict[str, Any]] = []
        try:
            while not self._stop.is_set():
                reply = client.call("/v1/disk/grants", {
                    "session": self._session, "answers": answers, "wait": self._poll_wait},
                    timeout=self._poll_wait + 30.0)
                answers = []
                if reply.get("closed"):
                    return
                for need in reply.get("needs") or []:
                    answers.append(self._answer(need))
        except Exception as exc:    # the appliance gone: its readers time out, the job sees it
            self._poll_error = exc
            log.warning("%s: disk grants to %s stopped: %s", self.vm.name, self.reader, exc)
        finally:
            client.close()

    def _answer(self, need: dict[str, Any]) -> dict[str, Any]:
        ident = need.get("id")
        try:
            d = need["datastore"]
            datastore = DatastoreInfo(moref=d["moref"], name=str(d["name"]),
                                      datacenter_path=str(d["datacenter_path"]))
            path = str(need["path"])
            if (datastore.name, posixpath.dirname(path)) not in self._folders:
                raise errors.PermissionDenied(
                    f"[{datastore.name}] {path}: not in a folder of {self.vm.name}'s disks: "
                    "no ticket granted")
            tickets = need.get("tickets", 1)
            grant = self._grant(self._host, datastore, path,
                                tickets=tickets if isinstance(tickets, int) else 1)
        except errors.VsphereAvError as exc:
            return {"id": ident, "error": error_json(exc)}
        except (KeyError, TypeError) as exc:
            return {"id": ident, "error": error_json(errors.VsphereAvError(
                f"malformed grant request from {self.reader}: {exc!r}"))}
        return {"id": ident, "grant": asdict(grant)}

    # --- the scan job's source -----------------------------------------------------------

    def bytes_read(self) -> int:
        """Bytes the appliance fetched from the datastores for this scan."""
        return self._bytes_read

    def walk(self, roots: Sequence[str], *, prune: Callable[[str], bool],
             on_error: Callable[[str, errors.VsphereAvError], None]) -> Iterator[GuestFile]:
        """The appliance's walk (pruned there with the policy's exclusions, the same ones
        ``prune`` tests: a file below one is also refused by the job's include/exclude test)."""
        session = self._open()
        restart = self._walks > 0
        self._walks += 1
        while True:
            page = self._call("/v1/disk/walk", {
                "session": session, "roots": list(roots), "excludes": list(self._excludes),
                "restart": restart, "max": WALK_PAGE})
            restart = False
            for item in page.get("items") or []:
                if "error" in item:
                    problem = item["error"]
                    on_error(str(problem.get("path", "")), error_from(problem))
                    continue
                f = item["file"]
                index = f.get("index") or ["", "", ""]
                entry = RemoteDiskFile(
                    path=str(f["path"]), name=str(f["name"]), type=str(f["type"]),
                    size=int(f["size"]), mtime=str(f.get("mtime") or ""),
                    permissions=f.get("permissions"),
                    index=(str(index[0]), str(index[1]), str(index[2])))
                self._sizes[entry.path] = entry.size
                yield entry
            if page.get("raise"):
                raise error_from(page["raise"])
            if page.get("done"):
                return

    def open_download(self, path: str) -> _RemoteDownload:
        """A handle on a walked file for :class:`RemoteDiskSession` (nothing is read here)."""
        if path not in self._sizes:
            raise errors.DiskFileError(f"{path}: not met by the walk")
        return _RemoteDownload(DiskChunks(self, path), self._sizes[path])

    def scan(self, files: Sequence[tuple[str, str | None, str]]) -> list[Any]:
        """Have the appliance read and scan walked files ``(path, name, owner)`` in one call
        (more only when the request would pass the service's body limit): one result per
        file, in order, its ``engine.FileOutcome`` or the ``errors.VsphereAvError`` it met.
        An outage ends the call where it happened: the files answered before it keep their
        verdicts, it and every file after it get the outage."""
        results: list[Any] = []
        for part in _parts([{"path": path, "name": name, "owner": owner}
                            for path, name, owner in files]):
            answer = self._call("/v1/disk/scan", {"session": self._open(), "files": part})
            answered = answer.get("results")
            if not isinstance(answered, list):
                raise errors.DiskError(f"{self.reader} scans one disk file per call (an "
                                       "older engine service): upgrade the appliance")
            results.extend(error_from(r["raise"]) if "raise" in r
                           else outcome_from_json(r["outcome"]) for r in answered[:len(part)])
            if len(answered) < len(part):           # an outage ended the call there
                raised = answer.get("raise")
                outage = error_from(raised) if raised else errors.ConnectionLost(
                    f"{self.reader} answered for fewer disk files than it was sent")
                return results + [outage] * (len(files) - len(results))
        return results

    def delete_file(self, path: str) -> None:
        """Never: a disk scan does not write to a disk (remediation goes through the guest)."""
        raise errors.DiskError(f"{path}: a disk scan never changes a disk")

    def index_key(self, entry: GuestFile) -> tuple[str, str, str]:
        """The index row the appliance computed (``DiskGuest.index_key``)."""
        if not isinstance(entry, RemoteDiskFile):
            raise TypeError(f"not a file of this disk scan: {entry!r}")
        return entry.index

    def close(self) -> None:
        """End the appliance's session (its disks closed) and the grants thread."""
        self._stop.set()
        if self._session:
            try:
                self._call("/v1/disk/close", {"session": self._session})
            except errors.ConnectionLost as exc:
                log.warning("%s: closing the disk session on %s: %s", self.vm.name,
                            self.reader, exc)
        if self._poller is not None:
            self._poller.join(timeout=self._poll_wait + 35.0)


def _parts(files: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """The files in order, in runs whose request body stays within the engine service's
    JSON limit (a run holds one file at least)."""
    budget = MAX_JSON_BODY - 1024          # the session id, brackets and separators
    part: list[dict[str, Any]] = []
    size = 0
    for f in files:
        cost = len(json.dumps(f)) + 2
        if part and size + cost > budget:
            yield part
            part, size = [], 0
        part.append(f)
        size += cost
    if part:
        yield part


class RemoteDiskSession:
    """The appliance's engine session for a disk scan: files of a :class:`RemoteDiskGuest`
    are scanned where they are read; anything else goes to the wrapped session."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.version = session.version

    def scan_stream(self, chunks: Iterable[bytes], *, path: str, name: str | None = None,
                    owner: str = "", size_hint: int | None = None) -> Any:
        if isinstance(chunks, DiskChunks):
            (result,) = chunks.guest.scan([(chunks.path, name, owner)])
            if isinstance(result, BaseException):
                raise result
            return result
        return self._session.scan_stream(chunks, path=path, name=name, owner=owner,
                                         size_hint=size_hint)

    def scan_batch(self, streams: Sequence[Stream]) -> list[Any]:
        """Files of one :class:`RemoteDiskGuest` in one appliance call (``Transfers``);
        one result per stream, in order (``scan.sources.guest.BatchScanner``)."""
        files: list[tuple[str, str | None, str]] = []
        guests: set[RemoteDiskGuest] = set()
        for s in streams:
            if not isinstance(s.chunks, DiskChunks):
                raise TypeError(f"a batch holds the files of one disk scan: {s.chunks!r}")
            files.append((s.chunks.path, s.name, s.owner))
            guests.add(s.chunks.guest)
        if len(guests) > 1:
            raise TypeError(f"a batch holds the files of one disk scan: {guests!r}")
        return guests.pop().scan(files) if guests else []

    def lookup(self, sha256: str, *, path: str) -> Any:
        return self._session.lookup(sha256, path=path)
