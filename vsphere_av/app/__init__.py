"""The application: the one face the CLI (``cli``), the REST API (``api``) and the demo
(``lab.demo``) call, and the only place threads start.

:class:`App` wires the vSphere adapter (``vsphere.connection`` / ``inventory`` / ``guest`` /
``disks`` / ``tagging``), the engine (local, or the host's appliance through ``fleet``), the
stores (``store.state``, ``store.audit``, ``store.quarantine``) and one VM's scan
(``scan.scan_vm``, remediation in ``scan.remediate``). ``App.scan`` runs the controller's
worker loop (``controller.working``) over a queue with the same per-host
(``scan.per_host_limit``) and global (``scan.global_limit``) caps; :func:`start_controller`
builds the controller for ``vsphere-av serve`` and starts its loops, the console's server
included when the CLI hands one in.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vsphere_av import errors
from vsphere_av.config import SCAN_VIA, Settings
from vsphere_av.controller.scheduling import Scheduler
from vsphere_av.controller.workers import working
from vsphere_av.engine import Engine
from vsphere_av.models import INFECTED, UNPROTECTED, Job, Priority, QuarantineItem, VmId, VmInfo
from vsphere_av.scan import (
    ERROR,
    FOUND,
    INCOMPLETE,
    UNREACHABLE_STATUS,
    Progress,
    ScanResult,
    remediate,
    scan_vm,
)
from vsphere_av.store.audit import AuditLog, current_actor
from vsphere_av.store.quarantine import Quarantine
from vsphere_av.store.state import StateStore

log = logging.getLogger(__name__)


# Scan snapshots are named "<prefix><machine>-<pid>-<random>": found by the prefix after a
# crash, and left alone while the process that took them still runs on this machine.
SNAPSHOT_PREFIX = "vsphere-av-scan-"


def scan_route(via: str, *, powered_on: bool, credentials: bool, tools_running: bool) -> str:
    """``"disk"`` or ``"guest"``: how a VM is read for ``via`` (``scan.via`` / ``--via``).

    ``auto`` reads through the disks a VM that is not running, has no guest credentials or
    no running VMware Tools (Guest Operations could not read it), the guest otherwise.
    """
    if via not in SCAN_VIA:
        raise errors.ConfigError(f"--via {via!r}: must be one of {', '.join(SCAN_VIA)}")
    if via != "auto":
        return via
    return "guest" if powered_on and credentials and tools_running else "disk"


def scan_snapshot_name() -> str:
    """A new scan snapshot's name (``vsphere-av-scan-<machine>-<pid>-<random>``)."""
    return f"{SNAPSHOT_PREFIX}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def snapshot_in_use(name: str) -> bool:
    """True when a scan snapshot's name says another process on this machine still runs.

    Ours (this pid) cannot be in use at start: it is a dead run's whose pid came back.
    """
    machine, _, _random = name.removeprefix(SNAPSHOT_PREFIX).rpartition("-")
    machine, _, pid = machine.rpartition("-")
    if machine != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True         # alive, another user's
    return True


@dataclass
class ScanReport:
    """The outcome of one `vsphere-av scan` run over several VMs."""

    results: list[ScanResult]
    signature_version: int | None
    duration: float
    peak_per_host: dict[str, int] = field(default_factory=dict)

    def exit_code(self) -> int:
        """0 clean, 1 something detected, 2 a VM not (fully) scanned (detection wins)."""
        if any(r.status == FOUND for r in self.results):
            return 1
        if any(r.status in (ERROR, UNREACHABLE_STATUS, INCOMPLETE) for r in self.results):
            return 2
        return 0

    def summary(self) -> dict[str, Any]:
        """Totals over all VMs."""
        total: dict[str, Any] = {"vms": len(self.results)}
        for status in ("clean", "infected", "incomplete", "skipped", "unreachable", "error"):
            total[status] = sum(1 for r in self.results if r.status == status)
        for key in ("scanned", "unchanged", "shared", "skipped_files", "incomplete_files",
                    "vanished", "errors", "bytes"):
            attr = {"skipped_files": "skipped", "incomplete_files": "incomplete"}.get(key, key)
            total[key] = sum(getattr(r, attr) for r in self.results)
        total["detections"] = sum(len(r.found) for r in self.results)
        total["duration"] = round(self.duration, 3)
        return total

    def as_dict(self, *, files_of: Callable[[Any], list[dict[str, str]]] | None = None
                ) -> dict[str, Any]:
        """JSON-ready form (``scan --json``).

        ``files_of(scan_id)`` (the store's ``scan_files``) gives the complete lists of
        incomplete and skipped paths when a result holds only the first ``FILES_KEPT``.
        """
        vms = [r.as_dict() for r in self.results]
        for doc, r in zip(vms, self.results, strict=True):
            if files_of is not None and r.scan_id is not None \
                    and doc["files_listed"] < doc["files_total"]:
                files = files_of(r.scan_id)
                doc["incomplete_files"] = [f for f in files if f["kind"] == INCOMPLETE]
                doc["skipped_files"] = [f for f in files if f["kind"] != INCOMPLETE]
                doc["files_listed"] = len(files)
        return {"vms": vms, "summary": self.summary(),
                "signature_version": self.signature_version, "peak_per_host": self.peak_per_host}


class App:
    """Everything a guest-scan command needs, opened once per command (or controller)."""

    def __init__(self, settings: Settings, *, actor: str | None = None) -> None:
        self.settings = settings
        self.actor = actor or current_actor(state_dir=settings.state_dir)
        self.store = StateStore.open(settings.state_dir)
        self.audit = AuditLog.open(settings.state_dir)
        self.quarantine = Quarantine.open(settings.state_dir, store=self.store)
        self._engine: Engine | None = None
        self._conn: Any = None
        self._tagging: Any = None
        self._tagging_lock = threading.Lock()
        self._tag_failures = remediate.TagFailures()
        self._fleet: Any = None
        self._fleet_lock = threading.Lock()
        self._disk_workers: Any = None
        self._disk_workers_lock = threading.Lock()

    def close(self) -> None:
        """Log out and close files."""
        if self._disk_workers is not None:
            self._disk_workers.close()
        if self._tagging is not None:
            self._tagging.close()
        if self._conn is not None:
            self._conn.close()
        if self._engine is not None:
            self._engine.close()
        self.audit.close()
        self.store.close()

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The scan engine (opened on first use)."""
        if self._engine is None:
            self._engine = Engine.open(self.settings, audit=self.audit, actor=self.actor)
        return self._engine

    @property
    def connection(self) -> Any:
        """The vCenter session (logged in on first use)."""
        if self._conn is None:
            from vsphere_av.vsphere.connection import connect
            self._conn = connect(self.settings.vcenter)
        return self._conn

    @property
    def tagging(self) -> Any:
        """The Automation API session for tags (``vsphere.tagging.Tagging``), or None when off."""
        if not self.settings.tagging.enabled:
            return None
        with self._tagging_lock:
            if self._tagging is None:
                from vsphere_av.vsphere.connection import trust_from
                from vsphere_av.vsphere.tagging import Tagging
                self._tagging = Tagging(vcenter=self.settings.vcenter,
                                        trust=trust_from(self.settings.vcenter),
                                        settings=self.settings.tagging)
            return self._tagging

    def sync_tag(self, vm: VmInfo) -> None:
        """Make the VM carry the infected tag exactly while its recorded state is infected
        (``scan.remediate.sync_tag``: trouble is audited once per run, never raised)."""
        remediate.sync_tag(vm, tagging=self.tagging, store=self.store, audit=self.audit,
                           actor=self.actor, label=self.settings.tagging.label,
                           failures=self._tag_failures)

    def resync_tags(self) -> dict[str, int]:
        """Compare the tag with every known VM's state in one pass and fix what differs
        (``scan.remediate.resync_tags``); ``serve`` runs it every ``tagging.resync_interval``."""
        return remediate.resync_tags(tagging=self.tagging, store=self.store, audit=self.audit,
                                     actor=self.actor, label=self.settings.tagging.label,
                                     failures=self._tag_failures)

    # --- scanning --------------------------------------------------------------------------

    def select_vms(self, *, names: Sequence[str] = (), all_vms: bool = False) -> list[VmInfo]:
        """The VMs to scan: by name (or moref), or every VM; records the inventory."""
        from vsphere_av.vsphere import inventory

        if not names and not all_vms:
            raise errors.ConfigError("name at least one VM, or use --all")
        vms, _hosts = inventory.read_inventory(self.connection)
        self.store.sync_inventory(vms)
        if all_vms:
            return [vm for vm in vms if not vm.is_appliance]
        by_key = {vm.name: vm for vm in vms} | {str(vm.moref): vm for vm in vms}
        missing = [n for n in names if n not in by_key]
        if missing:
            raise errors.NotFound(f"no VM named {', '.join(repr(m) for m in missing)} in vCenter")
        out: list[VmInfo] = []
        for n in names:
            if by_key[n] not in out:
                out.append(by_key[n])
        return out

    def scan_route(self, vm: VmInfo, via: str | None = None) -> str:
        """How ``vm`` is read: ``"disk"`` or ``"guest"`` (``via``, else ``scan.via``).

        ``auto``: the disk path for a VM that is not running, has no guest credentials
        configured or no running VMware Tools; Guest Operations otherwise.
        """
        user, _ = self.settings.guest.for_vm(vm_name=vm.name, folder_path=vm.folder_path)
        return scan_route(via or self.settings.scan.via, powered_on=vm.powered_on,
                          credentials=bool(user), tools_running=vm.tools_running)

    def scan_one(self, vm: VmInfo, *, full: bool = False,
                 on_progress: Callable[[Progress], None] | None = None,
                 resume_after: str = "", via: str | None = None) -> ScanResult:
        """Scan one VM in the calling thread; any failure becomes the result's reason.

        ``resume_after``: continue a stopped scan after that guest path (``scan.scan_vm``).
        ``via``: ``"guest"``, ``"disk"`` or ``"auto"`` (None: ``scan.via``; see
        :meth:`scan_route`). Called by ``scan`` (the CLI) and the controller's workers.
        """
        from vsphere_av.vsphere.guest import GuestFiles

        host = vm.host.name if vm.host else ""
        try:
            if self.scan_route(vm, via) == "disk":
                return self._scan_disks(vm, full=full, on_progress=on_progress,
                                        resume_after=resume_after)
            user, password = self.settings.guest.for_vm(vm_name=vm.name, folder_path=vm.folder_path)
            if vm.powered_on and not user:
                self.audit.append(actor=self.actor, action="scan.skipped", details={
                    "vm": vm.name, "moref": vm.moref, "host": host,
                    "reason": "no guest credentials configured"})
                self.store.upsert_vm(vm)
                self.store.set_protection(vm.moref, state="unreachable",
                                          reason="no guest credentials configured")
                return ScanResult(vm=vm.name, moref=vm.moref, host=host, status=UNREACHABLE_STATUS,
                                  reason="no guest credentials configured", full=full)
            guest = GuestFiles(connection=self.connection, vm=vm, user=user, password=password)
            guest, engine = self.appliance_route(vm, guest)
            with engine.session(version=self.engine.active_version()) as session:
                result = scan_vm(vm=vm, guest=guest, session=session, store=self.store,
                                 audit=self.audit, quarantine=self.quarantine,
                                 policy=self.settings.scan, full=full, actor=self.actor,
                                 engine_max_file_size=self.settings.engine.max_file_size,
                                 on_progress=on_progress, resume_after=resume_after)
            self.sync_tag(vm)
            return result
        except Exception as exc:  # one VM's failure never stops the others
            log.exception("scan of %s failed", vm.name)
            reason = (str(exc) if isinstance(exc, errors.VsphereAvError)
                      else f"internal error: {exc!r}")
            return ScanResult(vm=vm.name, moref=vm.moref, host=host, status=ERROR, reason=reason,
                              full=full, outage=isinstance(exc, errors.ConnectionLost))

    # --- the disk path (issue 12) ----------------------------------------------------------

    def _scan_disks(self, vm: VmInfo, *, full: bool,
                    on_progress: Callable[[Progress], None] | None,
                    resume_after: str) -> ScanResult:
        """Scan a VM's files on its virtual disks (``diskscan.DiskGuest`` in ``scan_vm``).

        A running VM is read under a temporary snapshot (no memory; quiesced when
        ``scan.disk_quiesce``), removed in ``finally`` whatever happens; a VM that is off,
        as its disks are. The bytes are read from the VM's host's datastores by this
        process, or by the host's appliance (below). Detections are remediated through
        Guest Operations at once when the VM runs with guest credentials and tools;
        otherwise they wait for its next guest scan, and a powered-off infected VM gets its
        vNICs cut before it boots (:meth:`isolate_infected`). With appliances enabled the
        VM's host appliance reads and matches the bytes (``scan.sources.remote_disk``; this
        process grants it the service tickets); its appliance down: ApplianceError before
        any snapshot. Without one, the bytes are read and matched by a local worker process
        (``app.disk_workers``, the same routes an appliance serves) unless
        ``scan.disk_workers`` is 0: then by this process.
        """
        # One version for the whole scan: the worker is pinned to it, and the session that
        # matches and records the files is opened for it.
        version = self.engine.active_version()
        with self._disk_engine(vm, version=version) as (remote, reader):
            return self._scan_disks_with(vm, remote, reader=reader, version=version, full=full,
                                         on_progress=on_progress, resume_after=resume_after)

    @contextlib.contextmanager
    def _disk_engine(self, vm: VmInfo, *, version: int) -> Iterator[tuple[Any, str]]:
        """Who reads a VM's disks, and its name in the scan's messages: its host's appliance,
        a local worker process pinned to ``version``, or None (this process)."""
        remote = self.appliance_engine(vm)
        if remote is not None:
            yield remote, "the host's appliance"
            return
        if not self.settings.scan.disk_workers:
            yield None, "this process"
            return
        # The worker scans under this process's active version (the built-in signatures
        # imported by this process's engine before any worker reads the store).
        with self._disk_pool().engine(version=version) as worker:
            yield worker, "the disk-scan worker"

    def _disk_pool(self) -> Any:
        """The local disk-scan workers (``app.disk_workers.DiskWorkers``), made on first use."""
        with self._disk_workers_lock:
            if self._disk_workers is None:
                from vsphere_av.app.disk_workers import DiskWorkers

                self._disk_workers = DiskWorkers(settings=self.settings,
                                                 count=self.settings.scan.disk_workers)
            return self._disk_workers

    def _scan_disks_with(self, vm: VmInfo, remote: Any, *, reader: str, version: int,
                         full: bool, on_progress: Callable[[Progress], None] | None,
                         resume_after: str) -> ScanResult:
        from vsphere_av.scan.filters import Filters
        from vsphere_av.scan.sources.guest import DEFERRED
        from vsphere_av.scan.sources.remote_disk import RemoteDiskGuest, RemoteDiskSession
        from vsphere_av.vsphere import disks
        from vsphere_av.vsphere.guest import GuestFiles

        conn = self.connection
        user, password = self.settings.guest.for_vm(vm_name=vm.name, folder_path=vm.folder_path)
        remediation: Any = None
        pending = DEFERRED
        if vm.powered_on and user and vm.tools_running:
            remediation = GuestFiles(connection=conn, vm=vm, user=user, password=password)
        elif vm.powered_on:
            pending = ("will be quarantined through guest operations once they are available "
                       "(guest credentials and running VMware Tools)")
        snapshot = None
        try:
            if vm.powered_on:
                name = scan_snapshot_name()
                try:
                    taken = disks.create_scan_snapshot(
                        conn, vm.moref, name=name, quiesce=self.settings.scan.disk_quiesce)
                except errors.SnapshotError as exc:
                    return self._not_read(vm, reason=str(exc), full=full)
                snapshot = taken.snapshot
                self._disk_audit("disk.snapshot.created", vm, snapshot=snapshot.name,
                                 snapshot_moref=snapshot.moref,
                                 quiesce=self.settings.scan.disk_quiesce)
                chains = taken.disks
            else:
                chains = disks.disks_of(conn, vm.moref)
            with disks.DatastoreFiles(connection=conn) as files:
                source: Any
                if remote is None:
                    # The disk reader (Dissect, libyal) is loaded only where it reads.
                    from vsphere_av.scan.sources.disk import DiskGuest

                    source = DiskGuest(vm=vm, disks=chains, files=files,
                                       remediation=remediation, remediation_pending=pending)
                else:
                    excludes = Filters.from_policy(self.settings.scan,
                                                   windows=vm.is_windows).excludes
                    source = RemoteDiskGuest(vm=vm, disks=chains, client=remote.client,
                                             reader=reader, grant=files.grant,
                                             excludes=excludes,
                                             remediation=remediation,
                                             remediation_pending=pending)
                try:
                    with (remote or self.engine).session(version=version) as opened:
                        session = opened if remote is None else RemoteDiskSession(opened)
                        result = scan_vm(vm=vm, guest=source, session=session, store=self.store,
                                         audit=self.audit, quarantine=self.quarantine,
                                         policy=self.settings.scan, full=full, actor=self.actor,
                                         engine_max_file_size=self.settings.engine.max_file_size,
                                         share_across_vms=False, on_progress=on_progress,
                                         resume_after=resume_after)
                finally:
                    source.close()
            result.via = "disk"
            result.disk_read = source.bytes_read()
        finally:
            if snapshot is not None:
                self._remove_snapshot(vm, snapshot)
        if result.status == FOUND and not vm.powered_on:
            self.isolate_infected(vm, result)
        self.sync_tag(vm)
        return result

    def _not_read(self, vm: VmInfo, *, reason: str, full: bool) -> ScanResult:
        """A VM whose disks could not be read at all: unprotected (or still infected)."""
        host = vm.host.name if vm.host else ""
        self.audit.append(actor=self.actor, action="scan.skipped", details={
            "vm": vm.name, "moref": vm.moref, "host": host, "via": "disk", "reason": reason})
        self.store.upsert_vm(vm)
        state = self.store.vm_state(vm.moref)
        if state is None or state.state != INFECTED:
            self.store.set_protection(vm.moref, state=UNPROTECTED, reason=reason)
        return ScanResult(vm=vm.name, moref=vm.moref, host=host, status=INCOMPLETE,
                          reason=reason, full=full, via="disk")

    def _disk_audit(self, action: str, vm: VmInfo, **details: Any) -> None:
        self.audit.append(actor=self.actor, action=action, details={
            "vm": vm.name, "moref": vm.moref, "host": vm.host.name if vm.host else "",
            "host_moref": vm.host.moref if vm.host else "", **details})

    def _remove_snapshot(self, vm: VmInfo, snapshot: Any) -> None:
        """Remove a scan snapshot; one that will not go is left for the next start."""
        from vsphere_av.vsphere import disks

        try:
            disks.remove_snapshot(self.connection, snapshot)
        except errors.VsphereAvError as exc:
            log.warning("%s: scan snapshot %s not removed: %s", vm.name, snapshot.name, exc)
            self._disk_audit("disk.snapshot.remove_failed", vm, snapshot=snapshot.name,
                             snapshot_moref=snapshot.moref, error=str(exc))
            return
        self._disk_audit("disk.snapshot.removed", vm, snapshot=snapshot.name,
                         snapshot_moref=snapshot.moref)

    def remove_leftover_snapshots(self) -> int:
        """Remove scan snapshots a crashed run left behind; returns how many went.

        Called at the start of ``vsphere-av scan`` and ``serve`` (``start_controller``).
        Snapshots named by a process still running on this machine are left alone (a
        scan in progress); every removal is audited (``disk.snapshot.leftover_removed``).
        """
        from vsphere_av.vsphere import disks

        removed = 0
        for ref in disks.find_scan_snapshots(self.connection, None, prefix=SNAPSHOT_PREFIX):
            if snapshot_in_use(ref.name):
                continue
            try:
                gone = disks.remove_snapshot(self.connection, ref)
            except errors.VsphereAvError as exc:
                log.warning("leftover scan snapshot %s of %s not removed: %s", ref.name,
                            ref.vm, exc)
                continue
            if gone:
                removed += 1
                self.audit.append(actor=self.actor, action="disk.snapshot.leftover_removed",
                                  details={"moref": ref.vm, "snapshot": ref.name,
                                           "snapshot_moref": ref.moref, "created": ref.created})
        return removed

    def isolate_infected(self, vm: VmInfo, result: ScanResult) -> None:
        """Cut the vNICs of a powered-off VM a disk scan found infected, before it boots
        (``scan.remediate.isolate_infected``; off with ``scan.isolate_stale = false``)."""
        remediate.isolate_infected(vm, result, enabled=self.settings.scan.isolate_stale,
                                   cut=self._cut_network, audit=self.audit, actor=self.actor)

    def _cut_network(self, vm: VmInfo, *, reason: str,
                     held: str) -> tuple[bool, list[dict[str, Any]], int]:
        """``scan.remediate.NetworkCut``: the controller's own isolation record
        (``controller.cut_network``), held for the detection, so ``isolation.release_infected``
        decides its release exactly as for a VM isolated at power-on."""
        from vsphere_av.controller import cut_network
        from vsphere_av.store.jobs import JobStore

        with JobStore.open(self.settings.state_dir) as jobs:
            cut, before, changed, _ = cut_network(
                jobs=jobs, nics=_Nics(lambda: self.connection), vm=vm.moref, name=vm.name,
                reason=reason)
            jobs.hold_isolation(vm.moref, held=held)
        return cut, before, changed

    def scan(self, *, names: Sequence[str] = (), all_vms: bool = False, full: bool = False,
             on_progress: Callable[[Progress], None] | None = None,
             on_start: Callable[[list[VmInfo]], None] | None = None,
             via: str | None = None) -> ScanReport:
        """Scan VMs: per host at most ``per_host_limit`` at once, hosts in parallel.

        Scan snapshots an earlier run left behind are removed first.
        """
        started = time.monotonic()
        if self.settings.scan.disk_workers and not self.settings.appliances.enabled and \
                (via or self.settings.scan.via) != "guest":
            self._disk_pool().warm()       # its imports while vCenter logs in and lists
        vms = self.select_vms(names=names, all_vms=all_vms)
        version = self.engine.active_version()
        self.remove_leftover_snapshots()
        if on_start:
            on_start(vms)
        policy = self.settings.scan
        # The controller's queue, without a journal: the same per-host and global caps.
        queue = Scheduler(per_host_limit=policy.per_host_limit,
                          global_limit=policy.global_limit, now=time.time)
        results: dict[str, ScanResult] = {}
        for vm in vms:
            if vm.powered_on or self.scan_route(vm, via) == "disk":
                queue.submit(vm=vm.moref, host=vm.host.moref if vm.host else "",
                             priority=Priority.ON_DEMAND, full=full)
            else:                       # nothing to read: no slot needed
                results[vm.moref] = self.scan_one(vm, full=full, on_progress=on_progress,
                                                  via=via)
        by_moref: dict[str, VmInfo] = {vm.moref: vm for vm in vms}
        failures: list[BaseException] = []
        stop = threading.Event()

        def run(job: Job) -> None:
            try:
                results[job.vm] = self.scan_one(by_moref[job.vm], full=full,
                                                on_progress=on_progress, via=via)
            except BaseException as exc:   # re-raised below, after every worker ended
                failures.append(exc)
                stop.set()
            finally:
                queue.finish(job)

        # The controller's worker loop, until the queue is empty. Threads start here and
        # only here; all are joined before returning.
        workers = [threading.Thread(target=working, name=f"scan-{i}", daemon=True,
                                    kwargs={"scheduler": queue, "run": run, "stop": stop,
                                            "until_idle": True})
                   for i in range(min(policy.global_limit, len(queue.queued())))]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                worker.join()
        except BaseException:
            stop.set()                  # Ctrl-C: no new VM starts; running ones finish
            queue.close()
            for worker in workers:
                worker.join()
            raise
        if failures:
            raise failures[0]
        hosts: dict[str, str] = {vm.host.moref: vm.host.name for vm in vms if vm.host}
        seen = queue.peak_per_host()
        peaks = {hosts.get(h, h or "(none)"): seen.get(h, 0)
                 for h in {vm.host.moref if vm.host else "" for vm in vms}}
        results_in_order = [results[vm.moref] for vm in vms]
        return ScanReport(results=results_in_order, signature_version=version,
                          duration=time.monotonic() - started, peak_per_host=peaks)

    # --- reports ---------------------------------------------------------------------------

    def status(self, *, refresh: bool = True) -> list[dict[str, Any]]:
        """Every VM's protection state (refreshing the VM list from vCenter when configured)."""
        if refresh and self.settings.vcenter.server:
            from vsphere_av.vsphere import inventory
            self.store.sync_inventory(inventory.list_vms(self.connection))
        version = self.engine.active_version()
        states = self.appliance_overlay(self.store.vm_states(current_version=version),
                                        live=refresh)
        return [{"name": s.name, "moref": s.moref, "host": s.host, "state": s.state,
                 "reason": s.reason, "last_scan": s.last_scan or None,
                 "last_full_scan": s.last_full_scan or None,
                 "signature_version": s.signature_version, **self._last_scan_files(s.moref)}
                for s in states]

    def _last_scan_files(self, moref: VmId) -> dict[str, Any]:
        """How the VM's last finished scan read it (guest or disk, None before any) and the
        paths it did not fully check or skipped by policy."""
        last = self.store.last_finished_scan(moref)
        files = self.store.scan_files(last["id"]) if last else []
        incomplete = [f for f in files if f["kind"] == INCOMPLETE]
        return {"last_scan_via": last["via"] if last else None,
                "incomplete": len(incomplete), "incomplete_files": incomplete,
                "skipped_files": [f for f in files if f["kind"] != INCOMPLETE]}

    # --- appliances (added by the appliance area; see appliance_manager.py) ---------------

    def appliance_route(self, vm: VmInfo, guest: Any) -> tuple[Any, Any]:
        """(guest, engine) for a scan: the VM's host appliance when appliances are enabled.

        The appliance pulls the guest transfer URLs itself; with appliances enabled and the
        host's appliance down, ApplianceError("appliance down") (the job waits, nothing is
        scanned silently elsewhere). Without appliances: the in-process engine. Which
        appliance serves which host is read once per reconcile (``fleet.routing``).
        """
        remote = self.appliance_engine(vm)
        if remote is None:
            return guest, self.engine
        from vsphere_av.vsphere.appliances import ApplianceGuestFiles

        return ApplianceGuestFiles(guest, connection=self.connection), remote

    def appliance_engine(self, vm: VmInfo) -> Any:
        """The VM's host appliance's engine (``RemoteEngine``), or None without appliances;
        ApplianceError("appliance down") when appliances are enabled and it cannot scan."""
        from vsphere_av.fleet import plan as appliances

        if not self.settings.appliances.enabled:
            return None
        remote = self.fleet.engine_for_host(vm.host.moref if vm.host else "")
        if remote is None:
            raise errors.ApplianceError(appliances.APPLIANCE_DOWN)
        return remote

    def appliance_overlay(self, states: Sequence[Any], *, live: bool = True) -> list[Any]:
        """With appliances enabled, VMs on a host whose appliance is down show unprotected."""
        from vsphere_av.fleet import plan as appliances
        from vsphere_av.fleet.health import read_health

        if not self.settings.appliances.enabled:
            return list(states)
        if live and self.settings.vcenter.server:
            down = self.fleet.down_hosts()
        else:
            down = read_health(self.settings.state_dir)
        return appliances.overlay_states(states, down)

    @property
    def fleet(self) -> Any:
        """The appliances' manager (``fleet.manager.ApplianceManager``), made on first use;
        its engine routes live as long as this App."""
        with self._fleet_lock:
            if self._fleet is None:
                from vsphere_av.fleet.manager import open_manager

                self._fleet = open_manager(self.settings, connection=self.connection,
                                           audit=self.audit, actor=self.actor)
            return self._fleet

    def detections(self) -> list[dict[str, Any]]:
        """Every recorded detection, oldest first."""
        return [{"id": d.id, "vm": d.vm_name, "moref": d.vm_moref, "path": d.path,
                 "threat": d.threat, "member": d.member, "sha256": d.sha256, "size": d.size,
                 "action": d.action, "quarantine_id": d.quarantine_id or None, "time": d.time}
                for d in self.store.detections()]

    # --- quarantine ------------------------------------------------------------------------

    @staticmethod
    def quarantine_row(item: QuarantineItem) -> dict[str, Any]:
        """JSON-ready form of one quarantine item (``quarantine list --json``)."""
        return {"id": item.id, "vm": item.vm_name, "moref": item.vm_moref, "path": item.guest_path,
                "threat": item.threat, "sha256": item.sha256, "size": item.size, "time": item.time,
                "restored": item.restored_at or None}

    def quarantine_list(self) -> list[dict[str, Any]]:
        """Items in quarantine (purged ones left out)."""
        return [self.quarantine_row(i) for i in self.quarantine.items()]

    def quarantine_restore(self, item_id: str, *, force: bool = False) -> dict[str, Any]:
        """Put the identical bytes back at the original guest path (no overwrite unless force)."""
        from vsphere_av.vsphere import inventory
        from vsphere_av.vsphere.guest import GuestFiles, parent_of

        item = self.quarantine.get(item_id)
        details = {"id": item.id, "vm": item.vm_name, "moref": item.vm_moref,
                   "path": item.guest_path, "sha256": item.sha256, "size": item.size,
                   "force": force}
        try:
            vm = inventory.get_vm(self.connection, item.vm_moref)
            user, password = self.settings.guest.for_vm(vm_name=vm.name, folder_path=vm.folder_path)
            guest = GuestFiles(connection=self.connection, vm=vm, user=user, password=password)
            parent = parent_of(item.guest_path, windows=vm.is_windows)
            if parent:
                guest.make_dir(parent, parents=True)
            with self.quarantine.reader(item.id) as body:
                try:
                    guest.upload(item.guest_path, body, size=item.size, overwrite=force,
                                 permissions=item.permissions)
                except errors.GuestFileExists as exc:
                    raise errors.GuestFileExists(
                        f"{item.guest_path} already exists in {vm.name}; use --force to overwrite"
                    ) from exc
        except errors.VsphereAvError as exc:
            self.audit.append(actor=self.actor, action="quarantine.restore",
                              details={**details, "result": "failed", "error": str(exc)})
            raise
        self.quarantine.mark_restored(item.id)
        self.audit.append(actor=self.actor, action="quarantine.restore",
                          details={**details, "result": "restored"})
        return self.quarantine_row(self.quarantine.get(item.id))

    def quarantine_purge(self, item_id: str) -> dict[str, Any]:
        """Delete a quarantined file's bytes for good."""
        item = self.quarantine.purge(item_id)
        self.audit.append(actor=self.actor, action="quarantine.purge", details={
            "id": item.id, "vm": item.vm_name, "moref": item.vm_moref, "path": item.guest_path,
            "sha256": item.sha256, "threat": item.threat})
        return self.quarantine_row(item)


# --- controller (vsphere-av serve) wiring ------------------------------------------------------
# Owned by the controller area. Builds the real collaborators of ``controller.Controller``
# and starts its threads: this is the only place the controller's threads start.


class _Nics:
    """``controller.NicPort`` over ``vsphere.isolation`` (NIC states as plain dicts)."""

    def __init__(self, connection: Callable[[], Any]) -> None:
        self._connection = connection

    def read(self, vm: str) -> list[dict[str, Any]]:
        from vsphere_av.vsphere import isolation
        return [n.as_dict() for n in isolation.read_nics(self._connection(), vm)]

    def isolate(self, vm: str, *, before_cut: Callable[[list[dict[str, Any]]], None]
                ) -> tuple[list[dict[str, Any]], int]:
        from vsphere_av.vsphere import isolation
        before, changed = isolation.isolate(
            self._connection(), vm, before_cut=lambda nics: before_cut([n.as_dict() for n in nics]))
        return [n.as_dict() for n in before], changed

    def disconnect(self, vm: str, nics: Sequence[Any]) -> int:
        from vsphere_av.vsphere import isolation
        return isolation.disconnect_all(self._connection(), vm,
                                        [isolation.NicState.from_dict(n) for n in nics])

    def restore(self, vm: str, nics: Sequence[Any]) -> int:
        from vsphere_av.vsphere import isolation
        return isolation.restore(self._connection(), vm,
                                 [isolation.NicState.from_dict(n) for n in nics])


class _Fresh:
    """A vCenter session per watch loop, replaced after it breaks (reconnect with backoff)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.conn: Any = None

    def get(self) -> Any:
        from vsphere_av.vsphere.connection import connect
        if self.conn is not None:
            self.conn.close()
        self.conn = connect(self._settings.vcenter)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Console(Protocol):
    """The console that runs beside the controller (``api.ApiServer`` fits): bound when
    built, ``serve()`` is its thread's body, ``stop()`` ends it and ``close()`` frees it."""

    url: str                    # where it answers (the real port when listen asks for 0)

    def serve(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class ConsoleFactory(Protocol):
    """Builds the console from the settings (``api.ApiServer``); a bad address raises."""

    def __call__(self, *, settings: Settings) -> Console: ...


@dataclass
class ControllerRuntime:
    """A running controller: its object, threads and sessions (``stop()`` ends it)."""

    controller: Any
    app: App
    stop_event: threading.Event
    threads: list[threading.Thread]
    sessions: list[_Fresh]
    jobs: Any
    api: Console | None = None      # the console when [api] listen is set (issue 14)

    def stop(self, *, grace: float | None = None) -> None:
        """Stop the loops; in-flight scans finish or are put back; close everything."""
        import os
        self.stop_event.set()
        if self.api is not None:
            self.api.stop()
        self.controller.shutdown()
        deadline = time.monotonic() + (self.controller.options.shutdown_grace
                                       if grace is None else grace)
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            log.warning("threads still running at exit: %s", ", ".join(alive))
        self.controller.flush_audit()
        self.jobs.stop_beating(os.getpid())
        self.controller._audit("controller.stop", pid=os.getpid(),
                               queued=len(self.controller.scheduler.queued()))
        if self.app.settings.siem.target:
            _forward_once(self.app.settings)    # the SIEM also learns that we stopped
        for s in self.sessions:
            s.close()
        self.jobs.close()
        if self.api is not None:
            self.api.close()
        self.app.close()


def remediation_via(app: App, vm: VmInfo) -> str | None:
    """``"guest"`` for a running VM with guest credentials whose detections wait for Guest
    Operations; None otherwise (``scan.remediate.remediation_via``). Called by the
    controller's scans."""
    user, _ = app.settings.guest.for_vm(vm_name=vm.name, folder_path=vm.folder_path)
    return remediate.remediation_via(vm, via=app.settings.scan.via, credentials=bool(user),
                                     store=app.store)


def start_controller(settings: Settings, *, stop_event: threading.Event | None = None,
                     console: ConsoleFactory | None = None) -> ControllerRuntime:
    """Build the controller against vCenter and start its threads; returns the runtime.

    ``console`` (``vsphere-av serve`` passes ``api.ApiServer``) builds the console that runs
    beside it when ``[api] listen`` is set; a bad address fails here, before any thread.
    """
    import os

    from vsphere_av.controller import Controller, ControllerOptions
    from vsphere_av.controller.attention import WATCHED_EVENT_TYPES
    from vsphere_av.fleet.manager import periodic_hook as appliance_periodic_hook
    from vsphere_av.store.jobs import JobStore
    from vsphere_av.vsphere import inventory
    from vsphere_av.vsphere.watching import EventTail, InventoryWatch

    options = ControllerOptions.from_settings(settings)
    stop_event = stop_event or threading.Event()
    app = App(settings)
    jobs = JobStore.open(settings.state_dir)
    watch_session, event_session = _Fresh(settings), _Fresh(settings)
    api_server: Console | None = None
    try:
        app.connection  # noqa: B018  (log in now: a bad server or password fails fast)
        app.remove_leftover_snapshots()
        if console is not None and settings.api.listen:
            api_server = console(settings=settings)     # a bad [api] listen fails now too

        def scan(vm: VmInfo, *, full: bool = False,
                 on_progress: Callable[[Any], None] | None = None, resume_after: str = "") -> Any:
            return app.scan_one(vm, full=full, on_progress=on_progress, resume_after=resume_after,
                                via=remediation_via(app, vm))

        controller = Controller(
            options=options, state=app.store, jobs=jobs, audit=app.audit, actor=app.actor,
            active_version=app.engine.active_version,
            read_inventory=lambda: inventory.read_inventory(app.connection),
            open_inventory_watch=lambda: InventoryWatch(watch_session.get()),
            open_event_tail=lambda cursor: EventTail(event_session.get(), since=cursor,
                                                     type_ids=WATCHED_EVENT_TYPES),
            nics=_Nics(lambda: app.connection), scan=scan, now=time.time)
        restored = controller.restore_queue()
        controller._audit("controller.start", pid=os.getpid(), restored_jobs=restored,
                          per_host_limit=options.per_host_limit,
                          global_limit=options.global_limit,
                          isolate_stale=options.isolate_stale)
    except BaseException:
        if api_server is not None:
            api_server.close()
        watch_session.close()
        event_session.close()
        jobs.close()
        app.close()
        raise
    loops: list[tuple[str, Callable[[threading.Event], None]]] = [
        ("watch-inventory", controller.watch_inventory),
        ("tail-events", controller.tail_events),
        ("housekeeping", controller.housekeeping),
        ("auditing", controller.auditing),
    ]
    appliance_section = settings.appliances
    if appliance_section.enabled:
        # Own thread: an appliance deploy can take minutes and must not hold up hand-over
        # requests, sweeps or schedules in the housekeeping thread.
        reconcile = appliance_periodic_hook(
            settings, connection=lambda: app.connection, audit=app.audit, actor=app.actor,
            on_back=controller.rescan_hosts)
        loops.append(("appliances", _every(appliance_section.interval, reconcile)))
    if settings.siem.target:
        loops.append(("siem", _forwarding(settings)))
    if settings.tagging.enabled:
        loops.append(("tagging", _every(settings.tagging.resync_interval, app.resync_tags)))
    loops += [(f"contain-{i}", controller.containing)
              for i in range(options.containment_threads)]
    loops += [(f"scan-{i}", controller.work) for i in range(options.global_limit)]
    if api_server is not None:
        loops.append(("api", lambda _stop: api_server.serve()))
    threads = [threading.Thread(target=fn, args=(stop_event,), name=name, daemon=True)
               for name, fn in loops]
    for t in threads:
        t.start()
    return ControllerRuntime(controller=controller, app=app, stop_event=stop_event,
                             threads=threads, sessions=[watch_session, event_session], jobs=jobs,
                             api=api_server)


def _forwarding(settings: Settings) -> Callable[[threading.Event], None]:
    """The thread body that sends new audit entries to the SIEM every ``siem.interval``."""
    from vsphere_av.store.siem import Forwarder

    def loop(stop: threading.Event) -> None:
        forwarder = Forwarder(settings=settings.siem, state_dir=settings.state_dir)
        try:
            _every(settings.siem.interval, forwarder.forward)(stop)
        finally:
            forwarder.close()

    return loop


def _forward_once(settings: Settings) -> None:
    """Send what the SIEM has not seen yet; trouble is logged (the next start sends it)."""
    from vsphere_av.store.siem import Forwarder

    forwarder = Forwarder(settings=settings.siem, state_dir=settings.state_dir)
    try:
        forwarder.forward()
    except errors.VsphereAvError as exc:
        log.warning("siem: %s", exc)
    finally:
        forwarder.close()


def _every(seconds: float, task: Callable[[], Any]) -> Callable[[threading.Event], None]:
    """A thread body that runs ``task`` now and then every ``seconds`` until stopped."""

    def loop(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                task()
            except errors.VsphereAvError as exc:
                log.warning("%s: %s", getattr(task, "__name__", "periodic task"), exc)
            stop.wait(seconds)

    return loop


def run_controller(settings: Settings, stop_event: threading.Event, *,
                   console: ConsoleFactory | None = None) -> None:
    """Run ``vsphere-av serve`` until ``stop_event`` is set (SIGTERM / SIGINT)."""
    runtime = start_controller(settings, stop_event=stop_event, console=console)
    try:
        while not stop_event.wait(1.0):
            pass
    finally:
        runtime.stop()


def controller_status(settings: Settings, *,
                      read_hosts: Callable[[], Sequence[Any]] | None = None) -> dict[str, Any]:
    """For ``status --json``: ``hosts`` (name, moref, queued, active_scans) and isolated VMs.

    Counts come from the running controller's last publication; without a running
    controller, ``queued`` is the durable queue and ``active_scans`` 0. Hosts the controller
    never published are read with ``read_hosts`` (vCenter) when given.
    """
    from vsphere_av.store.jobs import JobStore

    with JobStore.open(settings.state_dir) as jobs:
        alive = jobs.controller_alive()
        published = jobs.hosts()
        isolated = sorted(r.vm for r in jobs.isolations())
        pending = jobs.pending_jobs()
    hosts: dict[str, dict[str, Any]] = {}
    for h in published:
        hosts[h.moref] = {"name": h.name, "moref": h.moref,
                          "queued": h.queued if alive else 0,
                          "active_scans": h.active_scans if alive else 0}
    if read_hosts is not None:
        for info in read_hosts():
            hosts.setdefault(str(info.moref), {"name": info.name, "moref": str(info.moref),
                                               "queued": 0, "active_scans": 0})
    if not alive:
        for job, _running in pending:
            row = hosts.setdefault(job.host, {"name": job.host, "moref": job.host,
                                              "queued": 0, "active_scans": 0})
            row["queued"] += 1
    return {"hosts": sorted(hosts.values(), key=lambda r: (r["name"], r["moref"])),
            "isolated": isolated, "controller_running": alive}


def hand_over_scan(settings: Settings, *, names: Sequence[str] = (), all_vms: bool = False,
                   full: bool = False, timeout: float = 3600.0, poll: float = 0.25,
                   via: str | None = None) -> ScanReport | None:
    """``vsphere-av scan`` with a controller running: queue the VMs there and wait for them.

    Returns None when no controller is running (the caller scans by itself). The VMs are
    queued at on-demand priority under the controller's storm limits, and their scan records
    are read back when done. Powered-off VMs are queued too when the controller reads disks
    (``scan.via`` auto or disk) and ``via`` is not ``guest``; otherwise they are reported as
    skipped without a request.
    """
    from vsphere_av.models import VmId
    from vsphere_av.scan import SKIPPED, Found
    from vsphere_av.store.jobs import JobStore

    with JobStore.open(settings.state_dir) as jobs:
        if not jobs.controller_alive():
            return None
        started = time.monotonic()
        with App(settings) as app:
            vms = app.select_vms(names=names, all_vms=all_vms)
            version = app.engine.active_version()
            baseline = {vm.moref: max((int(r["id"]) for r in app.store.scans(
                vm_moref=vm.moref, limit=1)), default=0) for vm in vms}
            dormant = via != "guest" and settings.scan.via in ("auto", "disk")
            wanted = [vm for vm in vms if vm.powered_on or dormant]
            for vm in wanted:
                jobs.add_request(vm=str(vm.moref), full=full)
            results: dict[str, ScanResult] = {}
            deadline = time.monotonic() + timeout
            while True:
                for vm in vms:
                    if vm.moref in results:
                        continue
                    host = vm.host.name if vm.host else ""
                    if vm not in wanted:
                        results[vm.moref] = ScanResult(vm=vm.name, moref=vm.moref, host=host,
                                                       status=SKIPPED, reason="powered off",
                                                       full=full)
                        continue
                    rows = app.store.scans(vm_moref=vm.moref, limit=1)
                    if not rows or int(rows[0]["id"]) <= baseline[vm.moref] \
                            or not rows[0]["finished"]:
                        continue
                    r = rows[0]
                    found = [Found(path=d.path, threat=d.threat, sha256=d.sha256, size=d.size,
                                   action=d.action, member=d.member, detail=d.detail,
                                   quarantine_id=d.quarantine_id)
                             for d in app.store.detections(vm_moref=VmId(vm.moref))
                             if d.scan_id == r["id"]]
                    results[vm.moref] = ScanResult(
                        vm=vm.name, moref=vm.moref, host=host, status=r["status"],
                        via=remediation_via(app, vm) or app.scan_route(vm),
                        reason=f"{r['reason']} (scanned by the running controller)",
                        full=bool(r["full"]), signature_version=r["signature_version"],
                        scanned=r["scanned"], unchanged=r["unchanged"], skipped=r["skipped"],
                        errors=r["errors"], bytes=r["bytes"], found=found, scan_id=r["id"])
                if len(results) == len(vms):
                    break
                if time.monotonic() > deadline:
                    raise errors.TransientError(
                        f"the running controller did not finish {len(vms) - len(results)} "
                        f"scan(s) within {timeout:.0f}s; they stay queued there")
                time.sleep(poll)
    return ScanReport(results=[results[vm.moref] for vm in vms], signature_version=version,
                      duration=time.monotonic() - started)


def instant_on_timeline(settings: Settings, vm_moref: str) -> list[dict[str, Any]]:
    """The instant-on story of one VM, oldest first: exposure marks and audit entries.

    For ``make demo`` and people: each row has ``time`` (ISO), ``seconds`` (since the
    exposure started) and ``what``.
    """
    from datetime import UTC, datetime

    from vsphere_av.store.jobs import JobStore

    with JobStore.open(settings.state_dir) as jobs:
        exposures = jobs.exposures(vm_moref)
    if not exposures:
        return []
    start = exposures[0].started
    rows: list[tuple[float, str]] = []
    for e in exposures:
        rows.append((e.started, f"started running ({e.trigger})"))
        if e.isolated is not None:
            rows.append((e.isolated, "network isolated (every vNIC disconnected)"
                         if e.isolated > e.started else
                         "network already cut before it booted (startConnected false)"))
        if e.clean is not None:
            rows.append((e.clean, "scanned clean"))
        if e.closed is not None:
            rows.append((e.closed, f"exposure closed: {e.outcome}"
                                   + (f", window {e.window * 1000:.0f} ms"
                                      if e.window is not None else "")))
    with AuditLog.open(settings.state_dir) as log:
        for entry in log.entries():
            if entry.details.get("moref") != vm_moref or not entry.action.startswith(
                    ("scan.", "detection", "remediation", "isolation.release",
                     "isolation.keep")):
                continue
            when = datetime.fromisoformat(entry.time).timestamp()
            if when < start:
                continue      # earlier scans are not part of this instant-on story
            what = entry.action
            if entry.action == "detection":
                what = f"detection: {entry.details.get('path')} ({entry.details.get('threat')})"
            elif entry.action == "remediation":
                what = (f"remediation: {entry.details.get('path')} -> "
                        f"{entry.details.get('result')}")
            elif entry.action == "scan.end":
                what = f"scan end: {entry.details.get('status')}"
            elif entry.action == "scan.start":
                first = not any(w.startswith("scan start") for _, w in rows)
                what = "scan start (ahead of all other work)" if first else "scan start"
            rows.append((when, what))
    rows.sort(key=lambda r: r[0])
    return [{"time": datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds"),
             "seconds": round(t - start, 3), "what": w} for t, w in rows]
