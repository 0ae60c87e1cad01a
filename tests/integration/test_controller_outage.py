"""Outages (issue 11, point 2): vCenter and its hosts going away mid-scan never end a scan clean.

The bundled simulator is killed (SIGKILL: vCenter and the hosts' transfer endpoint vanish at
once) while scans are reading the guests, and started again on the same port with the same
certificate (``identity``), guest files and inventory. The scans cut by the outage end
failed (not clean, not per-file errors), the VMs are ``unprotected`` with the reason, and
under ``serve`` the jobs are retried, never given up on, until vCenter is back; only the
retry's clean result protects the VMs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import SimulatorFactory, plant, settings_for
from controller_support import audit_entries, running_controller, wait_for

from vsphere_av.app import App
from vsphere_av.config import Secret
from vsphere_av.lab import simulator
from vsphere_av.models import PROTECTED, UNPROTECTED
from vsphere_av.scan import scan_vm
from vsphere_av.vsphere import inventory
from vsphere_av.vsphere.guest import Download, GuestFiles

VMS = ("DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1")
FILES = 1500                    # enough that both scans are still reading at the kill


def _kill(sim: simulator.Simulator) -> None:
    sim.process.send_signal(signal.SIGKILL)           # vCenter and hosts gone at once
    sim.process.wait(timeout=10)


def test_scan_cut_by_an_outage_fails_and_unprotects_a_protected_vm(
        vcsim_factory: SimulatorFactory, tmp_path: Path) -> None:
    sim = vcsim_factory(hosts=1, vms=1)
    vm_name = "DC0_C0_RP0_VM0"
    for i in range(40):
        plant(sim, vm_name, f"/data/f{i:02}.txt", os.urandom(512))
    with App(settings_for(sim, tmp_path / "state")) as app:
        vm = inventory.find_vms(app.connection, [vm_name])[0]
        assert app.scan_one(vm).status == "clean"
        assert app.store.vm_state(vm.moref).state == PROTECTED
        ticks: list[str] = []

        def outage_after_ten(tick: Any) -> None:
            ticks.append(tick.path)
            if len(ticks) == 10:
                _kill(sim)

        result = app.scan_one(vm, full=True, on_progress=outage_after_ten)
        assert (result.status, result.outage, result.errors) == ("error", True, 0), result
        assert 10 <= result.scanned < 40
        assert result.reason.startswith("scan interrupted: connection lost ("), result
        record = app.store.vm_state(vm.moref)
        assert (record.state, record.reason) == (UNPROTECTED, result.reason)
        (cut, first) = app.store.scans(vm_moref=vm.moref)
        assert (cut["status"], cut["errors"], first["status"]) == ("error", 0, "clean")


def test_outage_in_the_middle_of_a_file_is_not_that_files_error(
        vcsim_factory: SimulatorFactory, tmp_path: Path) -> None:
    # The engine turns a download that breaks off into an "error" verdict of that file; the
    # scan must still see the break, retry the file and so find that vCenter is gone.
    sim = vcsim_factory(hosts=1, vms=1)
    vm_name, big = "DC0_C0_RP0_VM0", "/data/big.bin"
    plant(sim, vm_name, big, bytes(48 * 1024 * 1024))   # far more than socket buffers hold
    with App(settings_for(sim, tmp_path / "state")) as app:
        vm = inventory.find_vms(app.connection, [vm_name])[0]
        real = GuestFiles(connection=app.connection, vm=vm, user=sim.guest_user,
                          password=Secret(sim.guest_password))

        class CutMidBody:
            """The real guest access; the simulator dies after the first MiB of the big file.

            (The simulator cannot stop a transfer at a chosen byte by itself.)
            """

            windows = False
            local_downloads = True

            def walk(self, roots: Any, **kw: Any) -> Any:
                return real.walk(roots, **kw)

            def stat(self, path: str) -> Any:
                return real.stat(path)

            def delete_file(self, path: str) -> None:
                real.delete_file(path)

            def open_download(self, path: str) -> Download:
                download = real.open_download(path)
                if sim.running():
                    whole = download.chunks

                    def cut() -> Iterator[bytes]:
                        chunks = whole()
                        yield next(chunks)
                        _kill(sim)
                        yield from chunks

                    download.chunks = cut  # type: ignore[method-assign]
                return download

        with app.engine.session() as session:
            result = scan_vm(vm=vm, guest=CutMidBody(), session=session, store=app.store,
                             audit=app.audit, quarantine=app.quarantine, policy=app.settings.scan,
                             engine_max_file_size=app.settings.engine.max_file_size)
        assert not sim.running()
        assert (result.status, result.outage, result.errors) == ("error", True, 0), result
        assert app.store.vm_state(vm.moref).state == UNPROTECTED


def test_outage_mid_scan_fails_the_scan_and_the_retry_protects(
        vcsim_factory: SimulatorFactory, tmp_path: Path) -> None:
    identity = tmp_path / "vcsim-identity.pem"
    sim = vcsim_factory(hosts=1, vms=2, identity=identity)
    state = tmp_path / "state"
    for vm in VMS:
        for i in range(FILES):
            plant(sim, vm, f"/data/f{i:04}.txt", os.urandom(512))
    # Fast retries, and few attempts allowed: an outage must not use them up.
    settings = settings_for(sim, state, toml="[controller]\nretry_base = 0.5\nretry_max = 2\n"
                                             "max_attempts = 2\n")
    with running_controller(settings) as rt:
        store = rt.app.store
        vms, _ = rt.controller.inventory()
        morefs = {v.name: moref for moref, v in vms.items()}

        def downloading() -> bool:
            # The first files' verdicts are indexed: the listing is over, downloads run.
            return all(store.file_record(m, "/data/f0000.txt") is not None
                       for m in (morefs[vm] for vm in VMS))

        wait_for(downloading, timeout=60, what="both VMs' scans downloading")
        assert not any(s["finished"] for s in store.scans()), "make the guests bigger"
        _kill(sim)

        def first_scans_ended() -> list[dict]:
            first = [min((s for s in store.scans() if s["vm_name"] == vm),
                         key=lambda s: s["id"]) for vm in VMS]
            return first if all(s["finished"] for s in first) else []

        cut = wait_for(first_scans_ended, timeout=60, what="the cut scans to end")
        outcomes = [(s["status"], s["reason"], s["errors"]) for s in cut]
        assert all(s["status"] == "error" for s in cut), outcomes
        assert all("unreachable" in s["reason"] for s in cut), outcomes
        assert all(s["errors"] == 0 for s in cut), "an outage is not a per-file error"
        for s in cut:
            vm_state = store.vm_state(s["vm_moref"])
            assert vm_state.state == UNPROTECTED, vm_state
            assert "scan interrupted: connection lost" in vm_state.reason
        # The jobs go on being retried while vCenter is down (more than max_attempts).
        wait_for(lambda: rt.controller.stats.retries >= 6, timeout=60,
                 what="retries during the outage")
        assert not rt.controller.scheduler.idle()
        assert all(store.vm_state(s["vm_moref"]).state == UNPROTECTED for s in cut)

        during_outage = len(audit_entries(state))
        again = vcsim_factory(listen=f"{sim.host}:{sim.port}", guest_root=sim.guest_root,
                              hosts=1, vms=2, identity=identity)
        assert again.thumbprint == sim.thumbprint

        def protected() -> bool:
            states = [store.vm_state(s["vm_moref"]) for s in cut]
            return all(st is not None and st.state == PROTECTED for st in states)

        wait_for(protected, timeout=120, what="the retried scans to protect both VMs")
        for s in cut:
            # (A sweep queued by the reconnect's listing may rescan it once more afterwards.)
            clean = [c for c in store.scans(vm_moref=s["vm_moref"]) if c["status"] == "clean"]
            retry = min(clean, key=lambda c: c["id"])
            assert retry["id"] > s["id"]
            assert retry["scanned"] + retry["unchanged"] == FILES
            assert retry["errors"] == 0

    # The audit log tells the same story: the cut scans ended failed, no scan of either VM
    # ended clean while vCenter was down, and one did after it came back.
    entries = audit_entries(state)
    for s in cut:
        ends = [(i, d["status"], d["reason"]) for i, (act, d) in enumerate(entries)
                if act == "scan.end" and d["moref"] == s["vm_moref"]]
        assert ends[0][1] == "error"
        assert "unreachable" in ends[0][2]
        assert all(status != "clean" for i, status, _ in ends if i < during_outage)
        assert any(status == "clean" for i, status, _ in ends if i >= during_outage)
    assert not [d for act, d in entries if act == "job.failed"]
