"""One VM's scan job: walk its files, filter by policy, stream through the engine, remediate.

Called by ``app.App`` (CLI scans and the controller's workers), one call of :func:`scan_vm`
per VM job. Everything it touches comes in as keyword-only collaborators: the file source
(``scan.sources.guest.GuestAccess``: ``vsphere.guest.GuestFiles`` or the disk reader
``scan.sources.disk.DiskGuest``), an engine ``Session`` (one signature version), the
``StateStore``, the ``AuditLog``, the ``Quarantine`` and the clock. It uses
``scan.filters`` (the policy's paths), ``scan.sources.guest.Transfers`` (the VM's transfer
slot and read-ahead) and ``scan.remediate.Remediation`` (the policy's action on each
infected file). It never raises for one VM's trouble: the result says what happened and why.

Pipeline: each job starts one transfer thread (joined before ``scan_vm`` returns) that
receives the next files into the engine, at most ``PREFETCH_AHEAD`` files ahead, while the
calling thread matches the previous one (``scan.sources.guest``). A session that scans files
where they are read (``BatchScanner``: a disk read by the host's appliance) gets them in
batches instead, up to ``BATCH_AHEAD`` files ahead, so one batch is scanned there while the
calling thread books the verdicts of the previous one, in walk order. Everything else
(filters, index, counters, remediation, audit, progress) stays in the calling thread.

Crash safety (write-ahead): a detection's audit entry and its store row (action
``pending``) are durable before the guest is changed (:meth:`_Job._infected`); the outcome
then updates the row and adds the ``remediation`` entry. A run killed in between leaves a
pending row that the VM's next scan finishes exactly once (``Remediation.recover``).

Resuming (time windows): ``result.resume_point`` is the last guest path, in walk order, that
was fully processed together with every file before it; a scan given it as ``resume_after``
skips the walk up to and including that path (the controller keeps it in the job), and
takes over the incomplete paths of the interrupted run before it (``_carry_incomplete``).

Outages: vCenter or the host not answering (``errors.ConnectionLost`` from the guest adapter,
also when it breaks a download off) is never one file's error: the scan ends failed and the
VM unprotected (``_Job._stopped``); the controller retries the job.

Counting rules (the summary a person reads):
  scanned    files read and given a verdict (clean or infected)
  unchanged  not downloaded: same path, size and mtime already found clean under this
             signature version (in this VM, or in any VM when sharing is on)
  skipped    listed but not scanned on purpose: over ``max_file_size`` with
             ``scan.skip_large = true`` (``skipped_by_policy``), or gone from the guest
             between listing and download (``vanished``)
  incomplete files and directories not fully checked: over ``max_file_size`` (policy not
             skipping them), partly checked by the engine (an archive over a limit with
             ``alert_exceeds_max`` off, an encrypted member), unreadable after one retry
             (``errors`` counts those), listed but not openable, unreadable directories

"Protected" means every byte was checked: a scan with anything incomplete and no detection
ends ``incomplete`` (the VM ``unprotected``, CLI exit 2), never ``clean``. Each such path is
kept with its reason in the state store (``StateStore.scan_files``, per scan) and in one
``scan.incomplete`` audit entry; the result holds the first ``FILES_KEPT`` for display.

Vanished or not: a download that answers "file not found" is asked about again by listing
the file's directory (``GuestFiles.stat``). Only a file that is no longer listed is gone
(nothing left to be a risk); one still listed (a name the guest tools cannot hand back, a
race with a rename) or whose directory cannot be listed is incomplete.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from vsphere_av import errors
from vsphere_av.config import ScanPolicy
from vsphere_av.engine import TOO_LARGE
from vsphere_av.models import (
    INFECTED,
    PROTECTED,
    UNPROTECTED,
    UNREACHABLE,
    Audit,
    FileRecord,
    GuestFile,
    VmId,
    VmInfo,
)
from vsphere_av.scan.filters import Filters
from vsphere_av.scan.remediate import Remediation, VmAudit
from vsphere_av.scan.sources.guest import (
    BATCH_FILES,
    BatchScanner,
    Fetched,
    GuestAccess,
    Receiver,
    StreamScanner,
    Transfers,
)
from vsphere_av.store.state import PENDING, VIA_DISK, VIA_GUEST

log = logging.getLogger(__name__)

INDEX_BATCH = 200
FILES_KEPT = 1000                    # incomplete / skipped paths a result holds (all are stored)
PREFETCH_AHEAD = 2                   # files downloaded ahead of the one being matched
BATCH_AHEAD = 2 * BATCH_FILES        # files handed to a batch scanner ahead of the one booked:
                                     # one batch in flight, the next one queued

# Scan statuses (per VM, in results and the scans table).
CLEAN = "clean"
FOUND = "infected"
SKIPPED = "skipped"
INCOMPLETE = "incomplete"
UNREACHABLE_STATUS = "unreachable"
ERROR = "error"

REASON_LOGIN = "invalid guest login"
REASON_TOOLS = "guest operations unavailable"
REASON_OFF = "powered off"


# --- collaborator interfaces (what this module needs, nothing more) ---------------------------

class EngineSession(StreamScanner, Protocol):
    """An engine session pinned to one signature version (``engine.Session``)."""

    version: int

    def lookup(self, sha256: str, *, path: str) -> Any: ...


@runtime_checkable
class ReceivingSession(EngineSession, Receiver, Protocol):
    """An in-process engine session, whose two halves can run in two threads."""

    def scan_received(self, received: Any, *, path: str, name: str | None = None,
                      owner: str = "") -> Any: ...


def protection_after(status: str, *, previous: str | None) -> str | None:
    """The VM protection state a scan result leads to (None: leave it as it was)."""
    if status == CLEAN:
        return PROTECTED
    if status == FOUND:
        return INFECTED
    if status == UNREACHABLE_STATUS:
        return INFECTED if previous == INFECTED else UNREACHABLE
    if status == INCOMPLETE:
        return INFECTED if previous == INFECTED else UNPROTECTED
    if status == SKIPPED:
        return UNPROTECTED if previous in (None, UNPROTECTED, UNREACHABLE) else None
    return UNREACHABLE if previous != INFECTED else None


# --- results ---------------------------------------------------------------------------------

@dataclass
class Found:
    """One infected file and what was done about it."""

    path: str
    threat: str
    sha256: str
    size: int
    action: str                  # reported | quarantined | deleted | failed
    member: str = ""
    detail: str = ""
    quarantine_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "threat": self.threat, "sha256": self.sha256, "size": self.size,
                "action": self.action, "member": self.member, "detail": self.detail,
                "quarantine_id": self.quarantine_id}


@dataclass
class ScanResult:
    """What one VM's scan did."""

    vm: str
    moref: str
    host: str
    status: str = CLEAN
    reason: str = ""
    full: bool = False
    signature_version: int | None = None
    scanned: int = 0
    unchanged: int = 0
    shared: int = 0
    skipped: int = 0
    skipped_by_policy: int = 0
    vanished: int = 0
    incomplete: int = 0
    errors: int = 0
    bytes: int = 0
    duration: float = 0.0
    found: list[Found] = field(default_factory=list)
    scan_id: int | None = None
    recovered: int = 0           # detections of an earlier, crashed run finished by this one
    resumed_from: str = ""       # the walk skipped everything up to and including this path
    resume_point: str = ""       # last guest path (walk order) fully processed, all before it too
    outage: bool = False         # vCenter or the host stopped answering: failed, retry later
    via: str = "guest"           # how the files were read: guest (Guest Operations) | disk
    disk_read: int = 0           # disk scans: bytes fetched from the datastores
    # The first FILES_KEPT incomplete and skipped-by-policy paths (all are in the store):
    # {"path", "kind" (incomplete | skipped), "reason"}.
    files: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The counters stored with the scan record."""
        return {"scanned": self.scanned, "unchanged": self.unchanged, "skipped": self.skipped,
                "incomplete": self.incomplete, "errors": self.errors,
                "detections": len(self.found), "bytes": self.bytes}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``scan --json``)."""
        return {"vm": self.vm, "moref": self.moref, "host": self.host, "status": self.status,
                "reason": self.reason, "full": self.full,
                "signature_version": self.signature_version, "scanned": self.scanned,
                "unchanged": self.unchanged, "shared": self.shared, "skipped": self.skipped,
                "skipped_by_policy": self.skipped_by_policy, "vanished": self.vanished,
                "incomplete": self.incomplete, "errors": self.errors, "bytes": self.bytes,
                "duration": round(self.duration, 3), "recovered": self.recovered,
                "resumed_from": self.resumed_from, "resume_point": self.resume_point,
                "via": self.via, "disk_read": self.disk_read,
                "detections": [f.as_dict() for f in self.found],
                "incomplete_files": [f for f in self.files if f["kind"] == INCOMPLETE],
                "skipped_files": [f for f in self.files if f["kind"] == SKIPPED],
                "files_listed": len(self.files),
                "files_total": self.incomplete + self.skipped_by_policy}


@dataclass(frozen=True)
class Progress:
    """A progress tick for displays."""

    vm: str
    files: int
    bytes: int
    path: str
    done: bool = False


# --- the job ---------------------------------------------------------------------------------

def scan_vm(*, vm: VmInfo, guest: GuestAccess, session: EngineSession, store: Any, audit: Audit,
            quarantine: Any, policy: ScanPolicy, full: bool = False, actor: str = "",
            engine_max_file_size: int | None = None,
            share_across_vms: bool | None = None,
            clock: Callable[[], float] = time.monotonic,
            on_progress: Callable[[Progress], None] | None = None,
            resume_after: str = "") -> ScanResult:
    """Scan one VM's files and remediate; never raises for the VM's own trouble.

    ``resume_after``: continue a scan that was stopped (a time window closed) by skipping
    every file the walk yields up to and including that path (the previous run's
    ``result.resume_point``). The walk order is the guest listing's, the same on every run;
    when the path is not met (deleted meanwhile), the walk starts again from the beginning.
    """
    job = _Job(vm=vm, guest=guest, session=session, store=store, audit=audit,
               quarantine=quarantine, policy=policy, full=full, actor=actor,
               share=policy.share_across_vms if share_across_vms is None else share_across_vms,
               engine_max=engine_max_file_size, clock=clock, on_progress=on_progress,
               resume_after=resume_after)
    return job.run()


class _Job:
    def __init__(self, *, vm: VmInfo, guest: GuestAccess, session: EngineSession, store: Any,
                 audit: Audit, quarantine: Any, policy: ScanPolicy, full: bool, actor: str,
                 share: bool, engine_max: int | None, clock: Callable[[], float],
                 on_progress: Callable[[Progress], None] | None, resume_after: str = "") -> None:
        self.vm, self.guest, self.session, self.store = vm, guest, session, store
        self.policy, self.full, self.share = policy, full, share
        self.clock, self.on_progress = clock, on_progress
        self.filters = Filters.from_policy(policy, windows=vm.is_windows, engine_max=engine_max)
        # Audit details always name the VM and its host, so storms can be checked afterwards.
        self._audit = VmAudit(log=audit, actor=actor, vm=vm)
        host = vm.host.name if vm.host else ""
        self.reads_disks = bool(getattr(type(guest), "reads_disks", False))
        self.result = ScanResult(vm=vm.name, moref=vm.moref, host=host, full=full,
                                 via=VIA_DISK if self.reads_disks else VIA_GUEST)
        self.pending: list[FileRecord] = []
        self.resume_after = resume_after
        # Files of the walk (in its order) not yet below the resume point: [path, done].
        self._inflight: collections.deque[list[Any]] = collections.deque()
        self._inflight_by_path: dict[str, list[Any]] = {}
        self.receiver = session if isinstance(session, ReceivingSession) else None
        batcher = session if isinstance(session, BatchScanner) else None
        self.transfers = Transfers(
            guest, self.receiver, name=vm.name, batcher=batcher,
            enabled=batcher is not None or (
                self.receiver is not None
                and bool(getattr(type(guest), "local_downloads", False))))
        self.ahead = BATCH_AHEAD if batcher is not None else PREFETCH_AHEAD
        # Who changes files in the guest: the source itself, unless it says otherwise (a disk
        # reader never writes; it names the guest access to use, or None for "not now").
        self.remedies = Remediation(vm=vm, source=guest, policy=policy, store=store,
                                    quarantine=quarantine, audit=self._audit,
                                    slot=self.transfers.slot,
                                    max_file_size=self.filters.max_file_size)

    def run(self) -> ScanResult:
        r = self.result
        started = self.clock()
        previous = self.store.vm_state(self.vm.moref)
        prev_state = previous.state if previous else None
        if not self.vm.powered_on and not self.reads_disks:
            r.status, r.reason = SKIPPED, REASON_OFF
            self.store.upsert_vm(self.vm)
            self._audit("scan.skipped", reason=REASON_OFF, power_state=self.vm.power_state)
            self._set_protection(prev_state)
            return r
        r.signature_version = self.session.version
        r.scan_id = self.store.begin_scan(self.vm, full=self.full,
                                          signature_version=r.signature_version, via=r.via)
        resumed = {"resumed_from": self.resume_after} if self.resume_after else {}
        self._audit("scan.start", full=self.full, signature_version=r.signature_version,
                    scan_id=r.scan_id, **resumed)
        try:
            self._recover_pending(walked=False)
            self._walk()
            if not r.resumed_from:            # a resumed walk did not meet every file
                self._recover_pending(walked=True)
            else:
                self._carry_incomplete()
        except errors.ConnectionLost as exc:
            return self._stopped(exc, started=started, prev_state=prev_state)
        except errors.GuestLoginError:
            r.status, r.reason = UNREACHABLE_STATUS, REASON_LOGIN
        except errors.GuestUnavailable:
            r.status, r.reason = UNREACHABLE_STATUS, REASON_TOOLS
        except errors.InvalidPowerState:
            r.status, r.reason = SKIPPED, REASON_OFF
        except errors.NotFound:
            r.status, r.reason = ERROR, "VM no longer exists"
        except errors.VsphereError as exc:
            r.status, r.reason = UNREACHABLE_STATUS, str(exc)
        except _StopRequested as stop:
            return self._stopped(stop.cause, started=started, prev_state=prev_state)
        except errors.DiskError as exc:
            # The disks could not be read (or hold nothing to read): never clean, and the
            # VM unprotected with the reason, as for any path not fully checked.
            r.status, r.reason = INCOMPLETE, str(exc)
        except errors.VsphereAvError as exc:
            r.status, r.reason = ERROR, str(exc)
        except Exception as exc:
            # A bug: close the records so start/end pairs stay balanced, leave protection as
            # it was, and let the caller see the exception.
            self._flush_index()
            r.status, r.reason = ERROR, f"interrupted: {exc}"
            r.duration = self.clock() - started
            self.store.finish_scan(r.scan_id, status=r.status, reason=r.reason, counts=r.counts())
            self._audit("scan.end", status=r.status, reason=r.reason, scan_id=r.scan_id,
                        signature_version=r.signature_version, **r.counts())
            raise
        finally:
            self._flush_index()
        if r.found:
            interrupted = f"; scan interrupted: {r.reason}" if r.reason else ""
            r.status = FOUND
            r.reason = self._found_reason() + interrupted + self._incomplete_reason("; ")
        elif r.status == CLEAN and r.incomplete:
            r.status = INCOMPLETE
            r.reason = self._incomplete_reason("")
        elif r.status == INCOMPLETE and r.incomplete:
            r.reason += self._incomplete_reason("; ")
        elif r.status == CLEAN:
            r.reason = "clean"
        r.duration = self.clock() - started
        self.store.finish_scan(r.scan_id, status=r.status, reason=r.reason, counts=r.counts())
        self._set_protection(prev_state)
        self._audit("scan.end", status=r.status, reason=r.reason, scan_id=r.scan_id,
                    signature_version=r.signature_version, **r.counts())
        if self.on_progress:
            try:
                self.on_progress(Progress(vm=self.vm.name, files=r.scanned + r.unchanged,
                                          bytes=r.bytes, path="", done=True))
            except Exception as exc:
                # The scan is over and recorded: a callback that would stop it (a window that
                # closed at the last file) has nothing left to stop.
                log.debug("%s: progress callback at the end: %s", self.vm.name, exc)
        return r

    def _stopped(self, cause: Exception, *, started: float, prev_state: str | None) -> ScanResult:
        """The scan stopped before reading everything: the progress callback stopped it
        (shutdown, a time window closed) or vCenter / the host stopped answering.

        The records are closed (start/end pairs stay balanced). Detections already made stand.
        A stop the controller asked for leaves protection as it was: a VM is not unreachable
        because its window closed. An outage (``ConnectionLost``, raised by the guest adapter
        for the whole connection, never for one file) fails the scan: the VM is
        ``unprotected`` with the reason (an infected one stays infected) and ``outage`` tells
        the controller to retry once vCenter answers. A stop asked for with a
        ``VsphereAvError`` returns the result, whose ``resume_point`` says where to continue;
        any other exception is raised again.
        """
        r = self.result
        self._flush_index()
        r.outage = isinstance(cause, errors.ConnectionLost)
        r.reason = (f"scan interrupted: connection lost ({cause})" if r.outage
                    else f"interrupted: {cause}")
        r.status = ERROR
        if r.found:
            r.status = FOUND
            r.reason = (f"{self._found_reason()}; "
                        f"{r.reason if r.outage else 'scan ' + r.reason}")
        r.duration = self.clock() - started
        self.store.finish_scan(r.scan_id, status=r.status, reason=r.reason, counts=r.counts())
        if r.found:
            self._set_protection(prev_state)
        elif r.outage and prev_state != INFECTED:
            self.store.set_protection(self.vm.moref, state=UNPROTECTED, reason=r.reason)
        self._audit("scan.end", status=r.status, reason=r.reason, scan_id=r.scan_id,
                    signature_version=r.signature_version, **r.counts())
        if isinstance(cause, errors.VsphereAvError):
            return r
        raise cause

    def _carry_incomplete(self) -> None:
        """A resumed scan answers for the part before the resume point too: what the
        stopped run could not check there is incomplete in this one as well."""
        previous = self.store.last_finished_scan(self.vm.moref)
        if previous is None or "interrupted: " not in str(previous["reason"]):
            return
        for f in self.store.scan_files(previous["id"]):
            if f["kind"] == INCOMPLETE:
                self._unscanned(f["path"], kind=INCOMPLETE, reason=f["reason"])

    def _incomplete_reason(self, prefix: str) -> str:
        r = self.result
        if not r.incomplete:
            return ""
        first = next((f for f in r.files if f["kind"] == INCOMPLETE), None)
        example = f", e.g. {first['path']}: {first['reason']}" if first else ""
        return f"{prefix}incomplete: {r.incomplete} path(s) not fully checked{example}"

    def _unscanned(self, path: str, *, kind: str, reason: str) -> None:
        """A path not fully checked (``INCOMPLETE``) or skipped by policy (``SKIPPED``).

        Counted, stored with the scan, audited (one entry per path) and kept in the result
        up to ``FILES_KEPT``.
        """
        r = self.result
        if kind == INCOMPLETE:
            r.incomplete += 1
        else:
            r.skipped += 1
            r.skipped_by_policy += 1
        if len(r.files) < FILES_KEPT:
            r.files.append({"path": path, "kind": kind, "reason": reason})
        if r.scan_id is not None:
            self.store.add_scan_file(r.scan_id, path=path, kind=kind, reason=reason)
        self._audit("scan.incomplete" if kind == INCOMPLETE else "scan.skipped_file",
                    path=path, reason=reason, scan_id=r.scan_id)
        log.info("%s: %s %s: %s", self.vm.name, kind, path, reason)

    def _too_large(self, path: str, size: int) -> None:
        reason = f"{TOO_LARGE} ({size} > {self.filters.max_file_size} bytes)"
        self._unscanned(path, kind=SKIPPED if self.policy.skip_large else INCOMPLETE,
                        reason=reason)

    def _gone(self, path: str, exc: errors.GuestError) -> bool:
        """After "file not found": True when the path is no longer listed (really gone)."""
        stat = getattr(self.guest, "stat", None)
        if stat is None:
            return False                      # no way to ask: not proven gone
        try:
            return stat(path) is None
        except (errors.GuestLoginError, errors.GuestUnavailable):
            raise
        except errors.GuestError:
            return False                      # cannot tell: not proven gone

    def _found_reason(self) -> str:
        threats = sorted({f.threat for f in self.result.found})
        actions = sorted({f.action for f in self.result.found})
        return (f"{len(self.result.found)} detection(s): {', '.join(threats)}"
                f" ({', '.join(actions)})")

    def _set_protection(self, prev_state: str | None) -> None:
        r = self.result
        state = protection_after(r.status, previous=prev_state)
        if state is None:
            return
        clean_version = r.signature_version if state == PROTECTED else None
        self.store.set_protection(self.vm.moref, state=state, reason=r.reason or r.status,
                                  clean_signature_version=clean_version,
                                  scanned=r.status in (CLEAN, FOUND, INCOMPLETE),
                                  full=self.full and r.status in (CLEAN, FOUND))

    def _walk(self) -> None:
        roots = self.policy.windows_roots if self.vm.is_windows else self.policy.linux_roots

        failed_roots: list[str] = []

        def on_error(path: str, exc: errors.VsphereAvError) -> None:
            if path in roots:
                failed_roots.append(f"{path} ({exc})")
            elif isinstance(exc, errors.GuestFileNotFound) and self._gone(path, exc):
                self.result.vanished += 1      # a directory removed while we walked
                self.result.skipped += 1
                return
            self.result.errors += 1
            # A disk reader's messages name the disk, volume or file and say what is wrong.
            reason = str(exc) if isinstance(exc, errors.DiskError) \
                else f"cannot list directory: {exc}"
            self._unscanned(path, kind=INCOMPLETE, reason=reason)

        transfers = self.transfers
        try:
            try:
                for entry in self._entries(list(roots), on_error):
                    if not self.filters.wanted(entry.path):
                        continue
                    self._track(entry.path)
                    if self._settled(entry):
                        self._done(entry.path)
                        continue
                    if not transfers.enabled:
                        self._finish(entry, None)
                        continue
                    transfers.submit(entry)
                    while transfers.pending > self.ahead:
                        fetched = transfers.take()
                        self._finish(fetched.entry, fetched)
            except errors.VsphereAvError:
                self._drain(transfers)        # files already read still get their verdict
                raise
            self._drain(transfers)
        finally:
            transfers.close()
        if roots and len(set(failed_roots)) == len(roots):
            # Nothing was read: this is not a clean scan.
            raise errors.GuestError(f"cannot list {', '.join(failed_roots)}")

    def _entries(self, roots: list[str],
                 on_error: Callable[[str, errors.VsphereAvError], None]) -> Iterator[GuestFile]:
        """The walk, past the resume point when there is one (from the start if it is gone)."""
        skip_to = self.resume_after
        if skip_to:
            passed = 0
            met = False
            for entry in self.guest.walk(roots, prune=self.filters.prune, on_error=on_error):
                if met:
                    yield entry
                    continue
                passed += 1
                if entry.path == skip_to:
                    met = True
                    self.result.resumed_from = skip_to
                    self.result.resume_point = skip_to
            if met:
                return
            log.info("%s: resume point %s not met (%d files listed): scanning from the start",
                     self.vm.name, skip_to, passed)
            self._audit("scan.resume_lost", resume_after=skip_to, scan_id=self.result.scan_id)
        yield from self.guest.walk(roots, prune=self.filters.prune, on_error=on_error)

    def _track(self, path: str) -> None:
        node = [path, False]
        self._inflight.append(node)
        self._inflight_by_path[path] = node

    def _done(self, path: str) -> None:
        """A file is fully processed; move the resume point over every finished prefix."""
        node = self._inflight_by_path.pop(path, None)
        if node is None:
            return
        node[1] = True
        while self._inflight and self._inflight[0][1]:
            self.result.resume_point = self._inflight.popleft()[0]

    def _drain(self, transfers: Transfers) -> None:
        while transfers.pending:
            fetched = transfers.take()
            self._finish(fetched.entry, fetched)

    def _settled(self, entry: GuestFile) -> bool:
        """True when the file needs no download (too large, unchanged, known elsewhere)."""
        r = self.result
        version = self.session.version
        if entry.size > self.filters.max_file_size:
            self._too_large(entry.path, entry.size)
            return True
        if not self.full and entry.mtime:
            owner, key, mtime = self._index_key(entry)
            known = self.store.file_record(owner, key)
            if (known is not None and known.verdict == "clean" and known.size == entry.size
                    and known.mtime == mtime and known.signature_version == version):
                r.unchanged += 1
                self._done(entry.path)
                self._tick(entry.path)
                return True
            if self.share and not self.reads_disks and self._reuse_shared(entry, version):
                return True
        return False

    def _finish(self, entry: GuestFile, fetched: Fetched | None) -> None:
        """Scan a file (already fetched, or downloaded now), count it, remediate, index it."""
        ticked = self._process(entry, fetched)
        self._done(entry.path)
        if ticked:
            # Last: a progress callback that stops the scan here leaves this file done.
            self._tick(entry.path)

    def _process(self, entry: GuestFile, fetched: Fetched | None) -> bool:
        """The work of :meth:`_finish`; True when the file was read (a progress tick is due)."""
        r = self.result
        outcome = self._download_and_scan(entry, fetched)
        if outcome is None:
            return False
        if outcome.status == "skipped":
            if outcome.reason == TOO_LARGE:
                self._too_large(entry.path, outcome.size)
            else:
                self._unscanned(entry.path, kind=INCOMPLETE,
                                reason=f"not fully checked: {outcome.reason}")
            return False
        if outcome.status == "error":
            r.errors += 1
            self._unscanned(entry.path, kind=INCOMPLETE, reason=f"unreadable: {outcome.reason}")
            return False
        r.scanned += 1
        r.bytes += outcome.size
        if outcome.status == "infected":
            self._infected(entry, outcome)
        else:
            self._index(entry, outcome.sha256, "clean")
        return True

    def _tick(self, path: str) -> None:
        if self.on_progress:
            r = self.result
            try:
                self.on_progress(Progress(vm=self.vm.name, files=r.scanned + r.unchanged,
                                          bytes=r.bytes, path=path))
            except Exception as exc:
                raise _StopRequested(exc) from exc

    def _reuse_shared(self, entry: GuestFile, version: int) -> bool:
        shared = self.store.shared_record(path=entry.path, size=entry.size, mtime=entry.mtime,
                                          signature_version=version)
        if shared is None:
            return False
        outcome = self.session.lookup(shared.sha256, path=entry.path)
        if outcome is None or outcome.status != "clean":
            return False
        self.result.unchanged += 1
        self.result.shared += 1
        self._index(entry, shared.sha256, "clean")
        return True

    def _download_and_scan(self, entry: GuestFile, fetched: Fetched | None = None) -> Any:
        r = self.result
        for attempt in (1, 2):
            try:
                if attempt == 1 and fetched is not None and not fetched.deferred:
                    if fetched.error is not None:
                        raise fetched.error
                    if fetched.outcome is not None:
                        return fetched.outcome        # scanned where it was read (a batch)
                    receiver = self.receiver
                    assert receiver is not None     # only a receiving session fetches ahead
                    return receiver.scan_received(fetched.take(), path=entry.path,
                                                  name=entry.name)
                return self.transfers.stream(entry, self.session)
            except errors.GuestFileNotFound as exc:
                self.store.forget_file(*self._index_key(entry)[:2])
                if self._gone(entry.path, exc):
                    r.vanished += 1
                    r.skipped += 1
                else:
                    r.errors += 1
                    self._unscanned(entry.path, kind=INCOMPLETE,
                                    reason=f"listed but cannot be opened: {exc}")
                return None
            except (errors.GuestLoginError, errors.GuestUnavailable, errors.InvalidPowerState,
                    errors.NotFound, errors.ConnectionLost):
                raise                         # the VM's or the connection's trouble, not the file's
            except (errors.TransientError, errors.GuestError, errors.DiskFileError) as exc:
                if attempt == 2:
                    r.errors += 1
                    self._unscanned(entry.path, kind=INCOMPLETE, reason=f"unreadable: {exc}")
                    return None
        return None

    def _infected(self, entry: GuestFile, outcome: Any) -> None:
        # A YARA rule and a hash list naming the same threat in the same member are one
        # finding for the people reading the report, not two.
        distinct = {(d.threat, d.member): d for d in reversed(outcome.detections or ())}
        detections = sorted(distinct.values(), key=list(outcome.detections).index)
        threat = detections[0].threat if detections else "unknown"
        # Write-ahead: the detection (audit entry and a "pending" row) is durable before the
        # guest is changed. A row left pending by a run that died mid-remediation, for the
        # same bytes at the same path, is this finding: it is completed, not repeated.
        held = {(p.threat, p.member): p for p in self.store.pending_detections(self.vm.moref)
                if p.path == entry.path and p.sha256 == outcome.sha256
                and p.scan_id != self.result.scan_id}
        ids: list[Any] = []
        for d in detections:
            earlier = held.get((d.threat, d.member))
            if earlier is not None:
                ids.append(earlier.id)        # its detection entry is in the audit log already
                continue
            self._audit("detection", path=entry.path, threat=d.threat, rule=d.rule,
                        source=d.source, member=d.member, sha256=outcome.sha256,
                        size=outcome.size, scan_id=self.result.scan_id)
            ids.append(self.store.add_detection(
                scan_id=self.result.scan_id, vm_moref=self.vm.moref, vm_name=self.vm.name,
                path=entry.path, threat=d.threat, sha256=outcome.sha256, size=outcome.size,
                rule=d.rule, source=d.source, member=d.member, action=PENDING,
                detail="remediation in progress"))
        action, qid, detail = self.remedies.act(entry, sha256=outcome.sha256, size=outcome.size,
                                                threat=threat)
        for det_id, d in zip(ids, detections, strict=True):
            self.store.finish_detection(det_id, action=action, detail=detail, quarantine_id=qid)
            self.result.found.append(Found(path=entry.path, threat=d.threat, sha256=outcome.sha256,
                                           size=outcome.size, action=action, member=d.member,
                                           detail=detail, quarantine_id=qid))
        if action in ("quarantined", "deleted"):
            self.store.forget_file(*self._index_key(entry)[:2])
        else:
            self._index(entry, outcome.sha256, "infected")

    def _recover_pending(self, *, walked: bool) -> None:
        """Finish what a run that died mid-remediation left pending (``Remediation.recover``)."""
        for _ in self.remedies.recover(scan_id=self.result.scan_id, walked=walked):
            self.result.recovered += 1

    def _index_key(self, entry: GuestFile) -> tuple[VmId, str, str]:
        """(owner, key, mtime) of the file's incremental index row.

        The guest path by default; a disk reader keys its rows by disk, volume and file id
        under an owner that is not the VM's moref, so the two indexes never mix.
        """
        index_key = getattr(self.guest, "index_key", None)
        if index_key is None:
            return self.vm.moref, entry.path, entry.mtime
        owner, key, mtime = index_key(entry)
        return VmId(owner), str(key), str(mtime)

    def _index(self, entry: GuestFile, sha256: str, verdict: str) -> None:
        if not entry.mtime or not sha256:
            return
        owner, key, mtime = self._index_key(entry)
        self.pending.append(FileRecord(vm_moref=owner, path=key, size=entry.size,
                                       mtime=mtime, sha256=sha256,
                                       signature_version=self.session.version, verdict=verdict))
        if len(self.pending) >= INDEX_BATCH:
            self._flush_index()

    def _flush_index(self) -> None:
        if self.pending:
            self.store.record_files(self.pending)
            self.pending = []


class _StopRequested(Exception):
    """The progress callback raised ``cause``: stop the scan where it is."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause
