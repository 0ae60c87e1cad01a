"""Disk scans without an appliance run in local worker processes (issue 12, point 8).

Real parts: the bundled simulator with real disk images (``-disks``), the real engine
(EICAR, and signature bundles imported and activated in the controller's store), real
SQLite state, and the workers as the controller starts them (forks of multiprocessing's
fork server, serving the disk routes on 127.0.0.1). Which process reads ``/folder`` is
seen with CPython's ``http.client.send`` audit event (``test_appliance_disk.folder_requests``:
every request this process writes); which processes live and what they listen on, from
``/proc``. The workers' ids come from the pool (``App._disk_workers.pids()``) and are
checked against ``/proc`` (descendants of this process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import connect, env_for, plant, vm_named, wait_task
from test_appliance_disk import files_of, folder_requests

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.app.disk_workers import DiskWorkers
from vsphere_av.lab import simulator
from vsphere_av.models import PROTECTED, UNPROTECTED

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
VM0 = "DC0_C0_RP0_VM0"
VM1 = "DC0_C0_RP0_VM1"
# VM1's clean files: several of the disk service's batches (64 files a call), so that a
# scan still makes calls after its first file is booked.
CLEAN_FILES = 300

pytestmark = pytest.mark.vcsim(hosts=1, vms=2, disks=True)


def settings(sim: simulator.Simulator, state: Path, *, workers: int,
             extra: str = "") -> config.Settings:
    cfg = state.parent / f"{state.name}.toml"
    # A small size limit: one file over it, so the incomplete accounting is compared too.
    cfg.write_text(f"[scan]\ndisk_workers = {workers}\nmax_file_size = 300000\n{extra}")
    env = env_for(sim, state)
    del env["VSPHERE_AV_GUEST_USER"], env["VSPHERE_AV_GUEST_PASSWORD"]
    return config.load(config_file=cfg, env=env)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> set[int]:
    """Live processes below ``pid`` (the fork server and the workers it forked)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def worker_pids(app: App) -> set[int]:
    """The pool's workers, each checked to be a live descendant of this process."""
    pool = app._disk_workers
    pids = set(pool.pids()) if pool is not None else set()
    assert pids <= descendants(os.getpid()), "a worker that is not this process's"
    return pids


def fork_servers() -> set[int]:
    """multiprocessing's fork servers below this process, and their forks."""
    found = set()
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
    return found


def wait_gone(pids: set[int], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def listening(pid: int) -> list[str]:
    """The local addresses ``pid`` listens on (TCP, v4 and v6), from its socket inodes."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:        # 0A: LISTEN
                out.append(_address(fields[1]))
    return out


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{'.'.join(str(b) for b in reversed(raw))}:{int(port, 16)}"
    words = [raw[i:i + 4][::-1].hex() for i in range(0, 16, 4)]     # host-order words
    return f"[{':'.join(w[j:j + 4] for w in words for j in (0, 4))}]:{int(port, 16)}"


@pytest.fixture
def dormant_vms(sim: simulator.Simulator) -> None:
    plant(sim, VM0, "/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n")
    plant(sim, VM0, "/home/bob/eicar.com", EICAR)
    plant(sim, VM0, "/srv/app/readme.txt", b"nothing to see\n")
    plant(sim, VM0, "/srv/big.bin", os.urandom(400_000))      # over the size limit
    for i in range(CLEAN_FILES):
        plant(sim, VM1, f"/srv/data/f{i:03}.txt", f"plain file {i}\n".encode() * 50)
    si = connect(sim)
    for vm in (VM0, VM1):
        wait_task(vm_named(si, vm).PowerOffVM_Task())


def test_a_disk_scan_without_appliance_runs_in_a_worker_process_with_the_same_result(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None) -> None:
    before = descendants(os.getpid())
    with App(settings(sim, tmp_path / "inproc", workers=0)) as app:
        report, here = folder_requests(lambda: app.scan(names=[VM0], full=True))
        assert descendants(os.getpid()) == before       # no worker for disk_workers = 0
        assert app._disk_workers is None
    (inproc,) = report.results
    assert here, "in-process: this process reads the disk"
    assert (inproc.via, inproc.status) == ("disk", "infected"), inproc.reason
    assert [f.path for f in inproc.found] == ["/home/bob/eicar.com"]
    assert inproc.incomplete == 1

    with App(settings(sim, tmp_path / "workers", workers=2)) as app:
        report, here = folder_requests(lambda: app.scan(names=[VM0], full=True))
        workers = worker_pids(app)
        assert len(workers) == 1, workers          # one VM: one worker started
        assert len(fork_servers() - workers) == 1  # (a worker is a fork of it: same cmdline)
        assert all(alive(pid) for pid in workers)
    (remote,) = report.results
    assert here == [], "with workers, this process sends no /folder request"
    assert remote.disk_read > 0
    assert files_of(remote) == files_of(inproc)
    assert (remote.via, remote.status) == ("disk", "infected")
    assert remote.signature_version == inproc.signature_version
    # App.close ended the worker, and the fork server (waited for: none of ours is left).
    wait_gone(workers)
    assert not any(alive(pid) for pid in workers)
    assert fork_servers() == set()


def test_workers_are_reused_across_vms_one_vm_each_at_a_time(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Who held which worker when: the pool's own engine(), timed around.
    held: list[tuple[int, float, float]] = []
    original = DiskWorkers.engine

    @contextlib.contextmanager
    def timed(self: DiskWorkers, *, version: int) -> Iterator[Any]:
        with original(self, version=version) as remote:
            pid = next(w.pid for w in self._workers if w.url == remote.client.base_url)
            start = time.monotonic()
            try:
                yield remote
            finally:
                held.append((pid, start, time.monotonic()))

    monkeypatch.setattr(DiskWorkers, "engine", timed)

    # Two workers allowed, one VM after the other: the second VM reuses the first worker.
    with App(settings(sim, tmp_path / "seq", workers=2)) as app:
        first = app.scan(names=[VM0], full=True).results[0]
        pids = worker_pids(app)
        second = app.scan(names=[VM1], full=True).results[0]
        assert worker_pids(app) == pids
    assert len(pids) == 1
    assert (first.status, second.status) == ("infected", "clean"), second.reason
    assert [pid for pid, _, _ in held] == [*pids, *pids]

    # One worker, two VMs scanned at once (per-host limit 2): the second waits for it.
    held.clear()
    with App(settings(sim, tmp_path / "queued", workers=1)) as app:
        report = app.scan(names=[VM0, VM1], full=True)
        pids = worker_pids(app)
    assert max(report.peak_per_host.values()) == 2      # both VMs were scanning at once
    assert [r.status for r in report.results] == ["infected", "clean"]
    assert len(pids) == 1
    assert {pid for pid, _, _ in held} == pids
    (_, _, first_end), (_, second_start, _) = sorted(held, key=lambda h: h[1])
    assert first_end <= second_start, "two VMs in one worker at once"


def test_a_worker_killed_mid_scan_is_an_outage_and_is_replaced(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None) -> None:
    with App(settings(sim, tmp_path / "state", workers=1)) as app:
        killed: list[int] = []

        def kill_at_first_file(progress: Any) -> None:
            if not killed and not progress.done:
                (pid,) = worker_pids(app)
                os.kill(pid, signal.SIGKILL)
                wait_gone({pid})
                killed.append(pid)

        (broken,) = app.scan(names=[VM1], full=True, on_progress=kill_at_first_file).results
        assert killed
        assert not alive(killed[0])
        assert broken.outage, broken.reason
        assert broken.status == "error"
        # The reason names the process that stopped: no appliance to go looking for.
        assert "the disk-scan worker stopped reading the disks: " in broken.reason
        assert "appliance" not in broken.reason
        state = app.store.vm_state(broken.moref)
        assert state is not None
        assert state.state == UNPROTECTED, state

        (again,) = app.scan(names=[VM1], full=True).results
        (fresh,) = worker_pids(app)
        assert fresh != killed[0]
        assert (again.status, again.outage) == ("clean", False), again.reason
        assert again.scanned == CLEAN_FILES
        state = app.store.vm_state(again.moref)
        assert state is not None
        assert state.state == PROTECTED

        # A worker that dies idle, between scans, costs no VM an outage: it is replaced.
        os.kill(fresh, signal.SIGKILL)
        wait_gone({fresh})
        (third,) = app.scan(names=[VM1], full=True).results
        assert (third.status, third.outage) == ("clean", False), third.reason
        (replacement,) = worker_pids(app)
        assert replacement not in (fresh, killed[0])


def test_a_scan_runs_and_is_recorded_under_one_version_and_follows_activation(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    # Every file read is a detection under this version: none may appear in a scan
    # recorded under the version before it.
    (bundle / "all.yar").write_text("rule EveryFile { condition: filesize >= 0 }\n")
    with App(settings(sim, tmp_path / "state", workers=1)) as app:
        v1 = app.engine.active_version()
        activated: list[int] = []

        def activate_at_first_file(progress: Any) -> None:
            if not activated and not progress.done:
                activated.append(app.engine.store.import_bundle(bundle).info.version)

        (during,) = app.scan(names=[VM1], full=True, on_progress=activate_at_first_file).results
        (pid,) = worker_pids(app)
        assert activated
        assert activated[0] > v1
        # The worker went on under the version the scan started with, and says so.
        assert during.signature_version == v1
        assert (during.status, during.found) == ("clean", []), during.reason
        assert during.scanned == CLEAN_FILES

        (after,) = app.scan(names=[VM1], full=True).results
        (fresh,) = worker_pids(app)      # the worker of v1 replaced by one of the new version
        assert fresh != pid
        wait_gone({pid})
        assert not alive(pid)
        assert after.signature_version == activated[0]
        assert after.status == "infected"
        assert len(after.found) == CLEAN_FILES
        assert {f.threat for f in after.found} == {"EveryFile"}


def test_workers_listen_on_loopback_only_each_behind_its_own_token(
        sim: simulator.Simulator, tmp_path: Path) -> None:
    s = settings(sim, tmp_path / "state", workers=2)
    with App(s) as app:
        version = app.engine.active_version()
    pool = DiskWorkers(settings=s, count=2)
    try:
        with pool.engine(version=version) as a, pool.engine(version=version) as b:
            assert a.active_version() == b.active_version() == version
            pids = pool.pids()
            assert len(pids) == 2
            for pid in pids:
                where = listening(pid)
                assert where, f"worker {pid} listens nowhere"
                assert all(addr.startswith("127.0.0.1:") for addr in where), where
            # Without a token, or with the other worker's: refused.
            for remote, other in ((a, b), (b, a)):
                url = remote.client.base_url
                assert requests.post(url + "/v1/disk/open", json={}, timeout=10).status_code == 401
                stolen = {"Authorization": f"Bearer {other.client._token}"}
                assert requests.post(url + "/v1/disk/open", json={}, headers=stolen,
                                     timeout=10).status_code == 401
            # Ctrl-C in a terminal reaches the whole process group: the controller's to
            # handle, the workers go on (and end with it).
            for pid in pids:
                os.kill(pid, signal.SIGINT)
        assert sorted(pool.pids()) == sorted(pids)     # both answered their release
        assert all(alive(pid) for pid in pids)
        with pool.engine(version=version) as again:
            assert again.active_version() == version
    finally:
        pool.close()
    assert not any(alive(pid) for pid in pids)


def controller_env(sim: simulator.Simulator, tmp_path: Path, *, workers: int) -> dict[str, str]:
    """The environment of a controller run as a child process (``tmp_path / "state.toml"``
    its settings, ``workers`` disk workers): the simulator's vCenter, no guest login."""
    state = tmp_path / "state"
    settings(sim, state, workers=workers)
    env = {k: v for k, v in env_for(sim, state).items() if not k.startswith("VSPHERE_AV_GUEST")}
    return {**os.environ, **env}


SCRIPT = """
import os, sys, time
from pathlib import Path
from vsphere_av import config
from vsphere_av.app import App
app = App(config.load(config_file=Path(sys.argv[1])))
report = app.scan(names=[sys.argv[2]], full=True)
print(report.results[0].status, *app._disk_workers.pids(), flush=True)
if sys.argv[3] == "sleep":
    time.sleep(600)
# "exit": the interpreter ends with the App never closed (still referenced here)
"""


def test_a_killed_controller_leaves_no_worker_behind(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None) -> None:
    env = controller_env(sim, tmp_path, workers=2)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "state.toml"), VM0,
                             "sleep"],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        status, *pids = proc.stdout.readline().split()
        assert status == "infected"
        workers = {int(p) for p in pids}
        assert len(workers) == 1
        below = descendants(proc.pid)      # the fork server, the worker, the resource tracker
        assert workers <= below
        assert all(alive(pid) for pid in below)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_gone(below)
        assert not any(alive(pid) for pid in below), "a child outlived its controller"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_controller_that_exits_without_closing_its_app_ends_its_workers(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None) -> None:
    env = controller_env(sim, tmp_path, workers=1)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "state.toml"), VM0,
                           "exit"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, *pids = proc.stdout.split()
    assert status == "infected"
    (worker,) = (int(p) for p in pids)
    wait_gone({worker})
    assert not alive(worker)


def test_the_pool_never_starts_more_than_its_size(tmp_path: Path) -> None:
    s = config.load(env={"VSPHERE_AV_STATE_DIR": str(tmp_path / "state")})
    with App(s) as app:
        version = app.engine.active_version()
    pool = DiskWorkers(settings=s, count=1)
    order: list[str] = []

    def second() -> None:
        with pool.engine(version=version):
            order.append("second")

    try:
        with pool.engine(version=version):
            waiter = threading.Thread(target=second)
            waiter.start()
            waiter.join(timeout=2.0)
            assert waiter.is_alive(), "the second user did not wait for the only worker"
            order.append("first")
        waiter.join(timeout=60)
        assert order == ["first", "second"]
        assert len(pool.pids()) == 1
    finally:
        pool.close()


def test_warm_starts_the_fork_server_before_any_worker_and_close_ends_it(
        tmp_path: Path) -> None:
    s = config.load(env={"VSPHERE_AV_STATE_DIR": str(tmp_path / "state")})
    assert fork_servers() == set()
    pool = DiskWorkers(settings=s, count=1)
    try:
        pool.warm()
        deadline = time.monotonic() + 60
        while not fork_servers() and time.monotonic() < deadline:
            time.sleep(0.1)
        (server,) = fork_servers()
        assert pool.pids() == []                 # the server only: no worker yet
    finally:
        pool.close()
    wait_gone({server})
    assert fork_servers() == set()



def test_a_controller_whose_disks_a_worker_reads_never_loads_the_disk_reader(
        sim: simulator.Simulator, tmp_path: Path, dormant_vms: None) -> None:
    # Dissect and libyal (imports and cstruct compiling: about half a second of CPU) are the
    # worker's; the controller process only walks through the protocol.
    env = controller_env(sim, tmp_path, workers=1)
    script = (
        "import sys\nfrom pathlib import Path\nfrom vsphere_av import config\n"
        "from vsphere_av.app import App\n"
        "with App(config.load(config_file=Path(sys.argv[1]))) as app:\n"
        "    (result,) = app.scan(names=[sys.argv[2]], full=True).results\n"
        "    workers = app._disk_workers.pids()\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('dissect', 'pyfs')))\n"
        "print(result.status, len(workers), *loaded)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "state.toml"), VM0],
                          env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["infected", "1"], proc.stdout
