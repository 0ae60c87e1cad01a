"""The appliance's side of a disk scan: a VM's disks read on its own host, never elsewhere.

Called by the engine service of the host's appliance (``vsphere-av engine serve``: ``cli``
adds :meth:`DiskService.routes` to ``engine.remote.EngineService``); its client is the
controller's ``scan.sources.remote_disk.RemoteDiskGuest``. Calls ``scan.sources.disk``
(``DiskGuest``: the VMDK chains, volumes and file systems, exactly as the controller would
read them), the engine service's sessions (``EngineService.scanning``: one engine session
per scan call, the files' bytes into the appliance's engine) and a
``DatastoreReader`` factory given by the caller (``vsphere.disks.GrantedFiles``: range reads
of ``/folder`` URLs with the host certificate pinned).

Design (issue 12, point 2). Who decides what: the controller keeps every decision of the
scan job (``scan.job.scan_vm`` runs there: include globs, the size limit, the incremental
index, the verdicts' accounting, remediation); the appliance mounts the disks, walks them
(pruning the directories the policy excludes: the patterns come as data), and reads and
matches the files the controller asks for. What crosses to the controller is metadata and
verdicts (a file's path, size, mtime, index row; a ``FileOutcome``), never a file's bytes.

Tickets. Every ``/folder`` read needs a generic service ticket that only vCenter gives, and
the appliance has no vCenter credentials (nor a cloned session). So the reader asks: a
range read that needs a ticket (the first read of a file, or each read on a host that takes
each ticket once) posts a *need* (datastore, path) and waits; the controller keeps one
long-poll request open (``/v1/disk/grants``) that returns the needs as they come and
carries the grants back (URL, ticket, host pin: ``models.FolderGrant``) with the next
poll; a reader on a host that takes each ticket once asks for more at a time and ahead of
need (spares, up to ``vsphere.disks.MAX_SPARE``, ``vsphere.disks._TicketStock``), so most
reads need no round trip. The
controller computes the URL, so the appliance builds none and trusts none it was
not handed for its session's files; a grant that does not come in time (controller gone)
or comes back as an error fails the read with that error, so the scan fails as it would
have on the controller.

Routes (JSON, behind the service's bearer token; one session per VM scan, ``session`` the
id ``open`` returned):

    /v1/disk/open    {"vm": {...}, "disks": [VirtualDiskInfo...]} -> {"session"}
    /v1/disk/walk    {"session", "roots", "excludes", "restart", "max"} -> {"items": [
                     {"file": {...}} | {"error": {"path", "kind", "message"}}], "done",
                     "raise"?}: the next entries of the walk, with the walk's errors in order
    /v1/disk/scan    {"session", "files": [{"path", "name", "owner"}...]} -> {"results": [
                     {"outcome"} | {"raise"}...], "raise"?}: the files read and scanned in
                     one engine session, one result per file in order (a file's own error
                     is its result); an outage (``ConnectionLost``: a ticket that never
                     came, the session closed) ends the call: the results before it, then
                     "raise". The one-file form of an older controller, {"session", "path",
                     "name", "owner"} -> {"outcome"} | {"raise"}, is the same call with one
                     file.
    /v1/disk/grants  {"session", "answers": [{"id", "grant"|"error"}], "wait"} -> {"needs":
                     [{"id", "datastore", "path", "tickets"}], "closed"}
    /v1/disk/close   {"session"} -> {"bytes_read"}

Errors travel as ``{"kind", "message"}`` (a ``vsphere_av.errors`` class name) and are raised
again on the other side, so the scan job treats a volume it cannot read, a file that breaks
off and an outage exactly as when the controller reads. A session not used for
``idle_timeout`` seconds is closed (its controller is gone).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

from vsphere_av import errors
from vsphere_av.errors import EngineError
from vsphere_av.models import (
    DatastoreId,
    DatastoreInfo,
    DiskFile,
    DiskUnit,
    FolderGrant,
    GuestFile,
    HostId,
    VirtualDiskInfo,
    VmId,
    VmInfo,
)
from vsphere_av.scan.filters import Filters
from vsphere_av.scan.sources.guest import Fetched, Transfers

if TYPE_CHECKING:     # the reader loads Dissect and libyal: imported when a session opens
    from vsphere_av.scan.sources.disk import DatastoreReader, DiskGuest

WALK_PAGE = 512           # entries per walk call: well below disk.RECENT_FILES
GRANT_TIMEOUT = 120.0     # seconds a read waits for the controller's grant
IDLE_TIMEOUT = 900.0      # a session nobody asked anything of for this long is closed
MAX_SESSIONS = 64
MAX_POLL_WAIT = 30.0

GrantFn = Callable[..., FolderGrant]     # (datastore, path, *, tickets=1) -> FolderGrant


class Scan(Protocol):
    """One engine session of the service (``engine.remote.ServiceSession``): a file taken in
    ahead, then its verdict as FileOutcome JSON."""

    def receive(self, chunks: Iterable[bytes], *, size_hint: int | None = None) -> Any: ...
    def scan_received(self, received: Any, *, path: str, name: str | None,
                      owner: str) -> dict[str, Any]: ...


class ReaderFactory(Protocol):
    """Builds the appliance's datastore reader over a grant source (``GrantedFiles``)."""

    def __call__(self, *, grant: GrantFn) -> Any: ...


# --- plain data both ways ------------------------------------------------------------------

def error_json(exc: errors.VsphereAvError) -> dict[str, str]:
    """An error as it crosses the wire."""
    return {"kind": type(exc).__name__, "message": str(exc)}


def error_from(document: Any) -> errors.VsphereAvError:
    """The error :func:`error_json` sent (a ``vsphere_av.errors`` class; the base otherwise)."""
    kind = str(document.get("kind", "")) if isinstance(document, dict) else ""
    message = str(document.get("message", "")) if isinstance(document, dict) else ""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.VsphereAvError)):
        cls = errors.VsphereAvError
    return cls(message or "error on the appliance")


def disks_json(disks: Sequence[VirtualDiskInfo]) -> list[dict[str, Any]]:
    """Disk chains as JSON (``dataclasses.asdict``)."""
    return [dataclasses.asdict(d) for d in disks]


def _datastore(d: dict[str, Any]) -> DatastoreInfo:
    return DatastoreInfo(moref=DatastoreId(str(d["moref"])), name=str(d["name"]),
                         datacenter_path=str(d["datacenter_path"]))


def disks_from(documents: Any) -> tuple[VirtualDiskInfo, ...]:
    """Disk chains from :func:`disks_json`; EngineError-free: ValueError when malformed."""
    try:
        return tuple(VirtualDiskInfo(
            vm=VmId(str(d["vm"])), key=int(d["key"]), label=str(d["label"]),
            capacity=int(d["capacity"]), disk_mode=str(d["disk_mode"]),
            backing=str(d["backing"]), datastore=_datastore(d["datastore"]),
            host=HostId(str(d["host"])) if d.get("host") else None,
            chain=tuple(DiskUnit(files=tuple(
                DiskFile(name=str(f["name"]), datastore=_datastore(f["datastore"]),
                         path=str(f["path"]), type=str(f["type"]), size=int(f["size"]))
                for f in unit["files"])) for unit in d["chain"]))
            for d in documents)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed disk description: {exc!r}") from exc


def vm_json(vm: VmInfo) -> dict[str, Any]:
    """What the appliance needs of the VM: names for messages, the guest family, the moref
    of its index rows."""
    return {"moref": vm.moref, "name": vm.name, "guest_id": vm.guest_id,
            "power_state": vm.power_state}


def _vm_from(document: Any) -> VmInfo:
    return VmInfo(moref=VmId(str(document["moref"])), name=str(document["name"]),
                  instance_uuid="", power_state=str(document["power_state"]),
                  tools_running=False, guest_id=str(document["guest_id"]), host=None)


def file_json(entry: GuestFile, index: tuple[str, str, str]) -> dict[str, Any]:
    """A walked file: its ``GuestFile`` fields and its incremental index row."""
    return {"path": entry.path, "name": entry.name, "type": entry.type, "size": entry.size,
            "mtime": entry.mtime, "permissions": entry.permissions, "index": list(index)}


# --- tickets ---------------------------------------------------------------------------------

class _Broker:
    """Needs of the readers and the grants the controller sends back for them."""

    def __init__(self, *, timeout: float) -> None:
        self._timeout = timeout
        self._cond = threading.Condition()
        self._waiting: dict[int, tuple[DatastoreInfo, str, int]] = {}
        self._unsent: list[int] = []
        self._answers: dict[int, FolderGrant | errors.VsphereAvError] = {}
        self._next = 0
        self.closed = False

    def grant(self, datastore: DatastoreInfo, path: str, *, tickets: int = 1) -> FolderGrant:
        """Called by a reader: wait for the controller's grant for ``[datastore] path``
        (``tickets``: how many it asks for, the first and spares)."""
        with self._cond:
            self._next += 1
            ident = self._next
            self._waiting[ident] = (datastore, path, tickets)
            self._unsent.append(ident)
            self._cond.notify_all()
            deadline = time.monotonic() + self._timeout
            while ident not in self._answers and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._waiting.pop(ident, None)
            answer = self._answers.pop(ident, None)
        if isinstance(answer, FolderGrant):
            return answer
        if answer is not None:
            raise answer
        if self.closed:
            raise errors.ConnectionLost(f"[{datastore.name}] {path}: the disk session ended "
                                        "while the read waited for its service ticket")
        raise errors.ConnectionLost(f"[{datastore.name}] {path}: no service ticket from the "
                                    f"controller within {self._timeout:.0f} s")

    def exchange(self, answers: Any, *, wait: float) -> list[dict[str, Any]]:
        """Called for the controller's poll: take its answers, return the new needs."""
        with self._cond:
            for answer in answers if isinstance(answers, list) else []:
                ident = answer.get("id") if isinstance(answer, dict) else None
                if not isinstance(ident, int) or ident not in self._waiting:
                    continue
                if isinstance(answer.get("grant"), dict):
                    g = answer["grant"]
                    self._answers[ident] = FolderGrant(
                        url=str(g.get("url", "")), ticket=str(g.get("ticket", "")),
                        thumbprint=str(g.get("thumbprint", "")),
                        spare=tuple(str(t) for t in g.get("spare") or ()))
                else:
                    self._answers[ident] = error_from(answer.get("error"))
            self._cond.notify_all()
            deadline = time.monotonic() + wait
            while not self._unsent and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            needs = [{"id": i, "datastore": dataclasses.asdict(self._waiting[i][0]),
                      "path": self._waiting[i][1], "tickets": self._waiting[i][2]}
                     for i in self._unsent if i in self._waiting]
            self._unsent.clear()
            return needs

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


# --- sessions --------------------------------------------------------------------------------

class _Session:
    def __init__(self, *, guest: DiskGuest, broker: _Broker, reader: Any, now: float) -> None:
        self.guest = guest
        self.broker = broker
        self.reader = reader
        self.lock = threading.Lock()         # one walk step or file scan at a time
        self.walk: Iterator[GuestFile] | None = None
        self.pending: list[dict[str, Any]] = []   # walk errors not yet sent
        self.used = now

    def close(self) -> None:
        self.broker.close()
        with self.lock:
            try:
                self.guest.close()
            finally:
                close = getattr(self.reader, "close", None)
                if close is not None:
                    close()


class DiskService:
    """The ``/v1/disk/*`` routes of one engine service (see the module docstring).

    ``scanning``: opens one engine session for the files of one scan call
    (``EngineService.scanning``: a context manager giving a :class:`Scan`); ``reader``:
    builds a ``DatastoreReader`` over a grant source.
    """

    def __init__(self, *, scanning: Callable[[], AbstractContextManager[Scan]],
                 reader: ReaderFactory,
                 grant_timeout: float = GRANT_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._scanning = scanning
        self._reader = reader
        self._grant_timeout = grant_timeout
        self._idle = idle_timeout
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self.granted = 0        # grants asked of the controller so far

    def routes(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        """Route -> handler, for ``EngineService(routes=...)``."""
        return {"/v1/disk/open": self.open, "/v1/disk/walk": self.walk,
                "/v1/disk/scan": self.scan, "/v1/disk/grants": self.grants,
                "/v1/disk/close": self.close}

    def _session(self, request: dict[str, Any]) -> _Session:
        with self._lock:
            found = self._sessions.get(str(request.get("session", "")))
            if found is None:
                raise EngineError("no such disk session (closed, or idle too long)")
            found.used = self._clock()
            return found

    def _reap(self) -> None:
        now = self._clock()
        with self._lock:
            idle = [k for k, s in self._sessions.items() if now - s.used > self._idle]
            gone = [self._sessions.pop(k) for k in idle]
        for session in gone:
            session.close()

    def open(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a VM's session: its disks, not opened until the first walk."""
        self._reap()
        try:
            vm = _vm_from(request["vm"])
            disks = disks_from(request["disks"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"malformed disk session request: {exc}") from exc
        broker = _Broker(timeout=self._grant_timeout)

        def grant(datastore: DatastoreInfo, path: str, *, tickets: int = 1) -> FolderGrant:
            with self._lock:
                self.granted += 1
            return broker.grant(datastore, path, tickets=tickets)

        reader = self._reader(grant=grant)
        from vsphere_av.scan.sources.disk import DiskGuest

        files: DatastoreReader = reader
        session = _Session(guest=DiskGuest(vm=vm, disks=disks, files=files), broker=broker,
                           reader=reader, now=self._clock())
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                raise EngineError(f"too many disk sessions open ({MAX_SESSIONS})")
            ident = secrets.token_urlsafe(16)
            self._sessions[ident] = session
        return {"session": ident}

    def walk(self, request: dict[str, Any]) -> dict[str, Any]:
        """The next entries of the session's walk (started, or restarted, when asked)."""
        session = self._session(request)
        roots = [str(r) for r in request.get("roots") or []]
        limit = max(1, min(int(request.get("max") or WALK_PAGE), WALK_PAGE))
        items: list[dict[str, Any]] = []
        with session.lock:
            guest = session.guest
            if session.walk is not None and request.get("restart"):
                close = getattr(session.walk, "close", None)
                if close is not None:
                    close()
                session.walk = None
            if session.walk is None:
                prune = Filters(excludes=tuple(str(p) for p in request.get("excludes") or ()),
                                includes=(), max_file_size=0, windows=guest.windows).prune

                def on_error(path: str, exc: errors.VsphereAvError) -> None:
                    session.pending.append({"error": {"path": path, **error_json(exc)}})

                session.walk = guest.walk(roots, prune=prune, on_error=on_error)
            done = False
            failure: dict[str, str] | None = None
            try:
                while len(items) < limit:
                    entry = next(session.walk, None)
                    items.extend(session.pending)
                    session.pending.clear()
                    if entry is None:
                        done = True
                        break
                    items.append({"file": file_json(entry, guest.index_key(entry))})
            except errors.VsphereAvError as exc:
                items.extend(session.pending)
                session.pending.clear()
                done, failure = True, error_json(exc)
            if done:
                session.walk = None
            answer: dict[str, Any] = {"items": items, "done": done,
                                      "bytes_read": guest.bytes_read()}
            if failure is not None:
                answer["raise"] = failure
            return answer

    def scan(self, request: dict[str, Any]) -> dict[str, Any]:
        """Read walked files on this host and scan them in one engine session: one verdict
        per file, in order, never their bytes (``{"path", "name", "owner"}`` alone: the
        one-file form of an older controller, answered as one result)."""
        session = self._session(request)
        single = "files" not in request
        files = [request] if single else request["files"]
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise EngineError("files must be a list of {path, name, owner}")
        results: list[dict[str, Any]] = []
        failure: dict[str, str] | None = None
        with session.lock, self._scanning() as scan:
            guest = session.guest
            # The call's files are read ahead (the transfer pipeline's thread: reading the
            # next file, Python parsing, while this thread matches one, YARA without the
            # interpreter lock); what is read ahead is at most one batch.
            ahead = Transfers(guest, scan, name=f"disk-{guest.vm.name}", enabled=True)
            try:
                for f in files:
                    ahead.submit(GuestFile(path=str(f.get("path", "")), type="file", size=0,
                                           name=str(f.get("name") or "")))
                for f in files:
                    try:
                        results.append({"outcome": self._verdict(scan, ahead.take(), f)})
                    except errors.ConnectionLost as exc:
                        failure = error_json(exc)   # an outage: no file after it is read
                        break
                    except errors.VsphereAvError as exc:
                        results.append({"raise": error_json(exc)})     # this file's own error
            finally:
                ahead.close()
            read = guest.bytes_read()
        if single:
            return {**(results[0] if results else {"raise": failure}), "bytes_read": read}
        answer: dict[str, Any] = {"results": results, "bytes_read": read}
        if failure is not None:
            answer["raise"] = failure
        return answer

    @staticmethod
    def _verdict(scan: Scan, fetched: Fetched, f: dict[str, Any]) -> dict[str, Any]:
        """One file read ahead, matched: its FileOutcome JSON; raises what broke the read."""
        if fetched.error is not None:
            raise fetched.error
        received = fetched.take()
        if received is None:
            raise errors.ConnectionLost(f"{fetched.entry.path}: not read (the scan stopped)")
        name = f.get("name")
        return scan.scan_received(received, path=fetched.entry.path,
                                  name=str(name) if name else None,
                                  owner=str(f.get("owner") or ""))

    def grants(self, request: dict[str, Any]) -> dict[str, Any]:
        """The controller's long poll: grants in, the readers' needs out."""
        try:
            session = self._session(request)
        except Exception:
            return {"needs": [], "closed": True}
        wait = request.get("wait")
        wait = min(float(wait), MAX_POLL_WAIT) if isinstance(wait, int | float) else 0.0
        needs = session.broker.exchange(request.get("answers"), wait=max(0.0, wait))
        return {"needs": needs, "closed": session.broker.closed}

    def close(self, request: dict[str, Any]) -> dict[str, Any]:
        """End a session: its disks closed, its waiting reads failed."""
        with self._lock:
            session = self._sessions.pop(str(request.get("session", "")), None)
        if session is None:
            return {"closed": True, "bytes_read": 0}
        session.broker.close()
        read = session.guest.bytes_read()
        session.close()
        return {"closed": True, "bytes_read": read}
