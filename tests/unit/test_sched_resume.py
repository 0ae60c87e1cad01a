"""A window-limited job's resume point (issue 5, point 5): kept, persisted, and dropped when
more urgent work for the same VM is folded into it (that work reads the whole guest)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vsphere_av.controller.scheduling import Scheduler
from vsphere_av.models import Priority, TimeWindow
from vsphere_av.store.jobs import JobStore

WINDOW = TimeWindow.parse("02:00-04:00")
INSIDE = datetime(2026, 3, 2, 2, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("priority", "window", "kept"), [
    (Priority.SCHEDULED, WINDOW, True),        # the next night's run of the same schedule
    (Priority.SCHEDULED, None, False),         # unlimited work: reads everything
    (Priority.INSTANT_ON, None, False),        # a stale VM powered on: reads everything
    (Priority.ON_DEMAND, WINDOW, False),       # more urgent: reads everything
])
def test_resume_point_survives_only_window_limited_merges(
        tmp_path: Path, priority: Priority, window: TimeWindow | None, kept: bool) -> None:
    with JobStore.open(tmp_path) as journal:
        sched = Scheduler(now=lambda: INSIDE, journal=journal)
        sched.submit(vm="vm-1", host="host-1", priority=Priority.SCHEDULED, full=True,
                     window=WINDOW)
        job = sched.take(stop=threading.Event(), timeout=0.1)
        assert job is not None
        again = sched.put_back(job, resume_after="/data/b/file03.txt")
        assert again is not None
        assert again.resume_after == "/data/b/file03.txt"
        ((stored, _),) = journal.pending_jobs()
        assert stored.resume_after == "/data/b/file03.txt"
        merged = sched.submit(vm="vm-1", host="host-1", priority=priority, window=window)
        assert merged.resume_after == ("/data/b/file03.txt" if kept else "")
        ((stored, _),) = journal.pending_jobs()
        assert stored.resume_after == merged.resume_after
