"""The controller's journal: the queue read back at start and the audit outbox.

Part of ``Controller`` (the :class:`Journaling` mixin, see ``controller/__init__.py``): called
by ``Controller.restore_queue`` at start-up (``app.start_controller``), by the ``auditing``
thread that ``app.start_controller`` starts, and by the other rooms (``containment`` queues
audit entries through the outbox, ``workers`` flushes it before a scan starts). Calls the job
store (``store.jobs.JobStore``: jobs, outbox), the scheduler and the audit log.

The scheduler writes each job through to the job store itself (as its journal); what is left
here is reading them back after a stop, and the outbox: audit entries written to SQLite first
(cheap during a power-on storm) and moved into the fsynced audit log in order by one thread.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from vsphere_av import errors
from vsphere_av.controller.base import ControllerBase

log = logging.getLogger(__name__)


class Journaling(ControllerBase):
    """Restoring the queue and the audit outbox."""

    def restore_jobs(self) -> int:
        """Queue again the jobs the store holds (queued and interrupted); returns how many."""
        self.flush_audit()        # entries queued by a controller that died
        pending = self.jobs.pending_jobs()
        interrupted = [j for j, running in pending if running]
        for job in interrupted:
            self._audit("job.resumed", moref=job.vm, host_moref=job.host, job_id=job.job_id,
                        priority=job.priority.label, reason="interrupted by a controller stop")
        return self.scheduler.restore(j for j, _ in pending)

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
