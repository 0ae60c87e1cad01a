"""The durable job queue, event cursor, exposures and isolation records (real SQLite file)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from vsphere_av.controller.scheduling import Scheduler
from vsphere_av.models import EventCursor, Priority, TimeWindow
from vsphere_av.store.jobs import JobStore


def test_queue_survives_reopen_and_interrupted_jobs_requeue(tmp_path: Path) -> None:
    store = JobStore.open(tmp_path)
    s = Scheduler(per_host_limit=1, global_limit=1, now=time.time, journal=store)
    s.submit(vm="vm-a", host="h", priority=Priority.SCHEDULED,
             window=TimeWindow.parse("22:00-06:00"))
    s.submit(vm="vm-b", host="h", priority=Priority.INSTANT_ON, full=True, reason="powered on")
    running = s.try_take()
    assert running is not None
    assert running.vm == "vm-b"
    store.close()                     # the process dies here: no finish() was recorded

    store = JobStore.open(tmp_path)
    pending = store.pending_jobs()
    assert [(j.vm, was_running) for j, was_running in pending] == [("vm-b", True),
                                                                   ("vm-a", False)]
    assert pending[1][0].window == TimeWindow.parse("22:00-06:00")
    s2 = Scheduler(per_host_limit=1, global_limit=1, now=time.time, journal=store)
    assert s2.restore(j for j, _ in pending) == 2
    job = s2.try_take()
    assert job is not None
    assert (job.vm, job.full, job.reason) == ("vm-b", True, "powered on")
    s2.finish(job)
    assert [j.vm for j, _ in store.pending_jobs()] == ["vm-a"]
    # Ids are never reused, even after rows are deleted.
    new = s2.submit(vm="vm-c", host="h", priority=Priority.ON_DEMAND)
    assert new.job_id > job.job_id
    assert new.seq > job.seq
    store.close()


def test_cursor_only_moves_forward(tmp_path: Path) -> None:
    with JobStore.open(tmp_path) as store:
        assert store.cursor() is None
        store.save_cursor(EventCursor(10, "2026-01-01T00:00:00+00:00"))
        store.save_cursor(EventCursor(7, "2025-01-01T00:00:00+00:00"))
        assert store.cursor() == EventCursor(10, "2026-01-01T00:00:00+00:00")
        store.mark_events([10, 11])
        assert store.seen_event(11)
        assert not store.seen_event(12)


def test_exposure_window_is_first_of_isolation_or_clean(tmp_path: Path) -> None:
    with JobStore.open(tmp_path) as store:
        eid = store.open_exposure(vm="vm-1", vm_name="one", trigger="powered on",
                                  started=100.0, seen=100.2)
        assert store.open_exposure(vm="vm-1", vm_name="one", trigger="again", started=101,
                                   seen=101) == eid
        store.mark_exposure("vm-1", isolated=100.9)
        store.mark_exposure("vm-1", isolated=200.0)          # first stamp wins
        store.mark_exposure("vm-1", clean=105.0, outcome="clean", close=True)
        (exp,) = store.exposures("vm-1")
        assert exp.window is not None
        assert abs(exp.window - 0.9) < 1e-9
        assert exp.outcome == "clean"
        assert exp.closed is not None
        assert store.open_exposure_for("vm-1") is None
        store.open_exposure(vm="vm-2", vm_name="two", trigger="t", started=10.0, seen=10.0)
        assert store.open_exposure_for("vm-2") is not None
        assert store.exposures("vm-2")[0].window is None


def test_isolation_record_is_kept_once(tmp_path: Path) -> None:
    nics = [{"key": 4000, "connected": True, "start_connected": True}]
    with JobStore.open(tmp_path) as store:
        assert store.record_isolation(vm="vm-1", vm_name="one", nics=nics, reason="stale",
                                      state="pending")
        # A second isolation must not overwrite the state to restore with the cut one.
        assert not store.record_isolation(vm="vm-1", vm_name="one",
                                          nics=[{"key": 4000, "connected": False}],
                                          reason="again", state="isolated")
        rec = store.isolation("vm-1")
        assert rec is not None
        assert rec.nics == tuple(nics)
        assert rec.state == "isolated"
    with JobStore.open(tmp_path) as store:
        assert [r.vm for r in store.isolations()] == ["vm-1"]
        store.clear_isolation("vm-1")
        assert store.isolation("vm-1") is None


def test_hosts_heartbeat_and_requests(tmp_path: Path) -> None:
    with JobStore.open(tmp_path) as store:
        assert not store.controller_alive()
        store.beat(os.getpid())
        assert store.controller_alive()
        store.publish_hosts({"host-1": ("esx-1", 3, 4)})
        assert [(h.moref, h.name, h.queued, h.active_scans) for h in store.hosts()] == [
            ("host-1", "esx-1", 3, 4)]
        rid = store.add_request(vm="vm-9", full=True)
        assert not store.request_taken(rid)
        assert store.take_requests() == [(rid, "vm-9", True)]
        assert store.take_requests() == []
        assert store.request_taken(rid)
        store.stop_beating(os.getpid())
        assert not store.controller_alive()
