"""The one worker loop (``controller.workers.working``) that ``serve`` and ``scan`` share.

A real ``Scheduler`` and real threads; ``run`` is the caller's own job body, as in
``App.scan`` (scan, then finish) and ``Controller.work`` (run_job finishes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from vsphere_av.controller.scheduling import Scheduler
from vsphere_av.controller.workers import working
from vsphere_av.models import Job, Priority


def start(fn: Callable[..., None], count: int, **kwargs: Any) -> list[threading.Thread]:
    threads = [threading.Thread(target=fn, kwargs=kwargs, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def test_until_idle_runs_each_job_once_under_the_caps_then_ends() -> None:
    queue = Scheduler(per_host_limit=2, global_limit=3, now=time.time)
    for i in range(12):
        queue.submit(vm=f"vm-{i}", host=f"host-{i % 2}", priority=Priority.ON_DEMAND)
    ran: list[str] = []
    lock = threading.Lock()

    def run(job: Job) -> None:
        time.sleep(0.02)
        with lock:
            ran.append(job.vm)
        queue.finish(job)

    stop = threading.Event()
    threads = start(working, 5, scheduler=queue, run=run, stop=stop, until_idle=True)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)       # ended by themselves: queue empty
    assert sorted(ran) == sorted(f"vm-{i}" for i in range(12))
    assert queue.peak_global() == 3
    assert queue.peak_per_host() == {"host-0": 2, "host-1": 2}


def test_stop_takes_no_new_job_and_lets_the_running_one_finish() -> None:
    queue = Scheduler(per_host_limit=1, global_limit=1, now=time.time)
    for i in range(3):
        queue.submit(vm=f"vm-{i}", host="host-1", priority=Priority.ON_DEMAND)
    stop = threading.Event()
    started = threading.Event()
    finished: list[str] = []

    def run(job: Job) -> None:
        started.set()
        stop.wait(5)                 # Ctrl-C arrives while this job runs
        finished.append(job.vm)
        queue.finish(job)

    threads = start(working, 1, scheduler=queue, run=run, stop=stop, until_idle=True)
    assert started.wait(5)
    stop.set()
    queue.close()
    threads[0].join(5)
    assert not threads[0].is_alive()
    assert finished == ["vm-0"]
    assert [j.vm for j in queue.queued()] == ["vm-1", "vm-2"]


def test_hold_keeps_jobs_waiting_until_it_lifts() -> None:
    queue = Scheduler(per_host_limit=4, global_limit=4, now=time.time)
    queue.submit(vm="vm-1", host="host-1", priority=Priority.ON_DEMAND)
    held = threading.Event()
    held.set()
    done = threading.Event()

    def run(job: Job) -> None:
        queue.finish(job)
        done.set()

    stop = threading.Event()
    threads = start(working, 1, scheduler=queue, run=run, stop=stop, hold=held.is_set)
    try:
        assert not done.wait(0.3)
        assert [j.vm for j in queue.queued()] == ["vm-1"]
        held.clear()
        assert done.wait(5)
    finally:
        stop.set()
        threads[0].join(5)
    assert not threads[0].is_alive()
