"""The controller behind ``vsphere-av serve``: instant-on containment, storm-safe scans, restarts.

The face of the package: :class:`Controller`, :class:`ControllerOptions` and what ``app``
and the tests use. Called by ``app.start_controller`` (which builds the real collaborators
and starts one thread per loop: :meth:`Controller.watch_inventory`,
:meth:`Controller.tail_events`, :meth:`Controller.housekeeping`, :meth:`Controller.auditing`,
``containment_threads`` x :meth:`Controller.containing` and ``global_limit`` x
:meth:`Controller.work`) and by ``app.App`` (``cut_network``, ``workers.working``).
Calls only its collaborators, all passed as keyword arguments:
vCenter ports (inventory watch and event tail factories, an inventory reader, NIC
isolation), a scan function, the state store, the job store, the audit log, the engine's
active signature version and the clock. No pyVmomi here; no thread starts here.

Rooms: ``base`` (ports, options, shared state), ``journal`` (queue restored at start, audit
outbox), ``containment`` (isolation, release), ``watching`` (watch loops and the decision,
over ``attention``), ``workers`` (the worker loop, one job's verdict), ``housekeeping``
(requests, sweeps, schedules) and ``scheduling`` (the queue); :class:`Controller` joins the
rooms' mixins.

Flow (level-based, as controller-runtime): watch loops turn changes into
``attention.Attention`` keys; :meth:`Controller.attend` re-reads what it knows and decides.
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

from vsphere_av.controller.base import (
    OPERATOR_SCAN,
    ControllerOptions,
    EventTailLike,
    InventoryWatchLike,
    NicPort,
    ScanFn,
    ScanOutcome,
    StateLike,
    Stats,
)
from vsphere_av.controller.containment import cut_network, nics_to_restore, release_allowed
from vsphere_av.controller.housekeeping import Housekeeping
from vsphere_av.controller.watching import POWER_ON_TRIGGERS, REBOOT_CAUSES, Watching
from vsphere_av.controller.workers import ScanInterrupted, Working, working

__all__ = [
    "OPERATOR_SCAN",
    "POWER_ON_TRIGGERS",
    "REBOOT_CAUSES",
    "Controller",
    "ControllerOptions",
    "EventTailLike",
    "InventoryWatchLike",
    "NicPort",
    "ScanFn",
    "ScanInterrupted",
    "ScanOutcome",
    "StateLike",
    "Stats",
    "cut_network",
    "nics_to_restore",
    "release_allowed",
    "working",
]


class Controller(Watching, Working, Housekeeping):
    """See the module docstring. One instance per ``vsphere-av serve`` process."""

    def restore_queue(self) -> int:
        """Queue again what the store holds (queued and interrupted jobs, then containments
        decided before a stop); returns how many jobs."""
        count = self.restore_jobs()
        self.resume_containments()
        return count
