"""Disk scans without an appliance run in local worker processes (issue 12, point 8).

Real parts: the bundled simulator with real disk images (``-disks``), the real engine
(EICAR), real SQLite state, and the workers as the controller starts them (spawned
processes serving the disk routes on 127.0.0.1). Which process reads ``/folder`` is seen
with CPython's ``http.client.send`` audit event (``test_appliance_disk.folder_requests``:
every request this process writes); which processes exist, from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import connect, env_for, plant, vm_named, wait_task
from test_appliance_disk import files_of, folder_requests

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.lab import simulator

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
VM0 = "DC0_C0_RP0_VM0"

pytestmark = pytest.mark.vcsim(hosts=1, vms=1, disks=True)


def settings(sim: simulator.Simulator, state: Path, *, workers: int) -> config.Settings:
    cfg = state.parent / f"{state.name}.toml"
    # A small size limit: one file over it, so the incomplete accounting is compared too.
    cfg.write_text(f"[scan]\ndisk_workers = {workers}\nmax_file_size = 300000\n")
    env = env_for(sim, state)
    del env["VSPHERE_AV_GUEST_USER"], env["VSPHERE_AV_GUEST_PASSWORD"]
    return config.load(config_file=cfg, env=env)


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def workers_of(pid: int) -> set[int]:
    """The disk-scan workers among ``pid``'s children (not multiprocessing's resource
    tracker, which "spawn" also starts)."""
    return {c for c in children(pid)
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def dormant_vm(sim: simulator.Simulator) -> None:
    plant(sim, VM0, "/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n")
    plant(sim, VM0, "/home/bob/eicar.com", EICAR)
    plant(sim, VM0, "/srv/app/readme.txt", b"nothing to see\n")
    plant(sim, VM0, "/srv/big.bin", os.urandom(400_000))      # over the size limit
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task())


def test_a_disk_scan_without_appliance_runs_in_a_worker_process_with_the_same_result(
        sim: simulator.Simulator, tmp_path: Path, dormant_vm: None) -> None:
    before = children(os.getpid())
    with App(settings(sim, tmp_path / "inproc", workers=0)) as app:
        report, here = folder_requests(lambda: app.scan(names=[VM0], full=True))
        assert children(os.getpid()) == before          # no worker for disk_workers = 0
    (inproc,) = report.results
    assert here, "in-process: this process reads the disk"
    assert (inproc.via, inproc.status) == ("disk", "infected"), inproc.reason
    assert [f.path for f in inproc.found] == ["/home/bob/eicar.com"]
    assert inproc.incomplete == 1

    with App(settings(sim, tmp_path / "workers", workers=2)) as app:
        report, here = folder_requests(lambda: app.scan(names=[VM0], full=True))
        workers = workers_of(os.getpid())
        assert len(workers) == 1, workers          # one VM: one worker started
        assert all(alive(pid) for pid in workers)
    (remote,) = report.results
    assert here == [], "with workers, this process sends no /folder request"
    assert remote.disk_read > 0
    assert files_of(remote) == files_of(inproc)
    assert (remote.via, remote.status) == ("disk", "infected")
    # App.close ended the worker.
    assert not any(alive(pid) for pid in workers)
    assert workers_of(os.getpid()) == set()


SCRIPT = """
import os, sys, time
from pathlib import Path
from vsphere_av import config
from vsphere_av.app import App
app = App(config.load(config_file=Path(sys.argv[1])))
report = app.scan(names=[sys.argv[2]], full=True)
print(report.results[0].status, flush=True)
time.sleep(600)
"""


def test_a_killed_controller_leaves_no_worker_behind(
        sim: simulator.Simulator, tmp_path: Path, dormant_vm: None) -> None:
    state = tmp_path / "state"
    s = settings(sim, state, workers=2)
    env = {k: v for k, v in env_for(sim, state).items() if not k.startswith("VSPHERE_AV_GUEST")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "state.toml"), VM0],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "infected"
        workers = children(proc.pid)         # the worker and the resource tracker
        assert len(workers_of(proc.pid)) == 1, workers
        assert all(alive(pid) for pid in workers)
        assert s.scan.disk_workers == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in workers), "a child outlived its controller"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

