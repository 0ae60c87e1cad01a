"""Time windows (issue 5, point 5): a scan that does not finish in its window continues in the next.

The controller is built in-process on the real collaborators (simulator guest, real engine,
real SQLite state, job store and audit log) with a test clock, so the window can close in the
middle of a walk at a chosen file. The job is then taken up again from a fresh job store (as
after a restart) in the next day's window: the second run reads only what the first did not.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import plant, settings_for
from controller_support import audit_entries

from vsphere_av.app import App, _Nics
from vsphere_av.controller import Controller, ControllerOptions
from vsphere_av.lab import simulator
from vsphere_av.models import Priority, TimeWindow
from vsphere_av.store.jobs import JobStore
from vsphere_av.vsphere import inventory

VM = "DC0_C0_RP0_VM0"
WINDOW = TimeWindow.parse("02:00-04:00")
OPEN_DAY1 = datetime(2026, 3, 2, 2, 30, tzinfo=UTC)
STOP_AFTER = 13          # the window closes right after this many files were read
pytestmark = pytest.mark.vcsim(hosts=1, vms=1)


class Clock:
    """Wall clock for the controller; creeps forward on every read so waits still end."""

    def __init__(self, at: datetime) -> None:
        self.t = at.timestamp()
        self.step = 0.001
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.t += self.step
            return self.t

    def set(self, at: datetime) -> None:
        with self._lock:
            self.t = at.timestamp()


def _controller(app: App, jobs: JobStore, clock: Clock, scan: Any) -> Controller:
    return Controller(
        options=ControllerOptions.from_settings(app.settings), state=app.store, jobs=jobs,
        audit=app.audit, actor="test", active_version=app.engine.active_version,
        read_inventory=lambda: inventory.read_inventory(app.connection),
        open_inventory_watch=lambda: pytest.fail("no watch in this test"),
        open_event_tail=lambda cursor: pytest.fail("no event tail in this test"),
        nics=_Nics(lambda: app.connection), scan=scan, now=clock)


def test_window_closing_mid_scan_continues_in_the_next_window(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    planted = {f"/data/{d}/file{i:02}.txt" for d in ("a", "b", "c") for i in range(12)}
    for p in planted:
        plant(sim, VM, p, f"content of {p}\n".encode() * 50)
    state = tmp_path / "state"
    clock = Clock(OPEN_DAY1)
    read: list[list[str]] = []            # paths read (progress ticks) per run
    results: list[Any] = []
    stop = threading.Event()

    with App(settings_for(sim, state)) as app:
        def scan(vm: Any, *, full: bool = False, on_progress: Any = None,
                 resume_after: str = "") -> Any:
            ticks: list[str] = []
            read.append(ticks)

            def tick(progress: Any) -> None:
                if progress.path:
                    ticks.append(progress.path)
                if len(read) == 1 and len(ticks) == STOP_AFTER:
                    clock.set(OPEN_DAY1.replace(hour=4, minute=0, second=1))   # closed now
                if on_progress is not None:
                    on_progress(progress)

            result = app.scan_one(vm, full=full, on_progress=tick, resume_after=resume_after)
            results.append(result)
            return result

        vm = inventory.find_vms(app.connection, [VM])[0]
        assert vm.host is not None

        # Day 1: the scheduled full scan starts inside the window, which closes mid-walk.
        jobs = JobStore.open(state)
        c = _controller(app, jobs, clock, scan)
        c.scheduler.submit(vm=vm.moref, host=vm.host.moref, priority=Priority.SCHEDULED,
                           full=True, reason="schedule nightly", window=WINDOW)
        job = c.scheduler.take(stop=stop, timeout=1.0)
        assert job is not None
        c.run_job(job, stop=stop)
        first = results[0]
        assert first.status == "error"
        assert "time window closed" in first.reason
        # Files already downloaded when it closed still get their verdict (one tick each).
        assert STOP_AFTER <= first.scanned == len(read[0]) <= STOP_AFTER + 3
        assert first.resume_point == read[0][-1]
        vm_state = app.store.vm_state(vm.moref)
        assert vm_state is not None
        assert vm_state.state == "unprotected"       # a closed window is not unreachability
        # Closed window: nothing may start now (the job waits, queued, for the next one).
        clock.step = 0.05
        assert c.scheduler.take(stop=stop, timeout=0.2) is None
        clock.step = 0.001
        (queued,) = c.scheduler.queued()
        assert queued.resume_after == read[0][-1]
        jobs.close()

        # The resume point is durable: a restarted controller finds it in the job store.
        jobs = JobStore.open(state)
        ((stored, running),) = jobs.pending_jobs()
        assert not running
        assert stored.resume_after == read[0][-1]
        c = _controller(app, jobs, clock, scan)
        assert c.restore_queue() == 1

        # Day 2: the window opens again; the job continues after the last file it finished.
        clock.set(OPEN_DAY1 + timedelta(days=1))
        job = c.scheduler.take(stop=stop, timeout=1.0)
        assert job is not None
        assert job.resume_after == read[0][-1]
        c.run_job(job, stop=stop)
        second = results[1]
        assert second.status == "clean", second.reason
        assert second.resumed_from == read[0][-1]
        assert jobs.pending_jobs() == []             # done: nothing left to resume
        vm_state = app.store.vm_state(vm.moref)
        assert vm_state is not None
        assert vm_state.state == "protected"
        jobs.close()

    first_run, second_run = set(read[0]), set(read[1])
    assert len(read[0]) == len(first_run)
    assert len(read[1]) == len(second_run)
    assert not first_run & second_run                # nothing read twice
    assert planted <= first_run | second_run         # every file read
    assert first.scanned + second.scanned == len(first_run | second_run)
    assert second.scanned == len(second_run) < len(planted)

    entries = audit_entries(state)
    starts = [d for a, d in entries if a == "scan.start"]
    assert [d.get("resumed_from", "") for d in starts] == ["", read[0][-1]]
    (stopped,) = [d for a, d in entries if a == "job.interrupted"]
    assert stopped["reason"] == "time window closed"
    assert stopped["resume_after"] == read[0][-1]
