"""Reconnect (issue 5, point 1): the watch loops survive losing their vCenter sessions.

Both watch sessions are ended on the server side (as an expired session would be); the
controller builds new collectors and still contains a stale VM that starts afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import plant, settings_for, wait_task
from controller_support import admin, running_controller, wait_for

from vsphere_av.lab import simulator

VM = "DC0_C0_RP0_VM0"
pytestmark = pytest.mark.vcsim(hosts=1, vms=1)


def test_watch_loops_reconnect_after_session_loss(sim: simulator.Simulator,
                                                  tmp_path: Path) -> None:
    plant(sim, VM, "/etc/hostname", b"vm\n")
    with admin(sim) as a:
        a.power_off(VM)
        moref = a.vms[VM]._moId
        with running_controller(settings_for(sim, tmp_path / "state")) as rt:
            c = rt.controller
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
