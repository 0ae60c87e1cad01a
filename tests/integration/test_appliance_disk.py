"""Disk scans read on the VM's own host by its appliance (issue 12, point 2).

Real parts: the bundled simulator with real disk images (``-disks``), the per-host
appliances deployed by the product's reconcile, and the appliance's engine service run as
what each appliance runs: a ``vsphere-av engine serve`` process on the appliance's own
loopback address, with real YARA. The controller is this test process; which process
sends ``/folder`` requests is seen with CPython's ``http.client.send`` audit event (every
HTTP request this process writes), so a request the controller made cannot hide.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from appliance_support import EICAR, appliance_settings
from conftest import connect, env_for, plant, vm_named, wait_task
from pyVmomi import vim
from test_scan_disk_multi import add_disk

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.engine import Engine
from vsphere_av.engine.remote import EngineClient, EngineService
from vsphere_av.lab import simulator
from vsphere_av.scan.job import ScanResult
from vsphere_av.store.audit import AuditOnUse

TOKEN = "appliance-disk-token-0123456789"
VM0, VM1 = "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"

pytestmark = pytest.mark.vcsim(hosts=1, vms=2, disks=True)

_sent: list[bytes] = []
_recording = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "http.client.send" and _recording.is_set():
        data = args[1]
        if isinstance(data, bytes | bytearray) and data[:4] in (b"GET ", b"HEAD", b"POST"):
            _sent.append(bytes(data.split(b"\r\n", 1)[0]))


_hooked: list[bool] = []


@contextlib.contextmanager
def remote_guest(settings: config.Settings,
                 url: str) -> Iterator[tuple[Any, EngineClient]]:
    """VM0's disks as the engine service at ``url`` reads them (its grants from this
    process's vCenter session), walked and scanned by the test; closed afterwards."""
    from vsphere_av.scan.sources.remote_disk import RemoteDiskGuest
    from vsphere_av.vsphere import disks

    client = EngineClient(url, token=TOKEN)
    with App(settings, actor="tester") as app, \
            disks.DatastoreFiles(connection=app.connection) as files:
        vm = next(v for v in app.select_vms(names=[VM0]))
        guest = RemoteDiskGuest(vm=vm, disks=disks.disks_of(app.connection, vm.moref),
                                client=client, reader="the host's appliance",
                                grant=files.grant, excludes=())
        try:
            yield guest, client
        finally:
            guest.close()
            client.close()


def requests_sent(run: Any) -> tuple[Any, list[bytes]]:
    """(run(), the HTTP request lines this process sent meanwhile, from any thread)."""
    if not _hooked:             # audit hooks stay for the process: one, added when first used
        sys.addaudithook(_audit)
        _hooked.append(True)
    _sent.clear()
    _recording.set()
    try:
        out = run()
    finally:
        _recording.clear()
    return out, list(_sent)


def folder_requests(run: Any) -> tuple[Any, list[bytes]]:
    """(run(), the /folder request lines this process sent meanwhile)."""
    out, sent = requests_sent(run)
    return out, [line for line in sent if b" /folder/" in line]


def scan_calls(sent: list[bytes]) -> int:
    """How many ``/v1/disk/scan`` calls are among the request lines."""
    return sum(1 for line in sent if line.startswith(b"POST /v1/disk/scan "))


def files_of(result: ScanResult) -> tuple[Any, ...]:
    return (result.status, result.scanned, result.unchanged, result.skipped,
            result.incomplete, result.errors, result.bytes,
            sorted((f.path, f.threat, f.sha256, f.action) for f in result.found),
            sorted((f["path"], f["kind"], f["reason"]) for f in result.files))


class Appliances:
    """Reconciles the appliances and runs the engine service process of the one appliance
    (``serve()`` returns its URL; ``stop(url)`` ends it; all stopped at teardown)."""

    def __init__(self, settings: config.Settings, port: int, state: Path) -> None:
        self.settings = settings
        self.port = port
        self.state = state
        self.processes: dict[str, subprocess.Popen[str]] = {}

    def address(self) -> str:
        """The one appliance, deployed and running: its address."""
        with App(self.settings, actor="tester") as app:
            from vsphere_av.fleet.manager import open_manager
            manager = open_manager(self.settings, connection=app.connection, audit=app.audit,
                                   actor="tester")
            assert manager.reconcile().ok
            (appliance,) = manager.appliances()
        return str(appliance.address)

    def __call__(self) -> str:
        address = self.address()
        env = {**os.environ, "VSPHERE_AV_STATE_DIR": str(self.state),
               "VSPHERE_AV_ENGINE_TOKEN": TOKEN}
        env.pop("VSPHERE_AV_CONFIG", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "vsphere_av", "engine", "serve",
             "--listen", f"{address}:{self.port}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        self.processes[url] = proc
        assert url == f"http://{address}:{self.port}", url
        assert EngineClient(url, token=TOKEN).health()["status"] == "ok"
        return url

    def stop(self, url: str) -> None:
        proc = self.processes.pop(url)
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def world(sim: simulator.Simulator, tmp_path: Path) -> Iterator[tuple[config.Settings, Any]]:
    """Settings with appliances on 127.0.0.91..; the appliance's engine service process."""
    settings, port = appliance_settings(sim, tmp_path, addresses="127.0.0.91-127.0.0.99",
                                        token=TOKEN)
    appliances = Appliances(settings, port, tmp_path / "appliance-state")
    try:
        yield settings, appliances
    finally:
        for url in list(appliances.processes):
            appliances.stop(url)


def test_the_appliance_reads_the_disks_on_its_host_and_finds_what_the_controller_finds(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    plant(sim, VM0, "/home/bob/eicar.com", EICAR)
    plant(sim, VM0, "/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n")   # mounted as /
    plant(sim, VM0, "/etc/motd", b"welcome\n")
    plant(sim, VM0, "/srv/big.bin", os.urandom(400_000))
    plant(sim, VM0, "/data/srv/payload.bin", EICAR)      # on a second disk, mounted at /data
    si = connect(sim)
    add_disk(si, VM0)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)

    # The controller reading the disk itself (no appliances, no disk-scan worker process):
    # its /folder requests show.
    local = config.load(env=env_for(sim, tmp_path / "local"))
    local = replace(local, scan=replace(local.scan, disk_workers=0))
    with App(local, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        here, sent_here = folder_requests(lambda: app.scan_one(vm, full=True, via="disk"))
    assert here.status == "infected", here.reason
    assert sent_here, "the controller's own reads must be visible to this check"

    serve()
    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        there, sent_there = folder_requests(lambda: app.scan_one(vm, full=True, via="disk"))
        again = app.scan_one(vm, via="disk")     # the incremental index, kept by the controller
    assert sent_there == []                        # not one /folder request from the controller
    assert there.status == "infected", there.reason
    assert there.via == "disk"
    assert files_of(there) == files_of(here)       # same files, same detections
    assert {f.path for f in there.found} == {"/home/bob/eicar.com", "/data/srv/payload.bin"}
    assert there.disk_read >= 400_000              # the appliance read the bytes (and says so)
    assert again.status == "infected"
    assert again.scanned == 2                      # only the detections are read again
    assert again.unchanged == here.scanned - 2


def test_a_running_vm_is_read_by_its_appliance_under_a_snapshot_and_remediated_at_once(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    serve()
    plant(sim, VM1, "/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n")
    dropped = plant(sim, VM1, "/tmp/dropper", EICAR)
    si = connect(sim)
    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM1]))
        assert vm.powered_on
        r, sent = folder_requests(lambda: app.scan_one(vm, via="disk"))
        audited = [e.action for e in app.audit.entries() if e.action.startswith("disk.snap")]
    assert sent == []
    assert (r.via, r.status) == ("disk", "infected"), r.reason
    assert [(f.path, f.action) for f in r.found] == [("/tmp/dropper", "quarantined")]
    assert not dropped.exists()       # quarantined through Guest Operations at once
    assert audited == ["disk.snapshot.created", "disk.snapshot.removed"]
    assert vm_named(si, VM1).snapshot is None


def test_with_the_appliance_down_the_disk_scan_waits_and_the_vm_is_unprotected(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    serve()
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        assert vm.host is not None
        wait_task(vm_named(si, f"vsphere-av-appliance-{vm.host.name}").PowerOffVM_Task())
        waiting, sent = folder_requests(lambda: app.scan_one(vm, via="disk"))
        rows = {r["name"]: r for r in app.status()}
    assert (waiting.status, waiting.reason) == ("error", "appliance down")
    assert sent == []                       # nothing read elsewhere in its place
    assert rows[VM0]["state"] == "unprotected"
    assert rows[VM0]["reason"] == "appliance down"


def test_a_disk_its_appliance_cannot_read_leaves_the_vm_unprotected_with_the_reason(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    serve()
    si = connect(sim)
    vm_ref = vm_named(si, VM0)
    plant(sim, VM0, "/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n")
    wait_task(vm_ref.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="vcsim.disk.inaccessible", value="TRUE")])))
    wait_task(vm_ref.PowerOffVM_Task(), timeout=120)
    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        r, sent = folder_requests(lambda: app.scan_one(vm, via="disk"))
        row = next(s for s in app.status(refresh=False) if s["name"] == VM0)
    assert sent == []
    assert (r.via, r.status) == ("disk", "incomplete"), r.reason
    assert "HTTP 404" in r.reason                 # the appliance's reader, named as at home
    assert "\n" not in r.reason
    assert (row["state"], row["reason"]) == ("unprotected", r.reason)


def test_the_appliance_stopping_mid_scan_is_an_outage_never_protected(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    url = serve()
    plant(sim, VM0, "/etc/fstab", b"LABEL=root / ext4 defaults 0 1\n")
    # Enough files that the batch in flight when the appliance stops cannot be the last:
    # a batch holds up to 4 MiB (scan.sources.guest.BATCH_BYTES); with four files of 200 KB
    # the first two batches held the whole VM.
    for i in range(32):
        plant(sim, VM0, f"/srv/blob{i}.bin", os.urandom(400_000))
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
    stopped: list[str] = []

    def appliance_dies(tick: Any) -> None:
        if not stopped and tick.files:
            stopped.append(tick.path)
            serve.stop(url)

    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        r = app.scan_one(vm, full=True, via="disk", on_progress=appliance_dies)
        row = app.store.vm_state(vm.moref)
    assert stopped
    assert (r.via, r.status, r.outage) == ("disk", "error", True), r.reason
    assert "the host's appliance stopped reading the disks: " in r.reason   # who to look at
    assert "\n" not in r.reason
    assert 1 <= r.scanned < 33              # the files booked before the outage stand
    assert r.resume_point
    assert row is not None
    assert (row.state, row.reason) == ("unprotected", r.reason)


def scan_with_old_appliance(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any],
        routes: Callable[[EngineService], dict[str, Any]],
) -> tuple[ScanResult, list[bytes], dict[str, Any]]:
    """VM0 (off) scanned through its disks by its appliance, whose engine service (run in this
    process, as ``engine serve`` would) has only the added ``routes(service)``: an appliance
    not yet upgraded. (The result, the /folder requests this process sent, VM0's status.)"""
    settings, appliances = world
    own = tmp_path / "old-appliance"
    engine = Engine.open(config.Settings(state_dir=own), audit=AuditOnUse(own), actor="tester")
    old = EngineService(engine=engine, token=TOKEN, listen=(appliances.address(),
                                                            appliances.port))
    old.routes.update(routes(old))
    old.start()
    try:
        si = connect(sim)
        wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
        with App(settings, actor="tester") as app:
            vm = next(v for v in app.select_vms(names=[VM0]))
            r, sent = folder_requests(lambda: app.scan_one(vm, full=True, via="disk"))
            row = next(s for s in app.status(refresh=False) if s["name"] == VM0)
    finally:
        old.shutdown()
        engine.close()
    return r, sent, row


def assert_upgrade_asked(r: ScanResult, row: dict[str, Any], problem: str) -> None:
    """Nothing clean, nothing read here, the VM unprotected: upgrade the appliance."""
    assert (r.status, r.scanned, r.found) == ("incomplete", 0, []), r.reason
    assert not r.outage                     # not retried as an outage: it will not heal
    assert r.reason == f"the host's appliance {problem}: upgrade the appliance"
    assert (row["state"], row["reason"]) == ("unprotected", r.reason)


def test_an_appliance_whose_engine_cannot_read_disks_says_so_and_nothing_is_read(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any]) -> None:
    # An engine service without the disk routes (older than disk scans).
    r, sent, row = scan_with_old_appliance(sim, tmp_path, world, lambda service: {})
    assert sent == []
    assert_upgrade_asked(r, row, "cannot read disks (its engine service has no /v1/disk "
                                 "routes)")


def test_an_appliance_that_scans_one_disk_file_per_call_is_asked_to_upgrade(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any]) -> None:
    from vsphere_av.scan.sources.disk_service import DiskService
    from vsphere_av.vsphere.disks import GrantedFiles

    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/srv/a.txt", b"a\n")
    plant(sim, VM0, "/srv/eicar.com", EICAR)

    def one_file_form(service: EngineService) -> dict[str, Any]:
        # The disk routes of an engine service older than batches: its /v1/disk/scan knew
        # only {"session", "path", "name", "owner"}, so a batch's "files" meant nothing to
        # it (this service's one-file form is that request, answered as it was).
        disk = DiskService(scanning=service.scanning, reader=GrantedFiles)
        routes: dict[str, Any] = disk.routes()
        routes["/v1/disk/scan"] = lambda request: disk.scan(
            {k: v for k, v in request.items() if k != "files"})
        return routes

    # (The appliance's service runs in this process: its own /folder reads show in ``sent``.)
    r, _sent, row = scan_with_old_appliance(sim, tmp_path, world, one_file_form)
    assert_upgrade_asked(r, row, "scans one disk file per call (an older engine service)")


# --- batches: files handed to the appliance several per call (issue 12, point 8) -----------

FSTAB = b"LABEL=root / ext4 defaults 0 1\n"


def plant_many(sim: simulator.Simulator, count: int) -> None:
    plant(sim, VM0, "/etc/fstab", FSTAB)
    for i in range(count):
        plant(sim, VM0, f"/srv/many/f{i:03}.txt", f"small file {i}\n".encode())


def sessions_opened(url: str) -> int:
    """Engine sessions the appliance's engine service has opened so far."""
    client = EngineClient(url, token=TOKEN)
    try:
        return int(client.health()["sessions_total"])
    finally:
        client.close()


def test_the_files_go_to_the_appliance_in_batches_each_scanned_in_one_engine_session(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    plant_many(sim, 150)
    plant(sim, VM0, "/srv/many/eicar.com", EICAR)
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
    local = config.load(env=env_for(sim, tmp_path / "local"))
    with App(local, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        here = app.scan_one(vm, full=True, via="disk")

    url = serve()
    before = sessions_opened(url)
    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        there, sent = requests_sent(lambda: app.scan_one(vm, full=True, via="disk"))
    calls = scan_calls(sent)
    assert files_of(there) == files_of(here)        # the same verdicts, counts and files
    assert there.scanned == here.scanned >= 152
    assert [f.path for f in there.found] == ["/srv/many/eicar.com"]
    # Batches (up to 64 files) instead of one call per file; one engine session per call.
    assert 1 <= calls <= there.scanned // 8, calls
    assert sessions_opened(url) - before == calls


def test_a_file_the_appliance_cannot_read_is_that_files_result_in_its_batch(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any]) -> None:
    settings, serve = world
    plant_many(sim, 40)
    si = connect(sim)
    vm_ref = vm_named(si, VM0)
    # A bare ext4 file system in a flat extent: its inodes can be damaged in place.
    wait_task(vm_ref.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
        vim.option.OptionValue(key="vcsim.disk.layout", value="none"),
        vim.option.OptionValue(key="vcsim.disk.format", value="monolithicFlat")])))
    wait_task(vm_ref.PowerOffVM_Task(), timeout=120)
    flat = Path(vm_ref.datastore[0].info.url) / VM0 / "disk1-flat.vmdk"
    # The extent header of one file zeroed: that file cannot be read, the others can.
    subprocess.run(["debugfs", "-w", "-R", "sif /srv/many/f007.txt block[0] 0", str(flat)],
                   check=True, capture_output=True)
    local = config.load(env=env_for(sim, tmp_path / "local"))
    with App(local, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        here = app.scan_one(vm, full=True, via="disk")

    serve()
    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        there, sent = requests_sent(lambda: app.scan_one(vm, full=True, via="disk"))
    assert files_of(there) == files_of(here)
    assert (there.status, there.scanned, there.incomplete) == ("incomplete", 40, 1), \
        there.reason
    assert [(f["path"], f["kind"]) for f in there.files] == [("/srv/many/f007.txt",
                                                              "incomplete")]
    assert scan_calls(sent) < 41        # batches; the unreadable file alone is asked again


def test_the_batch_protocol_answers_each_file_in_order_and_the_one_file_form_still_works(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    from vsphere_av import errors

    settings, serve = world
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/srv/a.txt", b"a\n")
    plant(sim, VM0, "/srv/eicar.com", EICAR)
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
    url = serve()
    with remote_guest(settings, url) as (guest, client):
        walked = {f.path for f in guest.walk(["/"], prune=lambda _: False,
                                             on_error=lambda p, e: None)}
        before = sessions_opened(url)
        answers, sent = requests_sent(lambda: guest.scan([
            ("/srv/a.txt", "a.txt", ""), ("/srv/not-walked", None, ""),
            ("/srv/eicar.com", "eicar.com", "")]))
        one = client.call("/v1/disk/scan", {"session": guest._session, "path": "/srv/a.txt",
                                            "name": "a.txt", "owner": ""})
        sessions = sessions_opened(url) - before
    assert {"/srv/a.txt", "/srv/eicar.com"} <= walked
    assert scan_calls(sent) == 1
    assert sessions == 2
    clean, missing, infected = answers
    assert (clean.path, clean.status) == ("/srv/a.txt", "clean")
    assert isinstance(missing, errors.DiskFileError)        # that file's own error
    assert "not met by the walk" in str(missing)
    assert (infected.path, infected.status) == ("/srv/eicar.com", "infected")
    # An older controller's one-file form: one answer, as before.
    assert "results" not in one
    assert (one["outcome"]["path"], one["outcome"]["status"]) == ("/srv/a.txt", "clean")


def test_a_stop_asked_mid_batch_stops_at_that_file_and_the_next_run_resumes_after_it(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    from vsphere_av.controller.workers import ScanInterrupted

    settings, serve = world
    plant_many(sim, 150)
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
    serve()
    ticks: list[str] = []

    def window_closes(tick: Any) -> None:
        ticks.append(tick.path)
        if len(ticks) == 70:                # inside the second batch
            raise ScanInterrupted("scan interrupted: time window closed")

    with App(settings, actor="tester") as app:
        vm = next(v for v in app.select_vms(names=[VM0]))
        stopped, sent = requests_sent(lambda: app.scan_one(vm, full=True, via="disk",
                                                           on_progress=window_closes))
        rest = app.scan_one(vm, full=True, via="disk", resume_after=stopped.resume_point)
    assert (stopped.status, stopped.scanned) == ("error", 70), stopped.reason
    assert "time window closed" in stopped.reason
    assert stopped.resume_point == ticks[69]        # every file up to it booked, none after
    assert scan_calls(sent) <= 10               # was one call per file: 70
    assert (rest.status, rest.resumed_from) == ("clean", ticks[69])
    assert stopped.scanned + rest.scanned == 151


def test_an_outage_mid_batch_answers_the_files_before_it_and_fails_the_rest(
        sim: simulator.Simulator, world: tuple[config.Settings, Any]) -> None:
    from vsphere_av import errors

    settings, serve = world
    plant(sim, VM0, "/etc/fstab", FSTAB)
    plant(sim, VM0, "/srv/a.txt", b"a\n")
    plant(sim, VM0, "/srv/big.bin", os.urandom(24 << 20))    # not all in the reader's cache
    plant(sim, VM0, "/srv/c.txt", b"c\n")
    si = connect(sim)
    wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
    with remote_guest(settings, serve()) as (guest, _client):
        list(guest.walk(["/"], prune=lambda _: False, on_error=lambda p, e: None))
        (first,) = guest.scan([("/srv/a.txt", "a.txt", "")])     # its blocks now cached there
        sim.stop()              # vCenter and the host's /folder gone: the next read fails
        answers, sent = requests_sent(lambda: guest.scan([
            ("/srv/a.txt", "a.txt", ""), ("/srv/big.bin", "big.bin", ""),
            ("/srv/c.txt", "c.txt", "")]))
    assert (first.path, first.status) == ("/srv/a.txt", "clean")
    assert scan_calls(sent) == 1
    answered, big, after = answers
    assert (answered.path, answered.status) == ("/srv/a.txt", "clean")    # before the outage
    assert isinstance(big, errors.ConnectionLost), big                     # the outage
    assert isinstance(after, errors.ConnectionLost)        # and every file after it
