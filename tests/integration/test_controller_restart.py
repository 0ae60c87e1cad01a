"""Restart safety (issue 5, points 1, 8, 9): kill -9 during scans, restart, nothing lost or doubled.

``vsphere-av serve`` runs as a real subprocess against the bundled simulator. It is killed
with SIGKILL while scans are running; a VM is powered on while it is down. After a restart
the interrupted jobs run again, the missed power-on is found from the stored event cursor
and contained, every infected file is remediated exactly once and no VM is isolated twice.
Finally SIGTERM stops it cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import plant, settings_for, wait_task
from controller_support import EICAR, admin, audit_entries, cli_env, wait_for

from vsphere_av.controller.attention import WATCHED_EVENT_TYPES
from vsphere_av.lab import simulator
from vsphere_av.models import EventCursor
from vsphere_av.store.jobs import JobStore
from vsphere_av.store.state import StateStore
from vsphere_av.vsphere.connection import connect
from vsphere_av.vsphere.watching import EventTail

BIG_A, BIG_B, LATE = (f"DC0_C0_RP0_VM{i}" for i in range(3))
INFECTED_PATHS = ("/aaa/eicar-early.com", "/srv/zzz/eicar-late.com")
pytestmark = pytest.mark.vcsim(hosts=1, vms=3)


def _serve(sim: simulator.Simulator, state: Path, log: Path) -> subprocess.Popen[bytes]:
    env = cli_env(sim, state, VSPHERE_AV_ACTOR="controller")
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "vsphere_av", "serve"], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _actions(state: Path) -> list[tuple[str, dict]]:
    return audit_entries(state) if (state / "audit.sqlite").exists() else []


def test_kill_9_during_scans_then_restart_loses_nothing_and_doubles_nothing(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "serve.log"
    for vm in (BIG_A, BIG_B):
        for p in INFECTED_PATHS:
            plant(sim, vm, p, EICAR)
        for i in range(150):                       # enough bytes to be caught mid-scan
            plant(sim, vm, f"/data/blob{i:03}.bin", os.urandom(256 * 1024))
    plant(sim, LATE, "/etc/hostname", b"late\n")
    with admin(sim) as a:
        a.power_off(BIG_A, BIG_B, LATE)
        morefs = {n: a.vms[n]._moId for n in (BIG_A, BIG_B, LATE)}
        nics_before = {n: a.nics(n) for n in (BIG_A, BIG_B, LATE)}

        proc = _serve(sim, state, log)
        try:
            wait_for(lambda: any(act == "controller.start" for act, _ in _actions(state)),
                     timeout=60, what="controller start")
            time.sleep(1.0)                       # watch and event tail are up
            wait_task(a.vms[BIG_A].PowerOnVM_Task())
            wait_task(a.vms[BIG_B].PowerOnVM_Task())
            wait_for(lambda: {d["moref"] for act, d in _actions(state) if act == "scan.start"}
                     >= {morefs[BIG_A], morefs[BIG_B]}, timeout=30, what="both scans started")
            ended = {d["moref"] for act, d in _actions(state) if act == "scan.end"}
            assert not ended, "scans finished before the kill: make the guests bigger"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL

        with JobStore.open(state) as jobs:
            interrupted = [j.vm for j, running in jobs.pending_jobs() if running]
            assert sorted(interrupted) == sorted([morefs[BIG_A], morefs[BIG_B]])
            assert {r.vm for r in jobs.isolations()} == {morefs[BIG_A], morefs[BIG_B]}
        # While the controller is down, a stale VM starts running.
        wait_task(a.vms[LATE].PowerOnVM_Task())
        time.sleep(0.5)

        proc = _serve(sim, state, log)
        try:
            def settled() -> bool:
                with JobStore.open(state) as jobs:
                    exposures = jobs.exposures()
                    return (not jobs.pending_jobs() and len(exposures) == 3
                            and all(e.closed is not None for e in exposures))
            wait_for(settled, timeout=120, what="every job done after the restart")
            late_nics = a.nics(LATE)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert proc.returncode == 0, log.read_text()[-3000:]

        # The clean late VM got its NIC state back as a running VM has it (its vNICs
        # reported disconnected while it was off); the infected ones stay cut.
        assert late_nics == [(key, start, start) for key, _, start in nics_before[LATE]]
        assert any(start for _, _, start in nics_before[LATE])
        for n in (BIG_A, BIG_B):
            assert all(not c and not s for _, c, s in a.nics(n))

    entries = _actions(state)
    actions = [act for act, _ in entries]
    assert actions.count("controller.start") == 2
    assert actions[-1] == "controller.stop"
    resumed = {d["moref"] for act, d in entries if act == "job.resumed"}
    assert resumed == {morefs[BIG_A], morefs[BIG_B]}
    # Each infected file remediated exactly once, although the scans were cut in the middle:
    # the quarantine holds each one once, and no remediation was audited twice. (A kill
    # between a quarantine and its audit entry can leave the entry out; never a second one.)
    everything = {(morefs[v], p) for v in (BIG_A, BIG_B) for p in INFECTED_PATHS}
    with StateStore.open(state) as store:
        quarantined = Counter((q.vm_moref, q.guest_path) for q in store.quarantine_items())
    assert quarantined == Counter(everything)
    remediated = Counter((d["moref"], d["path"]) for act, d in entries if act == "remediation")
    assert set(remediated.values()) == {1}
    assert set(remediated) <= everything
    # Nobody isolated twice (a second isolation would have saved the cut state as "before").
    isolated = Counter(d["moref"] for act, d in entries if act == "isolation.isolate")
    assert isolated == Counter({morefs[BIG_A]: 1, morefs[BIG_B]: 1, morefs[LATE]: 1})
    # The power-on that happened while the controller was down came from the event cursor.
    late = [d for act, d in entries if act == "isolation.isolate"
            and d["moref"] == morefs[LATE]]
    assert late[0]["event_key"] is not None
    with JobStore.open(state) as jobs:
        late_exposure = jobs.exposures(morefs[LATE])[0]
    assert late_exposure.outcome == "clean"
    for p in INFECTED_PATHS:
        for vm in (BIG_A, BIG_B):
            assert not (sim.guest_root / vm / p.lstrip("/")).exists()


def test_sigterm_puts_in_flight_scans_back_in_the_queue(sim: simulator.Simulator,
                                                        tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "serve.log"
    for i in range(300):
        plant(sim, BIG_A, f"/data/blob{i:03}.bin", os.urandom(256 * 1024))
    with admin(sim) as a:
        a.power_off(BIG_A, BIG_B, LATE)
        moref = a.vms[BIG_A]._moId
        proc = _serve(sim, state, log)
        try:
            wait_for(lambda: any(act == "controller.start" for act, _ in _actions(state)),
                     timeout=60, what="controller start")
            time.sleep(1.0)
            wait_task(a.vms[BIG_A].PowerOnVM_Task())
            wait_for(lambda: any(act == "scan.start" for act, _ in _actions(state)),
                     timeout=30, what="scan started")
        finally:
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert time.monotonic() - stopped < 30
    entries = _actions(state)
    interrupted = [d for act, d in entries if act == "job.interrupted"]
    assert [d["moref"] for d in interrupted] == [moref]
    assert interrupted[0]["requeued"] is True
    assert [act for act, _ in entries][-1] == "controller.stop"
    with JobStore.open(state) as jobs:
        pending = jobs.pending_jobs()
        assert [(j.vm, running) for j, running in pending] == [(moref, False)]
        assert jobs.isolation(moref) is not None       # still contained until scanned clean


def test_crash_before_any_event_still_finds_power_ons_while_down(sim: simulator.Simulator,
                                                                   tmp_path: Path) -> None:
    # Issue 11, point 4: a fresh state directory has no event cursor until an event is
    # processed. The first start saves one at once (vCenter's time), so a controller killed
    # before any event still reads, at restart, the power-on that happened while it was down.
    state, log = tmp_path / "state", tmp_path / "serve.log"
    plant(sim, LATE, "/etc/hostname", b"late\n")
    with admin(sim) as a:
        a.power_off(BIG_A, BIG_B, LATE)          # nothing runs: no job, no event to process
        moref = a.vms[LATE]._moId
        nics_before = a.nics(LATE)

        def cursor() -> EventCursor | None:
            if not (state / "jobs.sqlite").exists():
                return None
            with JobStore.open(state) as jobs:
                return jobs.cursor()

        proc = _serve(sim, state, log)
        try:
            saved = wait_for(cursor, timeout=60, what="the event tail watching")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert saved.key == 0, "an event was processed: the test needs none before the kill"
        assert not any(act.startswith(("isolation.", "scan.")) for act, _ in _actions(state))

        wait_task(a.vms[LATE].PowerOnVM_Task())   # while the controller is down

        proc = _serve(sim, state, log)
        try:
            def scanned() -> bool:
                with JobStore.open(state) as jobs:
                    return any(e.outcome == "clean" for e in jobs.exposures(moref))
            wait_for(scanned, timeout=60, what="the missed power-on contained and scanned")
            # Released after the clean scan, as a running VM has them (connected where
            # startConnected; the simulator reports them disconnected while off).
            assert a.nics(LATE) == [(key, start, start) for key, _, start in nics_before]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert proc.returncode == 0, log.read_text()[-3000:]
    isolated = [d for act, d in _actions(state) if act == "isolation.isolate"]
    assert [d["moref"] for d in isolated] == [moref]
    assert isolated[0]["priority"] == "instant-on"
    assert isolated[0]["event_key"] is not None      # found from the events, not the listing


def test_first_start_tail_starts_at_vcenter_time_and_keeps_later_events_in_view(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    # Events after the start time that are already in the new collector's view (they came
    # while it was being built) are new, not history; events before it are history.
    with admin(sim) as a:
        a.power_off(LATE)                          # before the start: history
        moref = a.vms[LATE]._moId
        conn = connect(settings_for(sim, tmp_path / "state").vcenter)
        try:
            start = conn.current_time()
            wait_task(a.vms[LATE].PowerOnVM_Task())   # after it, before the tail exists
            with EventTail(conn, since=None, type_ids=WATCHED_EVENT_TYPES,
                           start=start) as tail:
                assert tail.start_cursor == EventCursor(0, start.isoformat())
                events = tail.read()
        finally:
            conn.close()
    assert all(e.created >= start for e in events)
    assert "VmPoweredOnEvent" in [e.type_id for e in events if e.vm == moref]
