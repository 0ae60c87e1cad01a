"""Scheduler rules of issue 5 point 5: caps, priorities, FIFO, one scan per VM, migration."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from vsphere_av.controller.scheduling import Scheduler, SlotStats
from vsphere_av.errors import ConfigError
from vsphere_av.models import Job, Priority, TimeWindow


class FakeClock:
    """A settable clock (a collaborator, not a mock of vSphere)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


def drain(s: Scheduler) -> list[Job]:
    """Take every job that may start now."""
    out = []
    while (job := s.try_take()) is not None:
        out.append(job)
    return out


def test_per_host_cap_and_stats() -> None:
    s = Scheduler(per_host_limit=4, global_limit=100, now=FakeClock())
    for i in range(10):
        s.submit(vm=f"vm-{i}", host="host-1", priority=Priority.SCHEDULED)
    started = drain(s)
    assert [j.vm for j in started] == ["vm-0", "vm-1", "vm-2", "vm-3"]
    assert s.host_stats() == {"host-1": SlotStats(borrowed=4, total=4, waiting=6)}
    s.finish(started[0])
    assert [j.vm for j in drain(s)] == ["vm-4"]
    assert s.peak_per_host() == {"host-1": 4}


def test_global_cap_spans_hosts() -> None:
    s = Scheduler(per_host_limit=4, global_limit=5, now=FakeClock())
    for h in range(3):
        for i in range(4):
            s.submit(vm=f"vm-{h}-{i}", host=f"host-{h}", priority=Priority.SCHEDULED)
    started = drain(s)
    assert len(started) == 5
    assert s.statistics() == SlotStats(borrowed=5, total=5, waiting=7)
    assert max(st.borrowed for st in s.host_stats().values()) <= 4


@pytest.mark.parametrize(("order", "expected"), [
    ([Priority.SCHEDULED, Priority.SWEEP, Priority.ON_DEMAND, Priority.INSTANT_ON],
     ["vm-3", "vm-2", "vm-1", "vm-0"]),
    ([Priority.INSTANT_ON, Priority.SCHEDULED, Priority.INSTANT_ON, Priority.SWEEP],
     ["vm-0", "vm-2", "vm-3", "vm-1"]),
    ([Priority.ON_DEMAND] * 4, ["vm-0", "vm-1", "vm-2", "vm-3"]),
])
def test_priority_then_fifo(order: list[Priority], expected: list[str]) -> None:
    s = Scheduler(per_host_limit=1, global_limit=1, now=FakeClock())
    for i, prio in enumerate(order):
        s.submit(vm=f"vm-{i}", host="host-1", priority=prio)
    got = []
    while (job := s.try_take()) is not None:
        got.append(job.vm)
        s.finish(job)
    assert got == expected


def test_priority_across_hosts_respects_free_slots() -> None:
    s = Scheduler(per_host_limit=1, global_limit=10, now=FakeClock())
    s.submit(vm="busy", host="host-a", priority=Priority.SCHEDULED)
    first = s.try_take()
    assert first is not None
    s.submit(vm="urgent", host="host-a", priority=Priority.INSTANT_ON)
    s.submit(vm="routine", host="host-b", priority=Priority.SCHEDULED)
    # host-a is full, so host-b's routine job may start; the urgent one waits for its host.
    nxt = s.try_take()
    assert nxt is not None
    assert nxt.vm == "routine"
    assert s.try_take() is None
    s.finish(first)
    nxt = s.try_take()
    assert nxt is not None
    assert nxt.vm == "urgent"


def test_vm_never_scanned_twice_at_once_and_merge() -> None:
    s = Scheduler(per_host_limit=4, global_limit=4, now=FakeClock())
    s.submit(vm="vm-1", host="h", priority=Priority.SCHEDULED, reason="nightly")
    merged = s.submit(vm="vm-1", host="h", priority=Priority.INSTANT_ON, full=True,
                      reason="powered on")
    assert merged.priority is Priority.INSTANT_ON
    assert merged.full
    assert merged.reason == "nightly; powered on"
    assert len(s.queued()) == 1
    running = s.try_take()
    assert running is not None
    follow = s.submit(vm="vm-1", host="h", priority=Priority.ON_DEMAND)
    assert follow.job_id != running.job_id
    assert s.try_take() is None, "second scan of a VM being scanned must wait"
    s.finish(running)
    again = s.try_take()
    assert again is not None
    assert again.job_id == follow.job_id


def test_queued_job_follows_migration() -> None:
    s = Scheduler(per_host_limit=1, global_limit=10, now=FakeClock())
    s.submit(vm="blocker", host="h1", priority=Priority.SCHEDULED)
    assert s.try_take() is not None
    s.submit(vm="mover", host="h1", priority=Priority.ON_DEMAND)
    assert s.try_take() is None
    assert s.move_vm("mover", "h2")
    job = s.try_take()
    assert job is not None
    assert (job.vm, job.host) == ("mover", "h2")
    assert not s.move_vm("ghost", "h2")


def test_retry_backoff_and_put_back() -> None:
    clock = FakeClock()
    s = Scheduler(per_host_limit=1, global_limit=1, now=clock)
    s.submit(vm="vm-1", host="h", priority=Priority.ON_DEMAND)
    job = s.try_take()
    assert job is not None
    assert job.attempts == 1
    s.finish(job, retry_after=30)
    assert s.try_take() is None
    clock.t += 31
    retried = s.try_take()
    assert retried is not None
    assert retried.attempts == 2
    assert retried.job_id == job.job_id
    back = s.put_back(retried, resume_after="/etc/passwd")
    assert back is not None
    assert back.resume_after == "/etc/passwd"
    assert s.try_take() is not None


def test_retry_goes_to_host_vm_moved_to() -> None:
    s = Scheduler(per_host_limit=1, global_limit=4, now=FakeClock())
    s.submit(vm="vm-1", host="h1", priority=Priority.ON_DEMAND)
    job = s.try_take()
    assert job is not None
    s.note_vm_host("vm-1", "h2")
    again = s.put_back(job)
    assert again is not None
    assert again.host == "h2"


def test_delay_and_window() -> None:
    clock = FakeClock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC).timestamp())
    s = Scheduler(per_host_limit=4, global_limit=4, now=clock)
    s.submit(vm="jittered", host="h", priority=Priority.SCHEDULED, delay=60)
    s.submit(vm="night", host="h", priority=Priority.SCHEDULED,
             window=TimeWindow.parse("22:00-06:00"))
    assert s.try_take() is None
    clock.t += 61
    job = s.try_take()
    assert job is not None
    assert job.vm == "jittered"
    assert s.try_take() is None
    clock.t = datetime(2026, 1, 1, 23, 0, tzinfo=UTC).timestamp()
    job = s.try_take()
    assert job is not None
    assert job.vm == "night"


def test_urgent_work_drops_window_and_jitter() -> None:
    clock = FakeClock(datetime(2026, 1, 1, 12, 0, tzinfo=UTC).timestamp())
    s = Scheduler(per_host_limit=4, global_limit=4, now=clock)
    s.submit(vm="vm", host="h", priority=Priority.SCHEDULED, delay=3600,
             window=TimeWindow.parse("22:00-06:00"))
    s.submit(vm="vm", host="h", priority=Priority.INSTANT_ON)
    job = s.try_take()
    assert job is not None
    assert job.priority is Priority.INSTANT_ON
    assert job.window is None


def test_take_blocks_until_work_and_stops() -> None:
    s = Scheduler(per_host_limit=1, global_limit=1, now=__import__("time").monotonic)
    stop = threading.Event()
    got: list[Job | None] = []
    t = threading.Thread(target=lambda: got.append(s.take(stop=stop, timeout=5)))
    t.start()
    s.submit(vm="vm", host="h", priority=Priority.ON_DEMAND)
    t.join(5)
    assert got
    assert got[0] is not None
    assert got[0].vm == "vm"
    t2 = threading.Thread(target=lambda: got.append(s.take(stop=stop, timeout=30)))
    t2.start()
    stop.set()
    s.close()
    t2.join(5)
    assert not t2.is_alive()
    assert got[1] is None


def test_cancel_and_limits_validated() -> None:
    s = Scheduler(now=FakeClock())
    s.submit(vm="vm", host="h", priority=Priority.SWEEP)
    assert s.cancel_vm("vm")
    assert s.idle()
    with pytest.raises(ConfigError):
        Scheduler(per_host_limit=0, now=FakeClock())


def test_concurrent_workers_never_exceed_caps() -> None:
    """Real threads: many workers racing for 40 jobs on one host never exceed the cap."""
    import time

    s = Scheduler(per_host_limit=4, global_limit=8, now=time.monotonic)
    for i in range(40):
        s.submit(vm=f"vm-{i}", host="h", priority=Priority.INSTANT_ON)
    stop = threading.Event()
    lock = threading.Lock()
    active = 0
    peak = 0
    done: list[str] = []

    def worker() -> None:
        nonlocal active, peak
        while len(done) < 40:
            job = s.take(stop=stop, timeout=0.5)
            if job is None:
                continue
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.005)
            with lock:
                active -= 1
                done.append(job.vm)
            s.finish(job)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(done) == sorted(f"vm-{i}" for i in range(40))
    assert peak == 4
    assert s.peak_per_host() == {"h": 4}
