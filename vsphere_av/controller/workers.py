"""Workers: the one loop that takes jobs from a scheduler and runs them, and the controller's job.

:func:`working` is the body of every scan thread: ``app.start_controller`` starts
``global_limit`` of them for ``vsphere-av serve`` (through :meth:`Working.work`), and
``App.scan`` starts its own for ``vsphere-av scan`` (one batch, then they end). Threads
start only in ``app``. Part of ``Controller`` too (the :class:`Working` mixin, see
``controller/__init__.py``): :meth:`Working.run_job` re-reads the VM, calls the scan
function it was given (``App.scan_one``), and acts on the verdict: release the VM's network
(``containment``), keep it cut, retry with backoff or give up; and closes its exposure in
the job store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from vsphere_av import errors
from vsphere_av.controller.base import OPERATOR_SCAN
from vsphere_av.controller.containment import Containing, release_allowed
from vsphere_av.controller.scheduling import Scheduler
from vsphere_av.models import Job, Priority

log = logging.getLogger(__name__)


def working(*, scheduler: Scheduler, run: Callable[[Job], None], stop: threading.Event,
            until_idle: bool = False, hold: Callable[[], bool] | None = None) -> None:
    """Worker thread body: take the most urgent job that may start and ``run`` it, until
    ``stop`` is set (or, with ``until_idle``, nothing is queued or running any more).

    ``run`` finishes the job with the scheduler (the verdict decides a retry) and must not
    raise. While ``hold()`` is true no job is taken (the controller's containments first).
    """
    while not stop.is_set() and not (until_idle and scheduler.idle()):
        if hold is not None and hold():
            stop.wait(0.02)
            continue
        job = scheduler.take(stop=stop, timeout=0.5)
        if job is None:
            continue
        run(job)


class ScanInterrupted(errors.VsphereAvError):
    """Raised from the progress callback to stop a scan (shutdown, time window closed)."""


class Working(Containing):
    """The controller's scan workers: run a job, act on the verdict."""

    def work(self, stop: threading.Event) -> None:
        """Worker thread: take the most urgent job that may start, run it, report back."""

        def run(job: Job) -> None:
            try:
                self.run_job(job, stop=stop)
            except Exception:
                # A bug must not kill the worker or lose the job: retry later.
                log.exception("job %s for %s failed", job.job_id, job.vm)
                self.scheduler.finish(job, retry_after=self.options.retry_max)

        # Containment first: cutting the network of every stale VM that just started closes
        # exposure windows; scans can wait the few milliseconds that takes.
        working(scheduler=self.scheduler, run=run, stop=stop,
                hold=lambda: not self._containing.empty())

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
