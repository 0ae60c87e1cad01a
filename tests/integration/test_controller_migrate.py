"""A queued job follows its VM when it migrates (issue 5, point 5).

One scan slot per host: while a big VM is being scanned on host A, a stale VM also on A
waits in A's queue. When it is migrated to host B, its job moves with it and runs on B at
once, while the scan on A is still going.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import plant, settings_for, wait_task
from controller_support import admin, audit_entries, running_controller, wait_for
from pyVmomi import vim

from vsphere_av.lab import simulator

BLOCKER_SIZE = 512 * 1024 * 1024
pytestmark = pytest.mark.vcsim(hosts=2, vms=4)


def test_queued_job_moves_to_the_host_its_vm_migrated_to(sim: simulator.Simulator,
                                                          tmp_path: Path) -> None:
    state = tmp_path / "state"
    with admin(sim) as a:
        a.power_off(*a.vms)
        by_host: dict[str, list[str]] = {}
        for name, vm in sorted(a.vms.items()):
            by_host.setdefault(vm.runtime.host._moId, []).append(name)
        host_a = next(h for h, names in by_host.items() if len(names) >= 2)
        host_b = next(h for h in by_host if h != host_a)
        big, mover = by_host[host_a][:2]
        # A large sparse file keeps the one slot of host A busy for a while (no disk used).
        blob = plant(sim, big, "/data/disk.img", b"")
        with blob.open("r+b") as fh:
            fh.truncate(BLOCKER_SIZE)
        plant(sim, mover, "/etc/hostname", b"mover\n")
        settings = settings_for(sim, state, toml=(
            f"[scan]\nper_host_limit = 1\nmax_file_size = {BLOCKER_SIZE}\n"
            f"[engine]\nmax_file_size = {BLOCKER_SIZE}\n"))
        with running_controller(settings, grace=20) as rt:
            c = rt.controller
            wait_task(a.vms[big].PowerOnVM_Task())
            wait_for(lambda: [j.vm for j in c.scheduler.running()] == [a.vms[big]._moId],
                     timeout=20, what="big scan running")
            wait_task(a.vms[mover].PowerOnVM_Task())
            wait_for(lambda: any(j.vm == a.vms[mover]._moId for j in c.scheduler.queued()),
                     timeout=10, what="mover queued behind the big scan")
            (queued,) = [j for j in c.scheduler.queued() if j.vm == a.vms[mover]._moId]
            assert queued.host == host_a
            target = next(h for h in a.vms[big].runtime.host.parent.host if h._moId == host_b)
            wait_task(a.vms[mover].MigrateVM_Task(
                host=target, priority=vim.VirtualMachine.MovePriority.defaultPriority))
            wait_for(lambda: any(e.outcome == "clean"
                                 for e in rt.jobs.exposures(a.vms[mover]._moId)),
                     timeout=30, what="mover scanned on its new host")
    entries = audit_entries(state)
    (mover_start,) = [i for i, (act, d) in enumerate(entries)
                      if act == "scan.start" and d["vm"] == mover]
    assert entries[mover_start][1]["host_moref"] == host_b
    big_ends = [i for i, (act, d) in enumerate(entries) if act == "scan.end" and d["vm"] == big]
    # The mover did not wait for the big scan on its old host (which may have been put
    # back at shutdown, then it never ended at all).
    assert not big_ends or big_ends[0] > mover_start
