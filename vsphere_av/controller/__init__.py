"""The controller behind ``vsphere-av serve``: instant-on containment, storm-safe scans, restarts.

Called by ``app.start_controller`` (which builds the real collaborators and starts one thread
per loop: :meth:`Controller.watch_inventory`, :meth:`Controller.tail_events`,
:meth:`Controller.housekeeping`, :meth:`Controller.auditing`, ``containment_threads`` x
:meth:`Controller.containing` and ``global_limit`` x :meth:`Controller.work`).
Calls only its collaborators, all passed as keyword arguments:
vCenter ports (inventory watch and event tail factories, an inventory reader, NIC
isolation), a scan function, the state store, the job store, the audit log, the engine's
active signature version and the clock. No pyVmomi here; no thread starts here.

Flow (level-based, as controller-runtime): watch loops turn changes into
``watching.Attention`` keys; :meth:`Controller.attend` re-reads what it knows and decides.
A stale VM that starts running (power on, resume, HA restart, reset, revert while running)
is *contained*: its exposure is opened, its vNICs are cut (``isolate_stale``, the exact
previous state saved first) and it is queued at instant-on priority. Workers take jobs from
the :class:`scheduling.Scheduler` (per-host and global caps), scan, and then release the VM's
network on a clean result or keep it cut on a detection (until a rescan that
``isolation.release_infected`` accepts is clean: :func:`release_allowed`). The triggers of
one power-on (property change, ``VmStartingEvent``, ``VmPoweredOnEvent``) are one exposure
(:meth:`Controller._same_power_on`).

Dormant VMs (issue 12, point 5): with ``scan.via`` auto or disk, a job whose VM is powered
off reads its virtual disks (``App.scan_one`` takes the disk path) under the same per-host
and global caps and priorities as any scan, and the signature sweep queues dormant VMs after
the running ones. A VM found clean that way is protected under the active version before it
wakes: its power-on is not an instant-on (no exposure, no isolation). One found infected has
its vNICs cut while it is off (startConnected false, under the isolation record, held for
the detection); at power-on it stays cut and its guest scan quarantines, and only a rescan
that ``isolation.release_infected`` accepts releases it.

Restart safety: the queue, the event cursor, exposures and isolation records are in
``store.jobs.JobStore`` (SQLite, synchronous writes). Interrupted jobs run again after a
restart; events that arrived while the controller was down are read from the last processed
key and time (on a first start, from vCenter's time when the event tail started, saved at
once); an isolation already recorded is never recorded again (so the state to restore
is never overwritten by the cut state).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any, Protocol

from vsphere_av import errors
from vsphere_av.controller.attention import (
    Attention,
    Protection,
    Trigger,
    Watcher,
    marks_stale,
    needs_instant_on,
    staleness,
)
from vsphere_av.controller.scheduling import CronTicker, Schedule, Scheduler
from vsphere_av.models import (
    INFECTED,
    STALE,
    Audit,
    EventCursor,
    HostInfo,
    Job,
    ObjectChange,
    Priority,
    VcEvent,
    VmInfo,
)
from vsphere_av.store.jobs import JobStore

log = logging.getLogger(__name__)

Clock = Callable[[], float]


# -- collaborator interfaces ---------------------------------------------------------------


class InventoryWatchLike(AbstractContextManager["InventoryWatchLike"], Protocol):
    """``vsphere.watching.InventoryWatch``."""

    def wait(self, max_wait: float) -> list[ObjectChange] | None: ...
    def close(self) -> None: ...


class EventTailLike(AbstractContextManager["EventTailLike"], Protocol):
    """``vsphere.watching.EventTail``; ``start_cursor``: where a tail opened without a cursor
    starts (vCenter's time then), saved at once; None when it resumed from a cursor."""

    start_cursor: EventCursor | None

    def read(self, *, limit: int = 2000) -> list[VcEvent]: ...
    def close(self) -> None: ...


class NicPort(Protocol):
    """vNIC isolation (``vsphere.isolation``), with NIC states as plain dicts."""

    def read(self, vm: str) -> list[dict[str, Any]]: ...
    def isolate(self, vm: str, *,
                before_cut: Callable[[list[dict[str, Any]]], None]) -> tuple[list[dict[str, Any]],
                                                                              int]: ...
    def disconnect(self, vm: str, nics: Sequence[Mapping[str, Any]]) -> int: ...
    def restore(self, vm: str, nics: Sequence[Mapping[str, Any]]) -> int: ...


class ScanOutcome(Protocol):
    """What the scan function returns (``scanning.ScanResult`` fits)."""

    status: str      # clean | infected | incomplete | skipped | unreachable | error
    reason: str
    bytes: int


class ScanFn(Protocol):
    """Scan one VM (``App.scan_one`` fits); ``on_progress`` may raise to stop the scan.

    ``resume_after`` (passed only when set) continues a window-limited scan after that guest
    path; the result's ``resume_point`` says where an interrupted scan got to.
    """

    def __call__(self, vm: VmInfo, *, full: bool = ...,
                 on_progress: Callable[[Any], None] | None = ...,
                 resume_after: str = ...) -> Any: ...


class StateLike(Protocol):
    """The parts of ``store.state.StateStore`` the controller reads and marks."""

    def vm_state(self, vm_moref: Any, *, current_version: int | None = None) -> Any: ...
    def upsert_vm(self, vm: VmInfo) -> None: ...
    def sync_inventory(self, vms: Sequence[VmInfo]) -> None: ...
    def set_protection(self, vm_moref: Any, *, state: str, reason: str,
                       clean_signature_version: int | None = None, scanned: bool = False,
                       full: bool = False) -> None: ...


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerOptions:
    """Tunables of the serve loop (from ``Settings.scan`` and the ``[controller]`` section)."""

    isolate_stale: bool = True
    disk_scans: bool = True                  # scan.via auto | disk: dormant VMs are read
    per_host_limit: int = 4
    global_limit: int = 16
    schedules: tuple[Schedule, ...] = ()
    watch_wait: float = 1.0                  # WaitForUpdatesEx maxWaitSeconds
    event_poll: float = 0.25                 # seconds between event tail reads
    housekeeping: float = 1.0
    retry_base: float = 2.0                  # first retry after a transient guest failure
    retry_max: float = 60.0
    max_attempts: int = 20
    reconnect_max: float = 30.0              # backoff cap when vCenter is unreachable
    inventory_max_age: float = 2.0
    containment_threads: int = 16
    shutdown_grace: float = 20.0
    instant_on_full: bool = False            # instant-on scans read every byte
    release_infected: str = "operator"       # isolation.release_infected (RELEASE_RULES)
    appliance_prefix: str = "vsphere-av-appliance-"   # names of our appliance VMs

    @classmethod
    def from_settings(cls, settings: Any) -> ControllerOptions:
        """Options from ``config.Settings`` (``[controller]`` may override the timings)."""
        return cls(isolate_stale=settings.scan.isolate_stale,
                   disk_scans=settings.scan.via in ("auto", "disk"),
                   release_infected=settings.isolation.release_infected,
                   per_host_limit=settings.scan.per_host_limit,
                   global_limit=settings.scan.global_limit,
                   schedules=tuple(Schedule.from_settings(s) for s in settings.schedules),
                   appliance_prefix=settings.appliances.name_prefix,
                   **asdict(settings.controller))


# The reason of a job an operator asked for (``vsphere-av scan VM``); merged jobs keep it.
OPERATOR_SCAN = "on-demand scan"
# Triggers that belong to a power-on: one power-on is one exposure, however many arrive.
POWER_ON_TRIGGERS = (Trigger.POWERED_ON, Trigger.TOOLS_READY)
# A reset or guest reboot boots again without the power state changing: a new exposure.
REBOOT_CAUSES = frozenset({"VmResettingEvent", "VmGuestRebootEvent"})


def nics_to_restore(recorded: Sequence[Mapping[str, Any]], *,
                    running: bool) -> list[dict[str, Any]]:
    """The vNIC flags a released VM gets back (called by :meth:`Controller.release`).

    The recorded flags, except ``connected``, which is what the VM would have now: a VM
    isolated while it was still powering on recorded ``connected = false`` (ESXi connects a
    vNIC only once the VM runs, when ``startConnected`` is true), so a running VM gets
    connected where it was connected or set to connect at power-on; a powered-off VM
    reports every vNIC disconnected, so only ``startConnected`` matters there.
    """
    return [{**nic, "connected": running and (bool(nic["connected"])
                                              or bool(nic["start_connected"]))}
            for nic in recorded]


def release_allowed(*, held: str, rule: str, operator: bool, full: bool) -> bool:
    """Whether a clean scan releases an isolated VM (called by :meth:`Controller.run_job`).

    A VM isolated only because it was stale goes back on the network with any clean scan.
    One held since a detection follows ``isolation.release_infected``: ``operator`` (only a
    scan an operator asked for), ``clean_rescan`` (also any clean full rescan).
    """
    if not held or operator:
        return True
    return rule == "clean_rescan" and full


def cut_network(*, jobs: JobStore, nics: NicPort, vm: str, name: str,
                reason: str) -> tuple[bool, list[Any], int, bool]:
    """Cut every vNIC of ``vm`` under the one isolation record (save first, then cut).

    Called by :meth:`Controller.isolate` (instant-on) and ``app.App`` (a powered-off VM a
    disk scan found infected), so :meth:`Controller.release` and ``release_infected`` apply
    to both alike. Returns (cut now, previous NIC states, NICs edited, finished a cut a
    crash interrupted); (False, [], 0, False) when the VM is isolated already, so the state
    to restore is never replaced by the cut one.
    """
    existing = jobs.isolation(vm)
    if existing is not None:
        if existing.state == "pending":
            # The process died between saving and cutting: finish the cut.
            changed = nics.disconnect(vm, existing.nics)
            jobs.confirm_isolation(vm)
            return True, list(existing.nics), changed, True
        return False, [], 0, False

    def save(states: list[dict[str, Any]]) -> None:
        # The exact previous state is durable before the first NIC is touched.
        jobs.record_isolation(vm=vm, vm_name=name, nics=states, reason=reason, state="pending")

    before, changed = nics.isolate(vm, before_cut=save)
    jobs.confirm_isolation(vm)
    return True, before, changed, False


class ScanInterrupted(errors.VsphereAvError):
    """Raised from the progress callback to stop a scan (shutdown, time window closed)."""


@dataclass
class Stats:
    """Counters for logs, the benchmark and tests."""

    contained: int = 0
    isolated: int = 0
    released: int = 0
    kept_isolated: int = 0
    scans: int = 0
    retries: int = 0
    bytes: int = 0
    events: int = 0
    reconnects: int = 0
    results: dict[str, int] = field(default_factory=dict)


class Controller:
    """See the module docstring. One instance per ``vsphere-av serve`` process."""

    def __init__(self, *, options: ControllerOptions, state: StateLike, jobs: JobStore,
                 audit: Audit, actor: str, active_version: Callable[[], int | None],
                 read_inventory: Callable[[], tuple[list[VmInfo], list[HostInfo]]],
                 open_inventory_watch: Callable[[], InventoryWatchLike],
                 open_event_tail: Callable[[EventCursor | None], EventTailLike],
                 nics: NicPort, scan: ScanFn, now: Clock,
                 sleep: Callable[[float], None] | None = None) -> None:
        self.options = options
        self.state = state
        self.jobs = jobs
        self.audit = audit
        self.actor = actor
        self._active_version = active_version
        self._read_inventory = read_inventory
        self._open_watch = open_inventory_watch
        self._open_tail = open_event_tail
        self.nics = nics
        self._scan = scan
        self.now = now
        self._sleep = sleep
        self.scheduler = Scheduler(per_host_limit=options.per_host_limit,
                                   global_limit=options.global_limit, now=now, journal=jobs)
        self.watcher = Watcher()
        self._watch_lock = threading.Lock()
        self.stats = Stats()
        self._stats_lock = threading.Lock()
        self._inv_lock = threading.Lock()
        self._inv_vms: dict[str, VmInfo] = {}
        self._inv_hosts: dict[str, HostInfo] = {}
        self._inv_time = float("-inf")
        self._containing: queue.Queue[tuple[str, Attention, str]] = queue.Queue()
        self._containing_now: set[str] = set()
        # Latest time each VM was seen stopped (event time or watch time): a power-on trigger
        # after it starts a new exposure; one before it belongs to an exposure already had.
        self._stopped_at: dict[str, float] = {}
        self._contain_lock = threading.Lock()
        self._swept_version: int | None = None
        self._ticker_lock = threading.Lock()
        self._ticker = CronTicker(list(options.schedules),
                                  started=datetime.fromtimestamp(now(), UTC))
        self._outbox_wakeup = threading.Event()
        self._outbox_lock = threading.Lock()
        self.inventory_ready = threading.Event()
        self.events_ready = threading.Event()

    # -- start-up --------------------------------------------------------------------------

    def restore_queue(self) -> int:
        """Queue again what the store holds (queued and interrupted jobs); returns how many."""
        self.flush_audit()        # entries queued by a controller that died
        pending = self.jobs.pending_jobs()
        interrupted = [j for j, running in pending if running]
        for job in interrupted:
            self._audit("job.resumed", moref=job.vm, host_moref=job.host, job_id=job.job_id,
                        priority=job.priority.label, reason="interrupted by a controller stop")
        count = self.scheduler.restore(j for j, _ in pending)
        # Containments that were decided but had not run when the process died.
        for exposure in self.jobs.exposures():
            if exposure.closed is None and not self.scheduler.is_busy(exposure.vm):
                self._queue_containment(exposure.vm, Attention(
                    exposure.vm, Trigger.POWERED_ON, "resume open exposure", exposure.started,
                    event_key=exposure.event_key), "contained before a controller stop")
        # Isolations that were only an intent when the process died: cut them now (their
        # saved state is the one from before, so restoring later is still exact).
        for rec in self.jobs.isolations():
            if rec.state == "pending":
                self._queue_containment(rec.vm, Attention(rec.vm, Trigger.POWERED_ON,
                                                          "resume pending isolation", self.now()),
                                        rec.reason)
        return count

    # -- inventory -------------------------------------------------------------------------

    def inventory(self, *, max_age: float | None = None) -> tuple[dict[str, VmInfo],
                                                                   dict[str, HostInfo]]:
        """VMs and hosts by moref, re-read from vCenter when older than ``max_age``."""
        limit = self.options.inventory_max_age if max_age is None else max_age
        with self._inv_lock:
            if self.now() - self._inv_time > limit:
                vms, hosts = self._read_inventory()
                self._inv_vms = {str(v.moref): v for v in vms}
                self._inv_hosts = {str(h.moref): h for h in hosts}
                self._inv_time = self.now()
            return dict(self._inv_vms), dict(self._inv_hosts)

    def _vm(self, moref: str) -> VmInfo | None:
        vms, _ = self.inventory()
        vm = vms.get(moref)
        facts = self.watcher.facts(moref)
        if vm is None or (facts is not None and (facts.power_state != vm.power_state
                                                 or (facts.host and vm.host is not None
                                                     and facts.host != vm.host.moref))):
            vms, _ = self.inventory(max_age=0.0)     # the cache is behind the watch: re-read
            vm = vms.get(moref)
        return vm

    # -- attention: the level-based decision ---------------------------------------------

    def attend(self, items: Iterable[Attention]) -> None:
        """Decide what each attention item needs; containment is handed to its own threads."""
        version = self._active_version()
        for item in items:
            try:
                self._attend_one(item, version)
            except errors.VsphereAvError as exc:
                log.warning("handling %s of %s failed: %s", item.trigger.value, item.vm, exc)

    def _attend_one(self, item: Attention, version: int | None) -> None:
        vm = item.vm
        if item.trigger is Trigger.REMOVED:
            if self.scheduler.cancel_vm(vm):
                self._audit("job.cancelled", moref=vm, reason="VM removed from the inventory")
            return
        if item.trigger is Trigger.MIGRATED and item.host:
            self.scheduler.note_vm_host(vm, item.host)
        facts = self.watcher.facts(vm)
        if facts is not None and (facts.template or self._is_appliance(vm, facts.name)):
            return      # templates never run; our appliances are never contained or scanned
        if item.trigger is Trigger.POWERED_OFF and (facts is None or not facts.running):
            # Only a stop the watch agrees with: a late power-off event of an earlier run
            # must not split the run that follows it.
            with self._contain_lock:
                self._stopped_at[vm] = max(self._stopped_at.get(vm, item.at), item.at)
        mark = marks_stale(item, watched_hosts=self.watcher.hosts)
        record = self.state.vm_state(vm, current_version=version)
        if mark is not None:
            if record is None:
                info = self._vm(vm)
                if info is not None:
                    self.state.upsert_vm(info)
                    record = self.state.vm_state(vm, current_version=version)
            if record is not None and record.state != INFECTED:
                self.state.set_protection(vm, state=STALE, reason=mark)
                record = self.state.vm_state(vm, current_version=version)
                self._audit("vm.stale", moref=vm, vm=facts.name if facts else "",
                            reason=mark, cause=item.cause)
        protection = (Protection(record.state, record.signature_version, record.reason)
                      if record is not None else None)
        reason = staleness(protection, active_version=version)
        running = facts.running if facts is not None else False
        if item.trigger is Trigger.LISTED:
            # Running when the controller started: not an instant-on event. Stale ones are
            # rescanned in the background; isolated ones (a crash before release) too.
            with self._contain_lock:
                containing = vm in self._containing_now
            if containing or self.scheduler.is_busy(vm):
                return      # restored from the store, or contained from the event catch-up
            if running and (reason is not None or self.jobs.isolation(vm) is not None):
                self.scheduler.submit(vm=vm, host=facts.host if facts else item.host,
                                      priority=Priority.SWEEP, reason=f"running at start: {reason}")
            return
        if needs_instant_on(item, running=running, stale_reason=reason):
            assert reason is not None
            if item.trigger in POWER_ON_TRIGGERS and self._same_power_on(vm, item):
                log.debug("%s of %s joins its power-on's exposure", item.cause, vm)
                return
            self._queue_containment(vm, item, reason)

    def _same_power_on(self, vm: str, item: Attention) -> bool:
        """True when ``item`` belongs to a power-on that already has an exposure.

        A power-on arrives as a ``runtime.powerState`` change, ``VmStartingEvent`` and
        ``VmPoweredOnEvent``, in any order and possibly after the scan's verdict. The VM's
        last exposure covers every such trigger until the VM is seen stopped after it
        started; a trigger older than that stop is a late one of a run already handled.
        An exposure ended because the VM was not running yet (a start event ahead of the
        power state) covers nothing.
        """
        if item.cause in REBOOT_CAUSES:
            return False
        exposures = self.jobs.exposures(vm)
        if not exposures:
            return False
        last = exposures[-1]
        if last.closed is not None and last.outcome.startswith("VM "):
            return False
        with self._contain_lock:
            stopped = self._stopped_at.get(vm)
        if stopped is not None and last.started < stopped <= item.at:
            return False
        if last.closed is None:
            # Still open: a cut that has not happened (or failed) is done by containing.
            record = self.jobs.isolation(vm)
            return not self.options.isolate_stale or (record is not None
                                                      and record.state == "isolated")
        return True

    # -- containment (instant-on) ----------------------------------------------------------

    def _is_appliance(self, vm: str, name: str) -> bool:
        """True for our own appliance VMs, which must keep their network.

        The watch does not carry extraConfig (it would send every VM's advanced settings on
        each change), so the name prefix picks candidates and the marker decides.
        """
        if not name.startswith(self.options.appliance_prefix):
            return False
        info = self._vm(vm)
        return info is not None and info.is_appliance

    def _queue_containment(self, vm: str, item: Attention, reason: str) -> None:
        with self._contain_lock:
            if vm in self._containing_now:
                return
            self._containing_now.add(vm)
        # The exposure is durable before the event cursor moves past its cause: a controller
        # killed before the containment ran finds it open at restart and contains the VM then.
        facts = self.watcher.facts(vm)
        seen = self.now()
        self.jobs.open_exposure(vm=vm, vm_name=facts.name if facts else "", trigger=item.cause,
                                started=min(item.at, seen), seen=seen, event_key=item.event_key)
        self._containing.put((vm, item, reason))

    def containing(self, stop: threading.Event) -> None:
        """Containment thread: open the exposure, cut the network, queue first."""
        while not stop.is_set():
            try:
                vm, item, reason = self._containing.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.contain(vm, item, reason)
            except errors.VsphereAvError as exc:
                log.warning("containing %s failed: %s", vm, exc)
                # Still scan it first: a failed isolation must not also delay the scan.
                facts = self.watcher.facts(vm)
                self.scheduler.submit(vm=vm, host=facts.host if facts else item.host,
                                      priority=Priority.INSTANT_ON, reason=reason)
            finally:
                with self._contain_lock:
                    self._containing_now.discard(vm)

    def contain(self, vm: str, item: Attention, reason: str) -> None:
        """Instant-on for one stale running VM (idempotent: a repeat only re-queues)."""
        facts = self.watcher.facts(vm)
        name = facts.name if facts else ""
        host = facts.host if facts else item.host
        seen = self.now()
        if item.trigger is not Trigger.REVERTED and self.scheduler.is_busy(vm):
            # Already queued or being scanned: the same power-on seen again (property
            # change, then its events), or a contained VM migrating. Only an unfinished cut
            # still needs doing; a revert needs a new scan (the disk changed).
            record = self.jobs.isolation(vm)
            if not self.options.isolate_stale or (record is not None
                                                  and record.state == "isolated"):
                self._stamp_isolated(vm)
                return
        self.jobs.open_exposure(vm=vm, vm_name=name, trigger=item.cause,
                                started=min(item.at, seen), seen=seen, event_key=item.event_key)
        with self._stats_lock:
            self.stats.contained += 1
        nics: list[Any] = []
        changed = 0
        isolated = False
        if self.options.isolate_stale:
            isolated, nics, changed = self.isolate(vm, name=name, reason=reason)
        job = self.scheduler.submit(vm=vm, host=host, priority=Priority.INSTANT_ON,
                                    reason=f"{item.trigger.value}: {reason}")
        # One audit entry per containment, through the outbox: the audit log is fsynced and
        # a storm of power-ons must not wait on it between two isolations.
        self._audit_soon("isolation.isolate" if isolated else "instant-on", vm=name, moref=vm,
                    host_moref=host, trigger=item.cause, event_key=item.event_key,
                    reason=reason, job_id=job.job_id, priority="instant-on",
                    isolated=isolated or self.jobs.isolation(vm) is not None,
                    nics=[n.get("label", n.get("key")) for n in nics], changed=changed)

    def isolate(self, vm: str, *, name: str, reason: str) -> tuple[bool, list[Any], int]:
        """Cut every vNIC, saving the exact previous state first.

        Returns (cut now, previous NIC states, NICs edited); (False, [], 0) when the VM was
        isolated already, so the state to restore is never replaced by the cut one.
        """
        cut, before, changed, finished = cut_network(jobs=self.jobs, nics=self.nics, vm=vm,
                                                     name=name, reason=reason)
        if cut:
            self.jobs.mark_exposure(vm, isolated=self.now())
        else:
            self._stamp_isolated(vm)
        if cut and not finished:
            with self._stats_lock:
                self.stats.isolated += 1
        return cut, before, changed

    def _stamp_isolated(self, vm: str) -> None:
        """Stamp the open exposure of a VM that was isolated already: isolated since it
        started running when the cut came first (a disk scan found it infected while it was
        off, or an earlier run kept it cut), so its window is zero."""
        exposure = self.jobs.open_exposure_for(vm)
        record = self.jobs.isolation(vm)
        if exposure is None or record is None or record.state != "isolated":
            return
        self.jobs.mark_exposure(vm, isolated=max(exposure.started,
                                                 min(record.since, self.now())))

    def release(self, vm: str, *, name: str, host: str, running: bool,
                why: str = "scanned clean") -> bool:
        """Put back the saved vNIC state (see :func:`nics_to_restore`); False if not isolated."""
        rec = self.jobs.isolation(vm)
        if rec is None:
            return False
        changed = self.nics.restore(vm, nics_to_restore(rec.nics, running=running))
        self.jobs.clear_isolation(vm)
        with self._stats_lock:
            self.stats.released += 1
        self._audit("isolation.release", vm=name or rec.vm_name, moref=vm, host_moref=host,
                    reason=why, changed=changed)
        return True

    # -- workers ---------------------------------------------------------------------------

    def work(self, stop: threading.Event) -> None:
        """Worker thread: take the most urgent job that may start, run it, report back."""
        while not stop.is_set():
            if not self._containing.empty():
                # Containment first: cutting the network of every stale VM that just started
                # closes exposure windows; scans can wait the few milliseconds that takes.
                stop.wait(0.02)
                continue
            job = self.scheduler.take(stop=stop, timeout=0.5)
            if job is None:
                continue
            try:
                self.run_job(job, stop=stop)
            except Exception:
                # A bug must not kill the worker or lose the job: retry later.
                log.exception("job %s for %s failed", job.job_id, job.vm)
                self.scheduler.finish(job, retry_after=self.options.retry_max)

    def run_job(self, job: Job, *, stop: threading.Event | None = None) -> None:
        """Scan one job's VM (re-reading its state first) and act on the verdict."""
        try:
            vm = self._vm(job.vm)
        except errors.VsphereAvError as exc:
            self._retry(job, f"cannot read inventory: {exc}",
                        outage=isinstance(exc, errors.ConnectionLost))
            return
        if vm is None:
            self.scheduler.finish(job)
            self._audit("job.dropped", moref=job.vm, job_id=job.job_id, reason="VM is gone")
            return
        facts = self.watcher.facts(job.vm)
        if not vm.powered_on and facts is not None and facts.running:
            # Starting now (the watch saw it before vCenter's inventory did): its running
            # disks are not the dormant ones to read, and its containment waits for this job.
            self.scheduler.finish(job, retry_after=self.options.retry_base)
            return
        if not vm.powered_on and not self.options.disk_scans:
            # Nothing to read; it stays stale and is contained when it starts running.
            self.scheduler.finish(job)
            self.jobs.mark_exposure(job.vm, outcome=f"VM {vm.power_state}", close=True)
            self._audit("job.dropped", vm=vm.name, moref=job.vm, job_id=job.job_id,
                        reason=f"VM is {vm.power_state}")
            return
        host = vm.host.moref if vm.host else job.host
        # The audit log tells the story in order: the containment entry (queued in the
        # outbox during a storm) goes in before this scan's start.
        self.flush_audit()
        window_close = self._window_close(job)
        interrupted: list[str] = []

        def on_progress(_tick: Any) -> None:
            if stop is not None and stop.is_set():
                interrupted.append("controller stopping")
            elif window_close is not None and self.now() >= window_close:
                interrupted.append("time window closed")
            if interrupted:
                raise ScanInterrupted(f"scan interrupted: {interrupted[0]}")

        # A window-limited job cut off before continues where it stopped (issue 5, point 5).
        resume = {"resume_after": job.resume_after} if job.resume_after else {}
        result = self._scan(vm, full=job.full, on_progress=on_progress, **resume)
        with self._stats_lock:
            self.stats.scans += 1
            self.stats.bytes += int(getattr(result, "bytes", 0) or 0)
            self.stats.results[result.status] = self.stats.results.get(result.status, 0) + 1
        if interrupted:
            # Only a closed window continues where it stopped: a controller stop starts over,
            # like any interrupted job (the next window may be hours away; a restart is not).
            point = ""
            if interrupted[0] == "time window closed":
                point = str(getattr(result, "resume_point", "") or job.resume_after)
            again = self.scheduler.put_back(job, resume_after=point)
            self._audit("job.interrupted", vm=vm.name, moref=job.vm, job_id=job.job_id,
                        reason=interrupted[0], requeued=again is not None,
                        resume_after=again.resume_after if again is not None else "")
            return
        status = result.status
        facts = self.watcher.facts(job.vm)
        if not vm.powered_on and facts is not None and facts.running \
                and self.jobs.open_exposure_for(job.vm) is not None:
            # It was started while its disks were read: the verdict is its disk's (recorded),
            # the power-on's exposure gets a scan of its own, ahead of other work.
            self.scheduler.finish(job)
            again = self.scheduler.submit(vm=job.vm, host=facts.host or host,
                                          priority=Priority.INSTANT_ON,
                                          reason="powered on while its disks were read")
            self._audit("job.requeued", vm=vm.name, moref=job.vm, job_id=again.job_id,
                        priority="instant-on", verdict=status,
                        reason="powered on while its disks were read")
            return
        # The exposure is closed last, so whoever waits for it finds everything else done.
        if status == "clean":
            verdict = self.now()
            isolation = self.jobs.isolation(job.vm)
            operator = OPERATOR_SCAN in job.reason.split("; ")
            if isolation is None or release_allowed(
                    held=isolation.held, rule=self.options.release_infected,
                    operator=operator, full=bool(getattr(result, "full", job.full))):
                # What the VM does now, not when the scan began (it may have started since).
                self.release(job.vm, name=vm.name, host=host,
                             running=facts.running if facts is not None else vm.powered_on,
                             why="operator's rescan clean" if operator else "scanned clean")
            else:
                with self._stats_lock:
                    self.stats.kept_isolated += 1
                self._audit("isolation.keep", vm=vm.name, moref=job.vm, host_moref=host,
                            reason=self._hold_reason(), job_id=job.job_id,
                            release_infected=self.options.release_infected)
            self.scheduler.finish(job)
            self.jobs.mark_exposure(job.vm, clean=verdict, outcome="clean", close=True)
        elif status == "infected":
            if self.jobs.isolation(job.vm) is not None:
                self.jobs.hold_isolation(job.vm, held=f"detection (job {job.job_id})")
                with self._stats_lock:
                    self.stats.kept_isolated += 1
                self._audit("isolation.keep", vm=vm.name, moref=job.vm, host_moref=host,
                            reason=f"detection: {self._hold_reason()}",
                            release_infected=self.options.release_infected)
            self.scheduler.finish(job)
            self.jobs.mark_exposure(job.vm, outcome="infected", close=True)
        elif status == "unreachable" and "invalid guest login" in result.reason:
            # Permanent until the configuration changes; a stale VM stays contained.
            self.scheduler.finish(job)
            self.jobs.mark_exposure(job.vm, outcome="unreachable: invalid guest login",
                                    close=True)
        elif status in ("unreachable", "error"):
            # A scan cut by an outage failed (the VM is unprotected, not clean): run it again.
            self._retry(job, result.reason, outage=bool(getattr(result, "outage", False)))
        elif status == "incomplete":
            # Not everything could be read (a damaged or encrypted disk, files that would not
            # open): the VM is unprotected, not clean. Running the job again would read the
            # same; a contained VM stays cut until a scan is clean.
            isolated = self.jobs.isolation(job.vm) is not None
            if isolated:
                with self._stats_lock:
                    self.stats.kept_isolated += 1
            self.scheduler.finish(job)
            self._audit("job.incomplete", vm=vm.name, moref=job.vm, host_moref=host,
                        job_id=job.job_id, reason=result.reason, isolated=isolated)
            self.jobs.mark_exposure(job.vm, outcome=f"incomplete: {result.reason}", close=True)
        else:                                      # skipped (powered off meanwhile)
            self.scheduler.finish(job)

    def _hold_reason(self) -> str:
        if self.options.release_infected == "clean_rescan":
            return "stays isolated until an operator's rescan or a full rescan is clean"
        return "stays isolated until an operator's rescan is clean"

    def _retry(self, job: Job, reason: str, *, outage: bool = False) -> None:
        """Queue a failed job again with backoff, or give up after ``max_attempts``.

        Called by :meth:`run_job`. ``outage``: vCenter or the VM's host stopped answering
        (``errors.ConnectionLost``); the job is not at fault, so it is never given up on and
        is retried at most ``reconnect_max`` apart (the watch loops' pace) until vCenter
        answers again and the scan can run.
        """
        # An appliance that is down is repaired by the reconcile loop: its host's jobs wait
        # (at the slowest retry pace) however long that takes, and are never given up on.
        appliance = "appliance down" in reason or "appliance unhealthy" in reason
        waiting = appliance or outage
        if job.attempts >= self.options.max_attempts and not waiting:
            self.scheduler.finish(job)
            self.jobs.mark_exposure(job.vm, outcome=f"gave up: {reason}", close=True)
            self._audit("job.failed", moref=job.vm, job_id=job.job_id, reason=reason,
                        attempts=job.attempts)
            return
        # (The exponent is bounded: an outage of hours keeps counting attempts.)
        delay = min(self.options.retry_max,
                    self.options.retry_base * 2 ** min(job.attempts - 1, 32))
        if appliance:
            delay = self.options.retry_max
        elif outage:
            delay = min(delay, self.options.reconnect_max)
        with self._stats_lock:
            self.stats.retries += 1
        self.scheduler.finish(job, retry_after=delay)
        log.info("retrying %s in %.0fs: %s", job.vm, delay, reason)

    def _window_close(self, job: Job) -> float | None:
        if job.window is None:
            return None
        return job.window.closes_at(datetime.fromtimestamp(self.now(), UTC)).timestamp()

    # -- watch loops -----------------------------------------------------------------------

    def _pause(self, stop: threading.Event, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            stop.wait(seconds)

    def watch_inventory(self, stop: threading.Event) -> None:
        """Property watch thread: WaitForUpdatesEx on a container view; reconnects with backoff."""
        backoff = 1.0
        while not stop.is_set():
            try:
                with self._open_watch() as watch:
                    backoff = 1.0
                    first = True
                    while not stop.is_set():
                        changes = watch.wait(self.options.watch_wait)
                        if changes is None:
                            continue
                        with self._watch_lock:
                            if first:
                                self.watcher.synced = False
                            items = self.watcher.apply_changes(changes, at=self.now())
                            if first:
                                items = [self._listed(i) for i in items]
                                self.watcher.synced = True
                                self._note_stopped_listed()
                        if first:
                            first = False
                            self.inventory_ready.set()
                            # Power-ons and reverts missed while we were down come from the
                            # event tail's catch-up: let it contain those VMs before the
                            # listing queues running VMs for background rescans.
                            self.events_ready.wait(self.options.reconnect_max)
                        self.attend(items)
            except errors.VsphereAvError as exc:
                with self._stats_lock:
                    self.stats.reconnects += 1
                log.warning("inventory watch lost (%s); reconnecting in %.0fs", exc, backoff)
                self._pause(stop, backoff)
                backoff = min(self.options.reconnect_max, backoff * 2)

    def _note_stopped_listed(self) -> None:
        # Stopped at (re)connection: whatever exposure came before has ended (the power-off
        # events may be older than the event cursor); the caller holds the watch lock.
        now = self.now()
        with self._contain_lock:
            for moref, facts in self.watcher.vms.items():
                if not facts.running:
                    self._stopped_at[moref] = max(self._stopped_at.get(moref, now), now)

    def _listed(self, item: Attention) -> Attention:
        # The first listing after (re)connecting reports every running VM: that is not a
        # power-on. Power-ons missed meanwhile arrive through the event tail.
        if item.trigger is Trigger.POWERED_ON:
            return Attention(item.vm, Trigger.LISTED, "initial listing", item.at, host=item.host)
        return item

    def tail_events(self, stop: threading.Event) -> None:
        """Event thread: read new events from the last processed key and time, reconnecting."""
        backoff = 1.0
        # Events are judged against the VMs' current facts: wait for the first listing.
        while not stop.is_set() and not self.inventory_ready.wait(0.2):
            pass
        while not stop.is_set():
            try:
                with self._open_tail(self.jobs.cursor()) as tail:
                    if tail.start_cursor is not None:
                        # First start (no cursor yet): keep where the tail starts now, not
                        # after the first event, so that power-ons while a controller that
                        # crashed before any event was down are still read at restart.
                        self.jobs.save_cursor(tail.start_cursor)
                    backoff = 1.0
                    while not stop.is_set():
                        events = tail.read()
                        if events:
                            self.handle_events(events)
                        self.events_ready.set()
                        self._pause(stop, self.options.event_poll)
            except errors.VsphereAvError as exc:
                with self._stats_lock:
                    self.stats.reconnects += 1
                log.warning("event tail lost (%s); reconnecting in %.0fs", exc, backoff)
                self._pause(stop, backoff)
                backoff = min(self.options.reconnect_max, backoff * 2)

    def handle_events(self, events: Sequence[VcEvent]) -> None:
        """Handle one page of events, then move the durable cursor past them."""
        fresh = [e for e in events if not self.jobs.seen_event(e.key)]
        with self._watch_lock:
            items = self.watcher.apply_events(fresh)
        # Events can run ahead of the property watch: give the watch a moment to see the
        # power state the event talks about, since the decision reads it.
        self.attend(items)
        with self._stats_lock:
            self.stats.events += len(fresh)
        if events:
            last = max(events, key=lambda e: e.key)
            self.jobs.mark_events([e.key for e in fresh])
            self.jobs.save_cursor(EventCursor(last.key, last.created.isoformat()))

    # -- housekeeping ------------------------------------------------------------------------

    def housekeeping(self, stop: threading.Event) -> None:
        """Housekeeping thread: hand-over requests, sweeps, schedules, published state."""
        while not stop.is_set():
            try:
                self.housekeep_once()
            except errors.VsphereAvError as exc:
                log.warning("housekeeping: %s", exc)
            self._pause(stop, self.options.housekeeping)

    def housekeep_once(self) -> None:
        """One round of housekeeping (also called by tests)."""
        self.jobs.beat(os.getpid())
        self._take_requests()
        self._sweep_if_new_version()
        self.fire_schedules()
        self.publish()

    def _take_requests(self) -> None:
        requests = self.jobs.take_requests()
        if not requests:
            return
        vms, _ = self.inventory(max_age=0.0)
        by_name = {v.name: v for v in vms.values()} | vms
        for request_id, key, full in requests:
            vm = by_name.get(key)
            if vm is None:
                self._audit("job.rejected", vm=key, request_id=request_id, reason="no such VM")
                continue
            job = self.scheduler.submit(vm=str(vm.moref), host=vm.host.moref if vm.host else "",
                                        priority=Priority.ON_DEMAND, full=full,
                                        reason=OPERATOR_SCAN)
            self._audit("job.queued", vm=vm.name, moref=vm.moref, job_id=job.job_id,
                        priority="on-demand", request_id=request_id)

    def rescan_hosts(self, hosts: Iterable[str]) -> int:
        """Queue an on-demand scan of every running VM on these hosts (their appliance is back).

        While a host's appliance was down its VMs could start or change unscanned; the
        incremental index keeps this cheap for the files that did not change.
        """
        wanted = set(hosts)
        vms, _hosts = self.inventory()
        queued = 0
        for vm in vms.values():
            if (vm.host and vm.host.moref in wanted and vm.powered_on and not vm.template
                    and not vm.is_appliance):
                self.scheduler.submit(vm=str(vm.moref), host=vm.host.moref,
                                      priority=Priority.ON_DEMAND, reason="appliance back")
                queued += 1
        if queued:
            self._audit("rescan.queued", hosts=sorted(wanted), vms=queued,
                        reason="appliance back")
        return queued

    def _sweep_if_new_version(self) -> None:
        version = self._active_version()
        if version is None:
            return
        if self._swept_version is None:
            stored = self.jobs.get_meta("swept_version")
            self._swept_version = int(stored) if stored else version
            if not stored:
                self.jobs.set_meta("swept_version", str(version))
        if version <= self._swept_version:
            return
        count = self.sweep(version)
        self._swept_version = version
        self.jobs.set_meta("swept_version", str(version))
        self._audit("signatures.sweep", signature_version=version, queued=count)

    def sweep(self, version: int) -> int:
        """Queue every VM not clean under ``version``: running ones first, then dormant ones
        (read through their disks) when ``disk_scans``; returns how many were queued."""
        vms, _ = self.inventory(max_age=0.0)
        count = 0
        for vm in sorted(vms.values(), key=lambda v: (not v.powered_on, v.name)):
            if vm.template or vm.is_appliance:
                continue
            if not vm.powered_on and not self.options.disk_scans:
                continue      # stale now, and contained when it starts
            record = self.state.vm_state(vm.moref, current_version=version)
            protection = (Protection(record.state, record.signature_version, record.reason)
                          if record is not None else None)
            if staleness(protection, active_version=version) is None:
                continue
            self.scheduler.submit(vm=str(vm.moref), host=vm.host.moref if vm.host else "",
                                  priority=Priority.SWEEP,
                                  reason=f"signature version {version}")
            count += 1
        return count

    def fire_schedules(self, at: datetime | None = None) -> int:
        """Queue the VMs of every schedule due at ``at`` (default: now); returns jobs queued."""
        now = at or datetime.fromtimestamp(self.now(), UTC)
        with self._ticker_lock:
            fired = self._ticker.due(now)
        if not fired:
            return 0
        vms, _ = self.inventory(max_age=0.0)
        total = 0
        for schedule, fire in fired:
            count = 0
            for vm in vms.values():
                if vm.template or vm.is_appliance:
                    continue
                if not fnmatchcase(vm.name, schedule.vms):
                    continue
                self.scheduler.submit(vm=str(vm.moref), host=vm.host.moref if vm.host else "",
                                      priority=Priority.SCHEDULED, full=schedule.full,
                                      reason=f"schedule {schedule.name}",
                                      delay=schedule.offset_for(str(vm.moref), fire),
                                      window=schedule.window)
                count += 1
            total += count
            self._audit("schedule.fired", schedule=schedule.name, queued=count,
                        at=fire.isoformat())
        return total

    def publish(self) -> None:
        """Write per-host queue and slot counts for ``status --json``."""
        # Host names come from the property watch: no inventory round trip every second.
        with self._watch_lock:
            names = {moref: str(facts.get("name") or moref)
                     for moref, facts in self.watcher.hosts.items()}
        stats = self.scheduler.host_stats()
        rows: dict[str, tuple[str, int, int]] = {moref: (name, 0, 0)
                                                 for moref, name in names.items()}
        for moref, s in stats.items():
            if moref:
                rows[moref] = (names.get(moref, moref), s.waiting, s.borrowed)
        self.jobs.publish_hosts(rows)

    # -- misc --------------------------------------------------------------------------------

    def _audit(self, action: str, **details: Any) -> None:
        self.audit.append(actor=self.actor, action=action, details=details)

    def _audit_soon(self, action: str, **details: Any) -> None:
        """Durably queue an audit entry (job store) for the auditing thread."""
        details.setdefault("at", datetime.fromtimestamp(self.now(), UTC).isoformat())
        self.jobs.outbox_add(action, details)
        self._outbox_wakeup.set()

    def flush_audit(self) -> int:
        """Move queued audit entries into the audit log, in order; returns how many."""
        moved = 0
        with self._outbox_lock:
            while True:
                batch = self.jobs.outbox()
                if not batch:
                    return moved
                for outbox_id, action, details in batch:
                    self.audit.append(actor=self.actor, action=action, details=details)
                    # A crash between these two lines repeats one entry; never loses one.
                    self.jobs.outbox_done(outbox_id)
                    moved += 1

    def auditing(self, stop: threading.Event) -> None:
        """Auditing thread: move outbox entries into the audit log as they come."""
        while not stop.is_set():
            self._outbox_wakeup.wait(0.5)
            self._outbox_wakeup.clear()
            try:
                self.flush_audit()
            except errors.VsphereAvError as exc:
                log.warning("audit outbox: %s", exc)
        self.flush_audit()

    def shutdown(self) -> None:
        """Wake every waiting worker (called after the stop event is set)."""
        self.scheduler.close()
