"""Scheduled full scans (issue 5, point 5): cron with jitter, queued at the lowest priority.

The controller runs in-process against the bundled simulator; only the moment is chosen by
the test (``fire_schedules(at=...)`` with the schedule's next fire time) instead of waiting
for the wall clock to reach it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import plant, settings_for
from controller_support import audit_entries, running_controller, wait_for

from vsphere_av.lab import simulator
from vsphere_av.models import Priority

TOML = """
[[schedule]]
name = "nightly"
cron = "0 3 * * *"
jitter = "3s"
full = true
vms = "DC0_C0_RP0_VM*"
"""
pytestmark = pytest.mark.vcsim(hosts=1, vms=3)


def test_cron_schedule_queues_jittered_full_scans(sim: simulator.Simulator,
                                                  tmp_path: Path) -> None:
    state = tmp_path / "state"
    for i in range(3):
        plant(sim, f"DC0_C0_RP0_VM{i}", "/etc/hostname", b"vm\n")
    with running_controller(settings_for(sim, state, toml=TOML), events=False) as rt:
        c = rt.controller
        wait_for(lambda: c.stats.scans >= 3 and c.scheduler.idle(), timeout=60,
                 what="start-up rescans")
        fire = c.options.schedules[0].next_fire(datetime.now(UTC))
        assert fire.hour == 3
        assert c.fire_schedules(at=fire) == 3
        assert c.fire_schedules(at=fire) == 0          # one firing is queued once
        queued = c.scheduler.queued()
        assert {j.priority for j in queued} == {Priority.SCHEDULED}
        assert all(j.full for j in queued)
        delays = sorted(j.not_before for j in queued)
        assert len(set(delays)) == 3                    # spread by the jitter
        assert delays[-1] - c.now() <= 3.0
        wait_for(lambda: c.stats.scans >= 6 and c.scheduler.idle(), timeout=60,
                 what="scheduled scans done")
    entries = audit_entries(state)
    (fired,) = [d for act, d in entries if act == "schedule.fired"]
    assert fired["schedule"] == "nightly"
    assert fired["queued"] == 3
    after = entries[[act for act, _ in entries].index("schedule.fired"):]
    starts = [d for act, d in after if act == "scan.start"]
    assert len(starts) == 3
    assert all(d["full"] for d in starts)
