"""Reconnect (issue 5, point 1): the watch loops survive losing their vCenter sessions.

Both watch sessions are ended on the server side (as an expired session would be); the
controller builds new collectors and still contains a stale VM that starts afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from controller_support import admin, plant, settings_for, wait_for, wait_task

from vsphere_av import simulator
from vsphere_av.app import start_controller

VM = "DC0_C0_RP0_VM0"


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[simulator.Simulator]:
    if not simulator.binary_path().exists():
        pytest.skip("build/vcsim missing: run make vcsim")
    s = simulator.start(guest_root=tmp_path / "guests", hosts=1, vms=1)
    yield s
    s.stop()


def test_watch_loops_reconnect_after_session_loss(sim: simulator.Simulator,
                                                  tmp_path: Path) -> None:
    plant(sim, VM, "/etc/hostname", b"vm\n")
    with admin(sim) as a:
        a.power_off(VM)
        moref = a.vms[VM]._moId
        rt = start_controller(settings_for(sim, tmp_path / "state"))
        try:
            c = rt.controller
            assert c.inventory_ready.wait(20)
            assert c.events_ready.wait(20)
            keys = [session.conn.session_key() for session in rt.sessions]
            a.si.RetrieveContent().sessionManager.TerminateSession(sessionId=keys)
            wait_for(lambda: c.stats.reconnects >= 2, timeout=30, what="both loops reconnect")
            c.events_ready.clear()
            wait_for(c.events_ready.is_set, timeout=30, what="event tail reading again")
            wait_task(a.vms[VM].PowerOnVM_Task())
            wait_for(lambda: any(e.outcome == "clean" for e in rt.jobs.exposures(moref)),
                     timeout=30, what="contained and scanned after the reconnect")
            (exposure,) = rt.jobs.exposures(moref)
            assert exposure.isolated is not None
        finally:
            rt.stop(grace=10)
