"""Housekeeping: hand-over requests, signature sweeps, schedules and the published queue.

Part of ``Controller`` (the :class:`Housekeeping` mixin, see ``controller/__init__.py``):
the ``housekeeping`` thread that ``app.start_controller`` starts runs
:meth:`Housekeeping.housekeeping`; the appliance reconcile loop calls
:meth:`Housekeeping.rescan_hosts` when a host's appliance is back. Calls the job store
(heartbeat, hand-over requests from ``vsphere-av scan`` while ``serve`` runs, meta, the
per-host counts ``status --json`` reads), the inventory, the state store (who is stale), the
scheduler (jobs at on-demand, sweep and scheduled priority) and the audit log.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from fnmatch import fnmatchcase

from vsphere_av import errors
from vsphere_av.controller.attention import Protection, staleness
from vsphere_av.controller.base import OPERATOR_SCAN, ControllerBase
from vsphere_av.models import Priority

log = logging.getLogger(__name__)


class Housekeeping(ControllerBase):
    """The housekeeping loop and the work it queues."""

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
