"""Scan scheduling: per-host slots, a global cap, priorities, cron schedules with jitter.

Called by the controller's rooms (submit work, ``workers.working`` takes jobs and they are
finished, migrations ``move_vm``), by ``app`` (``vsphere-av scan`` without a controller: the
same queue, caps and worker loop, no journal) and by ``cli`` for statistics. Calls nothing
but its collaborators (``[[schedule]]`` tables arrive typed, as ``config.ScheduleSettings``):
a clock (``now``) and an optional ``journal`` (``store.jobs.JobStore``) that makes the queue
durable. No threads start here; the worker threads block in :meth:`Scheduler.take`.

Rules (issue 5, point 5), modelled on Trio's ``CapacityLimiter`` for the slot statistics:

- one queue per host, at most ``per_host_limit`` scans running on a host, at most
  ``global_limit`` in all;
- priorities instant-on < on-demand < signature sweep < scheduled (lower runs first), FIFO by
  arrival within a priority, across hosts as well;
- a VM has at most one queued job (new work for it is merged: highest priority, ``full`` if
  either asked for it) and is never scanned twice at once: work submitted while it is being
  scanned waits in the queue until that scan ends;
- a queued job follows its VM when it migrates (:meth:`Scheduler.move_vm`);
- scheduled jobs may carry a :class:`TimeWindow`: they start only inside it, and a job that
  is cut off when the window closes is put back and continues in the next window, after the
  guest path it had finished (``Job.resume_after``, kept in the journal; dropped when more
  urgent or unlimited work for the VM is merged in, since that reads the whole guest).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from croniter import croniter

from vsphere_av.config import ScheduleSettings
from vsphere_av.errors import ConfigError
from vsphere_av.models import Job, Priority, TimeWindow

Clock = Callable[[], float]
_HHMM = re.compile(r"^\d{2}:\d{2}$")


@dataclass(frozen=True)
class SlotStats:
    """Like Trio's CapacityLimiter.statistics(): slots in use, slots in all, jobs waiting."""

    borrowed: int
    total: int
    waiting: int


class Journal(Protocol):
    """What the scheduler tells durable storage (``store.jobs.JobStore`` implements it)."""

    def next_ids(self) -> tuple[int, int]:
        """The next free (job_id, seq)."""

    def save_job(self, job: Job, *, running: bool) -> None:
        """Insert or replace one job."""

    def delete_job(self, job_id: int) -> None:
        """Forget a finished or merged job."""


class _NullJournal:
    def next_ids(self) -> tuple[int, int]:
        return 1, 1

    def save_job(self, job: Job, *, running: bool) -> None:
        return None

    def delete_job(self, job_id: int) -> None:
        return None


@dataclass
class _HostQueue:
    limit: int
    active: set[int] = field(default_factory=set)       # job ids running on this host
    queued: set[int] = field(default_factory=set)       # job ids waiting for this host


class Scheduler:
    """Thread-safe scan queue with per-host and global caps. See the module docstring."""

    def __init__(self, *, per_host_limit: int = 4, global_limit: int = 16,
                 now: Clock, journal: Journal | None = None,
                 host_limits: Mapping[str, int] | None = None) -> None:
        if per_host_limit < 1 or global_limit < 1:
            raise ConfigError("per-host and global scan limits must be at least 1")
        self.per_host_limit = per_host_limit
        self.global_limit = global_limit
        self._now = now
        self._journal: Journal = journal or _NullJournal()
        self._host_limits = dict(host_limits or {})
        self._cond = threading.Condition()
        self._hosts: dict[str, _HostQueue] = {}
        self._jobs: dict[int, Job] = {}            # every queued or running job
        self._queued_by_vm: dict[str, int] = {}    # vm -> queued job id
        self._running_by_vm: dict[str, int] = {}   # vm -> running job id
        self._running: set[int] = set()
        self._vm_hosts: dict[str, str] = {}       # vm -> host it runs on, as last reported
        self._peak: dict[str, int] = {}            # host -> most concurrent scans seen
        self._peak_global = 0
        next_id, next_seq = self._journal.next_ids()
        self._ids = itertools.count(next_id)
        self._seqs = itertools.count(next_seq)
        self._closed = False

    # -- submitting ---------------------------------------------------------------------

    def submit(self, *, vm: str, host: str, priority: Priority, full: bool = False,
               reason: str = "", delay: float = 0.0, window: TimeWindow | None = None) -> Job:
        """Queue work for a VM, merging with work already queued for it; returns the queued job."""
        with self._cond:
            not_before = self._now() + delay if delay > 0 else 0.0
            existing_id = self._queued_by_vm.get(vm)
            if existing_id is not None:
                old = self._jobs[existing_id]
                merged = replace(
                    old,
                    priority=min(old.priority, priority),
                    full=old.full or full,
                    reason=old.reason if reason in old.reason.split("; ") else
                    (f"{old.reason}; {reason}" if old.reason else reason)[:500],
                    # Urgent work never waits for jitter or a window meant for routine work.
                    not_before=min(old.not_before, not_before),
                    window=old.window if (window and old.window) else None,
                    # Continuing mid-walk is for window-limited work only: anything more
                    # urgent folded in reads the whole guest.
                    resume_after=old.resume_after if (window and old.window
                                                      and priority >= old.priority) else "",
                    host=host,
                )
                if merged != old:
                    self._remove_queued(old)
                    self._add_queued(merged)
                    self._journal.save_job(merged, running=False)
                    self._cond.notify_all()
                return merged
            job = Job(job_id=next(self._ids), vm=vm, host=host, priority=priority,
                      seq=next(self._seqs), full=full, reason=reason[:500],
                      not_before=not_before, window=window)
            self._add_queued(job)
            self._journal.save_job(job, running=False)
            self._cond.notify_all()
            return job

    def restore(self, jobs: Iterable[Job]) -> int:
        """Re-queue jobs loaded from the journal after a restart (interrupted ones included)."""
        count = 0
        with self._cond:
            for job in sorted(jobs, key=lambda j: (j.priority, j.seq)):
                if job.job_id in self._jobs:
                    continue
                if job.vm in self._queued_by_vm:
                    # Two rows for one VM (a queued follow-up plus an interrupted run): merge.
                    self.submit(vm=job.vm, host=job.host, priority=job.priority, full=job.full,
                                reason=job.reason, window=job.window)
                    self._journal.delete_job(job.job_id)
                    continue
                self._add_queued(job)
                self._journal.save_job(job, running=False)
                count += 1
            self._cond.notify_all()
        return count

    def _add_queued(self, job: Job) -> None:
        self._jobs[job.job_id] = job
        self._queued_by_vm[job.vm] = job.job_id
        self._host(job.host).queued.add(job.job_id)

    def _remove_queued(self, job: Job) -> None:
        self._jobs.pop(job.job_id, None)
        self._host(job.host).queued.discard(job.job_id)
        if self._queued_by_vm.get(job.vm) == job.job_id:
            del self._queued_by_vm[job.vm]

    def _host(self, host: str) -> _HostQueue:
        q = self._hosts.get(host)
        if q is None:
            q = _HostQueue(limit=self._host_limits.get(host, self.per_host_limit))
            self._hosts[host] = q
        return q

    # -- migrations and removal ---------------------------------------------------------

    def move_vm(self, vm: str, new_host: str) -> bool:
        """The VM migrated: its queued job moves to the new host's queue. True if one moved."""
        with self._cond:
            job_id = self._queued_by_vm.get(vm)
            if job_id is None:
                return False
            old = self._jobs[job_id]
            if old.host == new_host:
                return False
            self._remove_queued(old)
            moved = replace(old, host=new_host)
            self._add_queued(moved)
            self._journal.save_job(moved, running=False)
            self._cond.notify_all()
            return True

    def cancel_vm(self, vm: str) -> bool:
        """Drop the VM's queued job (the VM was removed). True if one was queued."""
        with self._cond:
            job_id = self._queued_by_vm.get(vm)
            if job_id is None:
                return False
            self._remove_queued(self._jobs[job_id])
            self._journal.delete_job(job_id)
            self._cond.notify_all()
            return True

    # -- taking and finishing -----------------------------------------------------------

    def try_take(self) -> Job | None:
        """Start the most urgent job that may run now, or None."""
        with self._cond:
            return self._pick()

    def take(self, *, stop: threading.Event, timeout: float = 1.0) -> Job | None:
        """Block until a job may start (returning it), ``stop`` is set or ``timeout`` passes."""
        deadline = self._now() + timeout
        with self._cond:
            while not stop.is_set() and not self._closed:
                job = self._pick()
                if job is not None:
                    return job
                remaining = deadline - self._now()
                if remaining <= 0:
                    return None
                # Wake at least every 0.2 s: not_before and windows open with the clock alone.
                self._cond.wait(min(remaining, 0.2))
            return None

    def _pick(self) -> Job | None:
        if len(self._running) >= self.global_limit:
            return None
        now = self._now()
        wall = datetime.fromtimestamp(now, UTC)
        best: Job | None = None
        for q in self._hosts.values():
            if len(q.active) >= q.limit:
                continue
            job = self._first_ready(q, now, wall)
            if job is not None and (best is None or (job.priority, job.seq) < (best.priority,
                                                                                  best.seq)):
                best = job
        if best is None:
            return None
        q = self._host(best.host)
        q.queued.discard(best.job_id)
        del self._queued_by_vm[best.vm]
        job = replace(best, attempts=best.attempts + 1)
        self._jobs[job.job_id] = job
        self._running.add(job.job_id)
        self._running_by_vm[job.vm] = job.job_id
        q.active.add(job.job_id)
        self._peak[job.host] = max(self._peak.get(job.host, 0), len(q.active))
        self._peak_global = max(self._peak_global, len(self._running))
        self._journal.save_job(job, running=True)
        return job

    def _first_ready(self, q: _HostQueue, now: float, wall: datetime) -> Job | None:
        """The most urgent job of one host that may start now (O(queued); fine for thousands)."""
        best: Job | None = None
        for job_id in q.queued:
            job = self._jobs[job_id]
            if job.vm in self._running_by_vm:       # never the same VM twice at once
                continue
            if job.not_before > now:
                continue
            if job.window is not None and not job.window.contains(wall):
                continue
            if best is None or (job.priority, job.seq) < (best.priority, best.seq):
                best = job
        return best

    def finish(self, job: Job, *, retry_after: float | None = None,
               resume_after: str = "") -> Job | None:
        """A running job ended; with ``retry_after`` (seconds) it is queued again and returned."""
        with self._cond:
            self._release(job)
            again: Job | None = None
            if retry_after is not None:
                current = self._jobs_host_of_vm(job)
                again = replace(job, host=current, not_before=self._now() + retry_after,
                                resume_after=resume_after or job.resume_after)
                existing_id = self._queued_by_vm.get(job.vm)
                if existing_id is not None:
                    # New work arrived meanwhile: fold the interrupted run into it.
                    self._journal.delete_job(job.job_id)
                    again = self.submit(vm=job.vm, host=current, priority=job.priority,
                                        full=job.full, reason=job.reason)
                else:
                    self._add_queued(again)
                    self._journal.save_job(again, running=False)
            else:
                self._journal.delete_job(job.job_id)
            self._cond.notify_all()
            return again

    def put_back(self, job: Job, *, resume_after: str = "") -> Job | None:
        """Return an interrupted job to the queue in its old place (shutdown, window closed)."""
        return self.finish(job, retry_after=0.0, resume_after=resume_after)

    def _release(self, job: Job) -> None:
        self._running.discard(job.job_id)
        self._jobs.pop(job.job_id, None)
        if self._running_by_vm.get(job.vm) == job.job_id:
            del self._running_by_vm[job.vm]
        for q in self._hosts.values():
            q.active.discard(job.job_id)

    def _jobs_host_of_vm(self, job: Job) -> str:
        queued = self._queued_by_vm.get(job.vm)
        if queued is not None:
            return self._jobs[queued].host
        return self._vm_hosts.get(job.vm, job.host)

    def note_vm_host(self, vm: str, host: str) -> None:
        """Remember where a VM runs now, so that a job that is retried goes to the right queue."""
        with self._cond:
            self._vm_hosts[vm] = host
        self.move_vm(vm, host)

    def close(self) -> None:
        """Wake every waiting worker; ``take`` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- statistics -------------------------------------------------------------------

    def host_stats(self) -> dict[str, SlotStats]:
        """Per host: scans running, slots, jobs waiting."""
        with self._cond:
            waiting: dict[str, int] = {}
            for job_id in self._queued_by_vm.values():
                host = self._jobs[job_id].host
                waiting[host] = waiting.get(host, 0) + 1
            return {host: SlotStats(len(q.active), q.limit, waiting.get(host, 0))
                    for host, q in self._hosts.items()}

    def statistics(self) -> SlotStats:
        """Global: scans running, global cap, jobs waiting."""
        with self._cond:
            return SlotStats(len(self._running), self.global_limit, len(self._queued_by_vm))

    def peak_per_host(self) -> dict[str, int]:
        """Most concurrent scans seen on each host since start."""
        with self._cond:
            return dict(self._peak)

    def peak_global(self) -> int:
        """Most concurrent scans seen in all since start."""
        with self._cond:
            return self._peak_global

    def queued(self) -> list[Job]:
        """Queued jobs in the order they would run if every slot were free."""
        with self._cond:
            jobs = [self._jobs[j] for j in self._queued_by_vm.values()]
        return sorted(jobs, key=lambda j: (j.priority, j.seq))

    def running(self) -> list[Job]:
        """Jobs being scanned now."""
        with self._cond:
            return sorted((self._jobs[j] for j in self._running), key=lambda j: j.seq)

    def is_busy(self, vm: str) -> bool:
        """True when the VM has a queued or running job."""
        with self._cond:
            return vm in self._queued_by_vm or vm in self._running_by_vm

    def idle(self) -> bool:
        """True when nothing is queued or running."""
        with self._cond:
            return not self._queued_by_vm and not self._running


# -- cron schedules ---------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A cron-driven scheduled scan: which VMs, how thorough, when, spread over ``jitter``."""

    name: str
    cron: str
    jitter: float = 0.0              # seconds; each VM starts at a stable offset in [0, jitter)
    window: TimeWindow | None = None
    full: bool = True
    vms: str = "*"                   # fnmatch pattern on the VM name

    @classmethod
    def from_settings(cls, entry: ScheduleSettings) -> Schedule:
        """One ``[[schedule]]`` table, already checked by ``config``: ``ControllerOptions``."""
        return cls(name=entry.name, cron=entry.cron, jitter=entry.jitter,
                   window=TimeWindow.parse(entry.window) if entry.window else None,
                   full=entry.full, vms=entry.vms)

    def next_fire(self, after: datetime) -> datetime:
        """The next cron time strictly after ``after`` (UTC)."""
        it = croniter(self.cron, after.astimezone(UTC))
        nxt: datetime = it.get_next(datetime)
        return nxt.astimezone(UTC)

    def offset_for(self, vm: str, fire: datetime) -> float:
        """Stable per-VM jitter in [0, jitter): the same VM gets the same delay for one firing."""
        if self.jitter <= 0:
            return 0.0
        digest = hashlib.sha256(f"{self.name}|{vm}|{fire.isoformat()}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 * self.jitter


@dataclass
class CronTicker:
    """Fires schedules: call :meth:`due` periodically; it returns schedules whose time came."""

    schedules: Sequence[Schedule]
    started: datetime
    _next: dict[str, datetime] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.schedules:
            self._next[s.name] = s.next_fire(self.started)

    def due(self, now: datetime) -> list[tuple[Schedule, datetime]]:
        """Schedules due at ``now`` with their fire time; each firing is returned once."""
        fired: list[tuple[Schedule, datetime]] = []
        for s in self.schedules:
            fire = self._next[s.name]
            if fire <= now:
                fired.append((s, fire))
                # Missed firings (the controller was down for days) collapse into one.
                self._next[s.name] = s.next_fire(max(fire, now))
        return fired

    def next_times(self) -> dict[str, datetime]:
        """Next fire time per schedule name."""
        return dict(self._next)
