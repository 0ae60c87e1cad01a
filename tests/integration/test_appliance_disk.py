"""Disk scans read on the VM's own host by its appliance (issue 12, point 2).

Real parts: the bundled simulator with real disk images (``-disks``), the per-host
appliances deployed by the product's reconcile, and the appliance's engine service run as
what each appliance runs: a ``vsphere-av engine serve`` process on the appliance's own
loopback address, with real YARA. The controller is this test process; which process
sends ``/folder`` requests is seen with CPython's ``http.client.send`` audit event (every
HTTP request this process writes), so a request the controller made cannot hide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
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


def folder_requests(run: Any) -> tuple[Any, list[bytes]]:
    """(run(), the /folder request lines this process sent meanwhile)."""
    if not _hooked:             # audit hooks stay for the process: one, added when first used
        sys.addaudithook(_audit)
        _hooked.append(True)
    _sent.clear()
    _recording.set()
    try:
        out = run()
    finally:
        _recording.clear()
    return out, [line for line in _sent if b" /folder/" in line]


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

    # The controller reading the disk itself (no appliances): its /folder requests show.
    local = config.load(env=env_for(sim, tmp_path / "local"))
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
    for i in range(4):
        plant(sim, VM0, f"/srv/blob{i}.bin", os.urandom(200_000))
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
    assert "appliance" in r.reason
    assert row is not None
    assert (row.state, row.reason) == ("unprotected", r.reason)


def test_an_appliance_whose_engine_cannot_read_disks_says_so_and_nothing_is_read(
        sim: simulator.Simulator, tmp_path: Path, world: tuple[config.Settings, Any]) -> None:
    settings, appliances = world
    # An engine service without the disk routes (an appliance not yet upgraded).
    own = tmp_path / "old-appliance"
    engine = Engine.open(config.Settings(state_dir=own), audit=AuditOnUse(own), actor="tester")
    old = EngineService(engine=engine, token=TOKEN, listen=(appliances.address(),
                                                            appliances.port))
    old.start()
    try:
        si = connect(sim)
        wait_task(vm_named(si, VM0).PowerOffVM_Task(), timeout=120)
        with App(settings, actor="tester") as app:
            vm = next(v for v in app.select_vms(names=[VM0]))
            r, sent = folder_requests(lambda: app.scan_one(vm, via="disk"))
            row = next(s for s in app.status(refresh=False) if s["name"] == VM0)
    finally:
        old.shutdown()
        engine.close()
    assert sent == []
    assert r.status == "error", r.reason
    assert not r.outage                     # not retried as an outage: it will not heal
    assert "upgrade the appliance" in r.reason
    assert (row["state"], row["reason"]) == ("unreachable", r.reason)   # never protected
