"""Containment (instant-on): cut a stale VM's network at power-on, put it back after a scan.

Part of ``Controller`` (the :class:`Containing` mixin, see ``controller/__init__.py``): the
``containing`` threads that ``app.start_controller`` starts take what the watch loops
(``watching``) queued; ``workers`` calls :meth:`Containing.release` after a clean scan and
:func:`release_allowed` to decide it. :func:`cut_network` is also called by ``app.App`` (a
powered-off VM a disk scan found infected). Calls the NIC port (``vsphere.isolation``
through ``app``), the job store (exposures, isolation records), the scheduler (instant-on
jobs) and the audit log (through the journal's outbox).

An isolation is recorded before the first vNIC is touched (the exact previous state, then
the cut), and an isolation already recorded is never recorded again, so the state to
restore is never overwritten by the cut state.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from vsphere_av import errors
from vsphere_av.controller.attention import Attention, Trigger
from vsphere_av.controller.base import NicPort
from vsphere_av.controller.journal import Journaling
from vsphere_av.models import Priority
from vsphere_av.store.jobs import JobStore

log = logging.getLogger(__name__)


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


class Containing(Journaling):
    """Instant-on containment: exposures, isolation and release."""

    def resume_containments(self) -> None:
        """Contain again what a stopped controller had decided but not done (at start-up)."""
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
        # Audited before the record is cleared: a crash in between repeats the release at the
        # next start (nothing left to change, a second entry), it never loses the entry.
        self._audit("isolation.release", vm=name or rec.vm_name, moref=vm, host_moref=host,
                    reason=why, changed=changed)
        self.jobs.clear_isolation(vm)
        with self._stats_lock:
            self.stats.released += 1
        return True

