"""What every room of the controller shares: its ports, options, state and audit path.

Imported by the controller's rooms (``journal``, ``containment``, ``watching``, ``workers``,
``housekeeping``), whose mixins all build on :class:`ControllerBase`, and by the face
(``controller/__init__.py``). Calls only the collaborators it is given (keyword arguments):
vCenter ports, the state store, the job store, the audit log, the clock; and
``scheduling.Scheduler``, which it builds with the job store as its journal. No pyVmomi
here; no thread starts here.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from vsphere_av.config import ControllerSettings
from vsphere_av.controller.attention import Attention, Watcher
from vsphere_av.controller.scheduling import CronTicker, Schedule, Scheduler
from vsphere_av.models import Audit, EventCursor, HostInfo, ObjectChange, VcEvent, VmInfo
from vsphere_av.store.jobs import JobStore

Clock = Callable[[], float]

# The reason of a job an operator asked for (``vsphere-av scan VM``); merged jobs keep it.
OPERATOR_SCAN = "on-demand scan"


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
    """What the scan function returns (``scan.ScanResult`` fits)."""

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
class ControllerOptions(ControllerSettings):
    """Tunables of the serve loop: the ``[controller]`` section's timings (inherited from
    ``config.ControllerSettings``) and what it takes from ``[scan]``, ``[isolation]``,
    ``[appliances]`` and ``[[schedule]]``."""

    isolate_stale: bool = True
    disk_scans: bool = True                  # scan.via auto | disk: dormant VMs are read
    per_host_limit: int = 4
    global_limit: int = 16
    schedules: tuple[Schedule, ...] = ()
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


class ControllerBase:
    """The collaborators and state that the rooms share (one set per ``Controller``)."""

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

    def _is_appliance(self, vm: str, name: str) -> bool:
        """True for our own appliance VMs, which must keep their network.

        The watch does not carry extraConfig (it would send every VM's advanced settings on
        each change), so the name prefix picks candidates and the marker decides.
        """
        if not name.startswith(self.options.appliance_prefix):
            return False
        info = self._vm(vm)
        return info is not None and info.is_appliance

    # -- misc --------------------------------------------------------------------------------

    def _audit(self, action: str, **details: Any) -> None:
        self.audit.append(actor=self.actor, action=action, details=details)

    def _pause(self, stop: threading.Event, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            stop.wait(seconds)

    def shutdown(self) -> None:
        """Wake every waiting worker (called after the stop event is set)."""
        self.scheduler.close()
