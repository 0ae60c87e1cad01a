"""Watch vCenter: a private PropertyCollector on a ContainerView, and a resumable event tail.

Called by ``controller`` (its watch threads, started from ``app``). Calls pyVmomi through
``Connection.call`` (re-login on session loss, faults translated into ``vsphere_av.errors``).
Returns only plain dataclasses from ``vsphere_av.controller.attention`` (:class:`ObjectChange`,
:class:`VcEvent`), never live vim objects.

Cleanup rules: :class:`InventoryWatch` creates its own PropertyCollector (one wait loop per
collector) and ContainerView; :class:`EventTail` creates one EventHistoryCollector (about 32
per session exist at most). Both destroy what they created in ``close()``, which the callers
run in ``finally`` (they are context managers). A lost session invalidates server-side
objects; callers then close and build new ones (the inventory is re-listed in full; the
event tail resumes from the last processed key and time).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.models import HOST_PROPERTIES, VM_PROPERTIES, EventCursor, ObjectChange, VcEvent
from vsphere_av.vsphere.connection import Connection

log = logging.getLogger(__name__)

MAX_OBJECTS_PER_UPDATE = 500       # WaitOptions.maxObjectUpdates: bounds one reply
EVENT_PAGE_SIZE = 1000          # the largest page vCenter allows


_MANAGED_OBJECT: Any = vim.ManagedObject  # type: ignore[attr-defined]  # pyVmomi's dynamic types


def _plain(value: Any) -> Any:
    """A property value as plain data: morefs become their id string."""
    if isinstance(value, _MANAGED_OBJECT):
        return value._moId
    if isinstance(value, str | int | float | bool) or value is None:
        return value if not isinstance(value, str) else str(value)
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    return str(value)


class InventoryWatch:
    """WaitForUpdatesEx over every VM and host; ``wait()`` returns plain changes or None."""

    def __init__(self, conn: Connection, *, vm_paths: Sequence[str] = VM_PROPERTIES,
                 host_paths: Sequence[str] = HOST_PROPERTIES) -> None:
        self._conn = conn
        self._version = ""
        self._collector: Any = None
        self._view: Any = None
        self._filter: Any = None

        def create(content: Any) -> None:
            self._view = content.viewManager.CreateContainerView(
                content.rootFolder, [vim.VirtualMachine, vim.HostSystem], True)
            self._collector = content.propertyCollector.CreatePropertyCollector()
            traverse = vmodl.query.PropertyCollector.TraversalSpec(
                name="view", type=vim.view.ContainerView, path="view", skip=False)
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                    obj=self._view, skip=True, selectSet=[traverse])],
                propSet=[
                    vmodl.query.PropertyCollector.PropertySpec(
                        type=vim.VirtualMachine, pathSet=list(vm_paths)),
                    vmodl.query.PropertyCollector.PropertySpec(
                        type=vim.HostSystem, pathSet=list(host_paths)),
                ])
            self._filter = self._collector.CreateFilter(spec, partialUpdates=False)

        try:
            conn.call("create inventory watch", create)
        except BaseException:
            self.close()
            raise

    def wait(self, max_wait: float) -> list[ObjectChange] | None:
        """Changes since the last call (the first call lists everything); None on timeout."""
        options = vmodl.query.PropertyCollector.WaitOptions(
            maxWaitSeconds=max(0, int(max_wait)), maxObjectUpdates=MAX_OBJECTS_PER_UPDATE)
        out: list[ObjectChange] = []
        while True:
            try:
                result = self._conn.call("wait for inventory updates",
                                         functools.partial(self._wait_once, options))
            except errors.VsphereError as exc:
                if type(exc.__cause__).__name__.endswith("InvalidCollectorVersion"):
                    raise errors.TransientError("property collector version is stale") from exc
                raise
            if result is None:
                return out or None
            self._version = result.version
            for fs in result.filterSet or []:
                for upd in fs.objectSet or []:
                    obj = upd.obj
                    kind = ("VirtualMachine" if isinstance(obj, vim.VirtualMachine)
                            else "HostSystem" if isinstance(obj, vim.HostSystem)
                            else type(obj).__name__)
                    changes = tuple((c.name, None if c.op == "remove" else _plain(c.val))
                                    for c in (upd.changeSet or []))
                    # A property that cannot be read (a VM without snapshots has none)
                    # comes back in missingSet: treat it as empty.
                    missing = tuple((m.path, None) for m in (upd.missingSet or []))
                    out.append(ObjectChange(kind=kind, moref=obj._moId, op=str(upd.kind),
                                            changes=changes + missing))
            if not result.truncated:
                return out
            # Truncated: the next version is single use; fetch the rest at once.
            options = vmodl.query.PropertyCollector.WaitOptions(
                maxWaitSeconds=0, maxObjectUpdates=MAX_OBJECTS_PER_UPDATE)

    def _wait_once(self, options: Any, _content: Any) -> Any:
        return self._collector.WaitForUpdatesEx(self._version, options)

    def close(self) -> None:
        """Destroy the filter, collector and view; never raises."""
        for what, obj, method in (("filter", self._filter, "Destroy"),
                                  ("collector", self._collector, "Destroy"),
                                  ("view", self._view, "Destroy")):
            if obj is None:
                continue
            try:
                getattr(obj, method)()
            except Exception as exc:  # the session may be gone already: nothing to free
                log.debug("destroying %s failed: %s", what, exc)
        self._filter = self._collector = self._view = None

    def __enter__(self) -> InventoryWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _event_type(ev: Any) -> str:
    if isinstance(ev, vim.event.EventEx | vim.event.ExtendedEvent):
        return str(getattr(ev, "eventTypeId", "") or type(ev).__name__)
    return type(ev).__name__.rsplit(".", 1)[-1]


def to_event(ev: Any) -> VcEvent:
    """A vim event as a plain :class:`VcEvent`."""
    vm_arg = getattr(ev, "vm", None)
    host_arg = getattr(ev, "host", None)
    vm = getattr(vm_arg, "vm", None) if vm_arg is not None else None
    host = getattr(host_arg, "host", None) if host_arg is not None else None
    vm_name = getattr(vm_arg, "name", "") if vm_arg is not None else ""
    entity = getattr(ev, "objectId", "") if isinstance(ev, vim.event.EventEx) else ""
    if vm is None and entity and getattr(ev, "objectType", "") == "VirtualMachine":
        vm_id = str(entity)
    else:
        vm_id = vm._moId if vm is not None else ""
    if not vm_id and isinstance(ev, vim.event.EventEx):
        # Some EventEx carry the VM only in the generic entity argument.
        ent = getattr(ev, "vm", None)
        vm_id = ent.vm._moId if ent is not None and getattr(ent, "vm", None) is not None else ""
    source = getattr(ev, "sourceHost", None)
    source_host = source.host._moId if source is not None and source.host is not None else ""
    description_id = ""
    info = getattr(ev, "info", None)
    if info is not None:
        description_id = str(getattr(info, "descriptionId", "") or "")
    created = ev.createdTime
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return VcEvent(key=int(ev.key), created=created, type_id=_event_type(ev), vm=vm_id,
                   vm_name=str(vm_name or ""), host=host._moId if host is not None else "",
                   source_host=source_host, description_id=description_id,
                   message=str(getattr(ev, "fullFormattedMessage", "") or "")[:300])


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class EventTail:
    """Reads new vCenter events in key order, resuming after ``since`` (key and time).

    With a cursor, a one-shot catch-up collector filtered from the cursor's time is drained
    first (events that happened while the controller was down), then destroyed. Without one
    (a fresh state directory) the tail starts at vCenter's current time and offers that as
    ``start_cursor`` for the caller to save before it reads anything. The live
    collector has no time filter (a filter on time would also be applied to events as they
    are posted); its new events are read from the latest page and the scrollable view.
    """

    def __init__(self, conn: Connection, *, since: EventCursor | None,
                 type_ids: Sequence[str] = (), start: datetime | None = None) -> None:
        self._conn = conn
        self._collector: Any = None
        self._type_ids = list(type_ids)
        self._last_key = since.key if since else 0
        self._backlog: dict[int, Any] = {}
        # Without a cursor (first start) history is not ours to replay: events from vCenter's
        # current time on are. That point is the cursor to keep until an event is processed
        # (``start_cursor``), so a crash before the first event still resumes from it.
        self._not_before = None if since else _aware(start or conn.current_time())
        self.start_cursor: EventCursor | None = (
            None if self._not_before is None else EventCursor(0, self._not_before.isoformat()))
        try:
            if since is not None:
                self._catch_up(datetime.fromisoformat(since.time))
            self._collector = conn.call("create event collector", self._create_live)
        except BaseException:
            self.close()
            raise

    def _spec(self, begin: datetime | None) -> Any:
        spec = vim.event.EventFilterSpec()
        if begin is not None:
            spec.time = vim.event.EventFilterSpec.ByTime(beginTime=begin)
        if self._type_ids:
            spec.eventTypeId = self._type_ids
        return spec

    def _create_live(self, content: Any) -> Any:
        collector = content.eventManager.CreateCollectorForEvents(self._spec(None))
        try:
            collector.SetCollectorPageSize(EVENT_PAGE_SIZE)
            # Everything now in the view is history (or backlog): new events come after it.
            # (ResetCollector puts the view just before the latest page, so on a first start
            # its events after the start time are read again by read(), through _add.)
            for ev in collector.latestPage or []:
                if ev.key > self._last_key and self._not_before is None:
                    self._backlog[ev.key] = ev
            collector.ResetCollector()
        except BaseException:
            collector.DestroyCollector()
            raise
        return collector

    def _catch_up(self, begin: datetime, *, limit: int = 100_000) -> None:
        def drain(content: Any) -> None:
            collector = content.eventManager.CreateCollectorForEvents(self._spec(begin))
            try:
                collector.SetCollectorPageSize(EVENT_PAGE_SIZE)
                collector.RewindCollector()
                while len(self._backlog) < limit:
                    page = collector.ReadNextEvents(EVENT_PAGE_SIZE)
                    if not page:
                        break
                    self._add(page, self._backlog)
                self._add(collector.latestPage or [], self._backlog)
            finally:
                collector.DestroyCollector()

        self._conn.call("read missed events", drain)

    def _add(self, events: Sequence[Any], into: dict[int, Any]) -> None:
        for ev in events:
            if ev.key <= self._last_key:
                continue
            if self._not_before is not None and _aware(ev.createdTime) < self._not_before:
                continue
            into[ev.key] = ev

    @property
    def last_key(self) -> int:
        """Key of the last event returned."""
        return self._last_key

    def read(self, *, limit: int = 2000) -> list[VcEvent]:
        """New events since the last call, oldest first, never one seen before."""
        raw: dict[int, Any] = dict(self._backlog)
        self._backlog.clear()
        for _ in range(max(1, limit // EVENT_PAGE_SIZE)):
            page = self._conn.call("read events",
                                   lambda _c: self._collector.ReadNextEvents(EVENT_PAGE_SIZE))
            if not page:
                break
            self._add(page, raw)
        # New events also land on the latest page at once (some simulators do not move the
        # scrollable view forward); keys de-duplicate the two sources.
        self._add(self._conn.call("read latest events",
                                  lambda _c: self._collector.latestPage) or [], raw)
        out: list[VcEvent] = []
        keys = sorted(raw)
        for key in keys[:limit]:
            try:
                out.append(to_event(raw[key]))
            except (AttributeError, TypeError, ValueError) as exc:
                log.debug("skipping unreadable event %s: %s", key, exc)
        for key in keys[limit:]:
            self._backlog[key] = raw[key]        # beyond the limit: next read
        if keys[:limit]:
            self._last_key = max(self._last_key, keys[:limit][-1])
        return out

    def close(self) -> None:
        """Destroy the collector; never raises."""
        if self._collector is not None:
            try:
                self._collector.DestroyCollector()
            except Exception as exc:  # the session may be gone already
                log.debug("destroying event collector failed: %s", exc)
        self._collector = None

    def __enter__(self) -> EventTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
