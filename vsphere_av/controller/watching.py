"""Watching: the inventory watch and event tail loops, and the level-based decision.

Part of ``Controller`` (the :class:`Watching` mixin, see ``controller/__init__.py``): the
``watch-inventory`` and ``tail-events`` threads that ``app.start_controller`` starts run
:meth:`Watching.watch_inventory` and :meth:`Watching.tail_events`. Calls the vCenter ports
it was given (``vsphere.watching`` through ``app``), ``attention.Watcher`` (changes and
events -> :class:`attention.Attention` keys), the state store, the job store (event cursor,
exposures) and ``containment`` (a stale VM that starts running is contained).

Flow (level-based, as controller-runtime): :meth:`Watching.attend` re-reads what it knows
and decides. The triggers of one power-on (property change, ``VmStartingEvent``,
``VmPoweredOnEvent``) are one exposure (:meth:`Watching._same_power_on`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence

from vsphere_av import errors
from vsphere_av.controller.attention import (
    Attention,
    Protection,
    Trigger,
    marks_stale,
    needs_instant_on,
    staleness,
)
from vsphere_av.controller.containment import Containing
from vsphere_av.models import INFECTED, STALE, EventCursor, Priority, VcEvent

log = logging.getLogger(__name__)

# Triggers that belong to a power-on: one power-on is one exposure, however many arrive.
POWER_ON_TRIGGERS = (Trigger.POWERED_ON, Trigger.TOOLS_READY)
# A reset or guest reboot boots again without the power state changing: a new exposure.
REBOOT_CAUSES = frozenset({"VmResettingEvent", "VmGuestRebootEvent"})

class Watching(Containing):
    """The watch loops and what they decide."""

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
