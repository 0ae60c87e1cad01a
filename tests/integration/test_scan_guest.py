"""Agentless guest scans against the bundled simulator (issue 3, point 9).

Real parts only: the simulator binary serves vCenter and the guest file systems (files are
planted under ``<guest_root>/<VM name>/``), the engine runs real YARA with its built-in
EICAR bundle, state and audit are real SQLite files. pyVmomi is used here only to set the
scene (guest OS, tools switch, power state), as an administrator would in vCenter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from vsphere_av import config, errors
from vsphere_av.app import App
from vsphere_av.store.audit import AuditLog
from vsphere_av.vsphere import connection as vconn
from vsphere_av.vsphere import inventory
from vsphere_av.vsphere.guest import GuestFiles

simulator = pytest.importorskip("vsphere_av.lab.simulator")

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
MiB = 1024 * 1024

LINUX, WINDOWS, BADPASS, NOTOOLS, OFF, CLEAN = (f"DC0_C0_RP0_VM{i}" for i in range(6))


def _wait(task: vim.Task) -> None:
    for _ in range(300):
        if task.info.state in ("success", "error"):
            break
        time.sleep(0.05)
    assert task.info.state == "success", task.info.error


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[simulator.Simulator]:
    if not simulator.binary_path().exists():
        pytest.skip("build/vcsim missing: run make vcsim")
    s = simulator.start(guest_root=tmp_path_factory.mktemp("guests"), hosts=2, vms=6)
    si = SmartConnect(host=s.host, port=s.port, user=s.username, pwd=s.password,
                      sslContext=s.ssl_context())
    try:
        content = si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine],
                                                       True)
        vms = {vm.name: vm for vm in view.view}
        view.DestroyView()
        _wait(vms[WINDOWS].ReconfigVM_Task(vim.vm.ConfigSpec(guestId="windows9_64Guest")))
        _wait(vms[NOTOOLS].ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="vcsim.tools.disabled", value="TRUE")])))
        _wait(vms[OFF].PowerOffVM_Task())
    finally:
        Disconnect(si)
    yield s
    s.stop()


def plant(sim: simulator.Simulator, vm: str, path: str, data: bytes) -> Path:
    target = sim.guest_root / vm / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def eicar_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("docs/readme.txt", b"nothing to see")
        zf.writestr("docs/payload/eicar.txt", EICAR)
    return buf.getvalue()


def settings_for(sim: simulator.Simulator, state: Path, *, toml: str = "",
                 **env: str) -> config.Settings:
    base = {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
            "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
            "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password, "BAD_GUEST_PASSWORD": "wrong"}
    base.update(env)
    cfg = None
    if toml:
        cfg = state.parent / f"{state.name}.toml"
        cfg.write_text(toml)
    return config.load(config_file=cfg, env=base)


def audit_actions(state: Path) -> list[tuple[str, dict]]:
    with AuditLog.open(state) as log:
        return [(e.action, dict(e.details)) for e in log.entries()]


def test_linux_guest_detections_at_several_depths_archive_and_oversized(sim, tmp_path):
    clean = plant(sim, LINUX, "/etc/hostname", b"linux-vm\n")
    plant(sim, LINUX, "/usr/bin/tool", os.urandom(300_000))
    infected = ["/eicar.com", "/home/alice/Downloads/eicar.com",
                "/var/lib/app/a/b/c/d/e/f/deep.bin", "/srv/archive.zip"]
    for p in infected[:-1]:
        plant(sim, LINUX, p, EICAR)
    plant(sim, LINUX, "/srv/archive.zip", eicar_zip())
    big = plant(sim, LINUX, "/opt/big.img", EICAR + b"\0" * (2 * MiB))   # over the 1 MiB limit
    proc = plant(sim, LINUX, "/proc/42/environ", EICAR)                  # default exclusion
    state = tmp_path / "state"
    settings = settings_for(sim, state, toml="[scan]\nmax_file_size = 1048576\n")

    with App(settings) as app:
        report = app.scan(names=[LINUX])
        (result,) = report.results
        assert result.status == "infected", result.reason
        assert {f.path for f in result.found} == set(infected)
        assert len(result.found) == len(infected)   # YARA + hash list on EICAR: one finding
        assert {f.action for f in result.found} == {"quarantined"}
        zip_hit = next(f for f in result.found if f.path == "/srv/archive.zip")
        assert zip_hit.member.endswith("docs/payload/eicar.txt")
        assert result.incomplete == 1          # the big file: not read, so not checked
        assert result.files == [{"path": "/opt/big.img", "kind": "incomplete",
                                 "reason": "larger than max file size (2097220 > 1048576 bytes)"}]
        assert "incomplete: 1 path(s) not fully checked" in result.reason
        assert result.errors == 0
        assert result.scanned >= 6
        assert report.exit_code() == 1
        for p in infected:
            assert not (sim.guest_root / LINUX / p.lstrip("/")).exists(), p
        assert clean.read_bytes() == b"linux-vm\n"
        assert big.exists()
        assert proc.exists()
        items = app.quarantine_list()
        assert sorted(i["path"] for i in items) == sorted(infected)
        status = {row["name"]: row for row in app.status()}
        assert status[LINUX]["state"] == "infected"
        detections = app.detections()
        assert {d["path"] for d in detections} == set(infected)
        wanted = {"vm", "path", "threat", "sha256", "action", "time"}
        assert all(set(d) >= wanted for d in detections)

    actions = [a for a in audit_actions(state) if not a[0].startswith("signatures.")]
    names = [a for a, _ in actions]
    assert names[0] == "scan.start"
    assert names[-1] == "scan.end"
    assert names.count("detection") >= len(infected)
    assert names.count("remediation") == len(infected)
    start = actions[0][1]
    assert start["vm"] == LINUX
    assert start["host"].startswith("DC0_C0_H")
    # quarantined blobs are not the runnable bytes and are private
    blobs = list((state / "quarantine").glob("*.qbin"))
    assert len(blobs) == len(infected)
    for blob in blobs:
        assert EICAR not in blob.read_bytes()
        assert blob.stat().st_mode & 0o777 == 0o600


def test_windows_guest_paths_exclusions_and_detection(sim, tmp_path):
    plant(sim, WINDOWS, "C/Users/Bob/Downloads/invoice.exe", EICAR)
    plant(sim, WINDOWS, "C/Users/Bob/Documents/report.docx", b"PK not really a docx")
    page = plant(sim, WINDOWS, "C/pagefile.sys", EICAR)
    recycled = plant(sim, WINDOWS, "C/$Recycle.Bin/S-1-5-21/old.exe", EICAR)
    with App(settings_for(sim, tmp_path / "state")) as app:
        (result,) = app.scan(names=[WINDOWS]).results
    assert result.status == "infected", result.reason
    assert {f.path for f in result.found} == {"C:\\Users\\Bob\\Downloads\\invoice.exe"}
    assert not (sim.guest_root / WINDOWS / "C/Users/Bob/Downloads/invoice.exe").exists()
    assert page.exists()
    assert recycled.exists()


def test_incremental_skips_unchanged_files_and_full_reads_everything(sim, tmp_path):
    for i in range(5):
        plant(sim, CLEAN, f"/data/file{i}.txt", f"clean {i}\n".encode() * 100)
    with App(settings_for(sim, tmp_path / "state")) as app:
        first = app.scan(names=[CLEAN]).results[0]
        assert first.status == "clean"
        assert first.scanned >= 5
        assert first.unchanged == 0
        second = app.scan(names=[CLEAN]).results[0]
        assert second.scanned == 0
        assert second.unchanged == first.scanned
        plant(sim, CLEAN, "/data/file0.txt", b"changed and longer than before\n" * 100)
        third = app.scan(names=[CLEAN]).results[0]
        assert third.scanned == 1
        assert third.unchanged == first.scanned - 1
        full = app.scan(names=[CLEAN], full=True).results[0]
        assert full.scanned == first.scanned
        assert full.unchanged == 0
        row = next(r for r in app.status() if r["name"] == CLEAN)
        assert row["state"] == "protected"
        assert row["signature_version"] == app.engine.active_version()
        assert row["last_full_scan"]


def test_unreachable_and_powered_off_vms_do_not_stop_the_others(sim, tmp_path):
    plant(sim, BADPASS, "/etc/motd", b"hi")
    plant(sim, NOTOOLS, "/etc/motd", b"hi")
    plant(sim, CLEAN, "/etc/motd", b"hi")
    # Guest Operations only (scan.via = "auto" would read the VM without tools and the
    # powered-off one through their disks: test_scan_disk.py).
    toml = (f'[scan]\nvia = "guest"\n[[guest.credentials]]\nvm = "{BADPASS}"\nuser = "root"\n'
            f'password_env = "BAD_GUEST_PASSWORD"\n')
    with App(settings_for(sim, tmp_path / "state", toml=toml)) as app:
        report = app.scan(names=[BADPASS, NOTOOLS, OFF, CLEAN])
        by_vm = {r.vm: r for r in report.results}
        assert (by_vm[BADPASS].status, by_vm[BADPASS].reason) == (
            "unreachable", "invalid guest login")
        assert (by_vm[NOTOOLS].status, by_vm[NOTOOLS].reason) == (
            "unreachable", "guest operations unavailable")
        assert (by_vm[OFF].status, by_vm[OFF].reason) == ("skipped", "powered off")
        assert by_vm[CLEAN].status == "clean"
        assert report.exit_code() == 2
        status = {row["name"]: row for row in app.status()}
        assert (status[BADPASS]["state"], status[BADPASS]["reason"]) == (
            "unreachable", "invalid guest login")
        assert (status[NOTOOLS]["state"], status[NOTOOLS]["reason"]) == (
            "unreachable", "guest operations unavailable")
        assert status[OFF]["state"] == "unprotected"
        assert status[CLEAN]["state"] == "protected"
    text = json.dumps(audit_actions(tmp_path / "state"))
    assert "wrong" not in text
    assert sim.guest_password not in text


def test_quarantine_restore_round_trip_is_byte_identical(sim, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:      # binary, several transfer chunks long
        zf.writestr("random.bin", os.urandom(200_000))
        zf.writestr("eicar.com", EICAR)
    payload = buf.getvalue()
    target = plant(sim, LINUX, "/home/bob/tools/dropper.bin", payload)
    os.chmod(target, 0o750)
    state = tmp_path / "state"
    with App(settings_for(sim, state)) as app:
        (result,) = app.scan(names=[LINUX]).results
        hit = next(f for f in result.found if f.path == "/home/bob/tools/dropper.bin")
        assert hit.action == "quarantined"
        assert hit.sha256 == hashlib.sha256(payload).hexdigest()
        assert not target.exists()
        restored = app.quarantine_restore(hit.quarantine_id)
        assert restored["restored"]
        assert target.read_bytes() == payload
        assert target.stat().st_mode & 0o777 == 0o750
        with pytest.raises(errors.GuestFileExists, match="--force"):
            app.quarantine_restore(hit.quarantine_id)
        target.write_bytes(b"something else")
        app.quarantine_restore(hit.quarantine_id, force=True)
        assert target.read_bytes() == payload
        app.quarantine_purge(hit.quarantine_id)
        assert hit.quarantine_id not in {i["id"] for i in app.quarantine_list()}
        assert not (state / "quarantine" / f"{hit.quarantine_id}.qbin").exists()
        with pytest.raises(errors.StoreError, match="purged"):
            app.quarantine_restore(hit.quarantine_id)
    names = [a for a, _ in audit_actions(state)]
    assert names.count("quarantine.restore") == 3      # two restored, one refused
    assert "quarantine.purge" in names
    target.unlink()


def test_file_vanishing_between_listing_and_download_is_counted(sim, tmp_path):
    plant(sim, CLEAN, "/var/tmp/short-lived.log", b"gone soon")
    plant(sim, CLEAN, "/var/tmp/stays.log", b"still here")
    settings = settings_for(sim, tmp_path / "state")
    with App(settings) as app:
        vm = inventory.find_vms(app.connection, [CLEAN])[0]
        real = GuestFiles(connection=app.connection, vm=vm, user=sim.guest_user,
                          password=config.Secret(sim.guest_password))

        class Racing:
            """The real guest access; a guest process deletes one file right after listing."""

            windows = False

            def walk(self, roots, **kw):
                return real.walk(roots, **kw)

            def open_download(self, path):
                if path.endswith("short-lived.log"):
                    (sim.guest_root / CLEAN / path.lstrip("/")).unlink()
                return real.open_download(path)

            def delete_file(self, path):
                real.delete_file(path)

            def stat(self, path):
                return real.stat(path)

        from vsphere_av.scan import scan_vm
        with app.engine.session() as session:
            result = scan_vm(vm=vm, guest=Racing(), session=session, store=app.store,
                             audit=app.audit, quarantine=app.quarantine, policy=settings.scan,
                             full=True, actor="test")
    assert result.status == "clean"
    assert result.vanished == 1
    assert result.errors == 0


def test_file_listed_but_not_found_on_download_is_incomplete(sim, tmp_path):
    # Real VMware Tools list a name that is not UTF-8 as U+FFFD x3, a name no download can
    # open (the simulator now carries such names, so the real guest access is wrapped here:
    # the one thing it cannot show). A file still listed is not "vanished": not checked.
    plant(sim, CLEAN, "/var/unopenable/name.bin", EICAR)
    settings = settings_for(sim, tmp_path / "state",
                            toml='[scan]\nlinux_roots = ["/var/unopenable"]\n')
    with App(settings) as app:
        vm = inventory.find_vms(app.connection, [CLEAN])[0]
        real = GuestFiles(connection=app.connection, vm=vm, user=sim.guest_user,
                          password=config.Secret(sim.guest_password))

        class Mangled:
            windows = False

            def walk(self, roots, **kw):
                return real.walk(roots, **kw)

            def open_download(self, path):
                raise errors.GuestFileNotFound(f"file not found: {path}")

            def delete_file(self, path):
                real.delete_file(path)

            def stat(self, path):
                return real.stat(path)

        from vsphere_av.scan import scan_vm
        with app.engine.session() as session:
            result = scan_vm(vm=vm, guest=Mangled(), session=session, store=app.store,
                             audit=app.audit, quarantine=app.quarantine, policy=settings.scan,
                             full=True, actor="test")
        assert (result.status, result.vanished, result.incomplete) == ("incomplete", 0, 1)
        (entry,) = result.files
        assert entry["path"] == "/var/unopenable/name.bin"
        assert entry["reason"].startswith("listed but cannot be opened")
        assert app.store.scan_files(result.scan_id) == [entry]
        row = next(r for r in app.status(refresh=False) if r["name"] == CLEAN)
        assert row["state"] == "unprotected"
        assert row["incomplete_files"] == [entry]
    (sim.guest_root / CLEAN / "var/unopenable/name.bin").unlink()


def _terminate(sim, key: str) -> None:
    """An administrator ends our session from another session (as vCenter's session list does)."""
    admin = SmartConnect(host=sim.host, port=sim.port, user=sim.username, pwd=sim.password,
                         sslContext=sim.ssl_context())
    try:
        admin.RetrieveContent().sessionManager.TerminateSession(sessionId=[key])
    finally:
        Disconnect(admin)


def test_lost_vcenter_session_logs_in_again(sim, tmp_path):
    with App(settings_for(sim, tmp_path / "state")) as app:
        conn = app.connection
        _terminate(sim, conn.session_key())
        vms = inventory.list_vms(conn)
        assert CLEAN in {vm.name for vm in vms}
        assert conn.relogins == 1
        _terminate(sim, conn.session_key())
        (result,) = app.scan(names=[CLEAN]).results
        assert result.status == "clean"
        assert conn.relogins == 2


def test_wrong_thumbprint_is_refused_naming_both(sim, tmp_path):
    wrong = ":".join(["AB"] * 32)
    settings = settings_for(sim, tmp_path / "state", VSPHERE_AV_THUMBPRINT=wrong)
    with pytest.raises(errors.TlsVerificationError) as info:
        vconn.connect(settings.vcenter)
    assert wrong in str(info.value)
    assert sim.thumbprint in str(info.value)


def test_ca_file_trust_verifies_vcenter_and_transfers(sim, tmp_path):
    plant(sim, CLEAN, "/srv/ca-check.txt", b"ok")
    settings = settings_for(sim, tmp_path / "state", VSPHERE_AV_THUMBPRINT="",
                            VSPHERE_AV_CA_FILE=str(sim.cert_file))
    with App(settings) as app:
        assert app.connection.trust.describe() == "ca"
        (result,) = app.scan(names=[CLEAN], full=True).results
        assert result.status == "clean"
        assert result.scanned >= 1


def test_no_trust_configured_is_a_config_error(sim, tmp_path):
    settings = settings_for(sim, tmp_path / "state", VSPHERE_AV_THUMBPRINT="")
    with pytest.raises(errors.ConfigError, match="THUMBPRINT"):
        vconn.connect(settings.vcenter)


def test_per_host_limit_is_respected(sim, tmp_path):
    settings = settings_for(sim, tmp_path / "state", toml="[scan]\nper_host_limit = 1\n")
    with App(settings) as app:
        report = app.scan(all_vms=True)
    assert len(report.results) == 6
    assert report.peak_per_host
    assert max(report.peak_per_host.values()) == 1


def test_global_limit_caps_scans_across_hosts(sim, tmp_path):
    settings = settings_for(sim, tmp_path / "state",
                            toml="[scan]\nper_host_limit = 4\nglobal_limit = 1\n")
    with App(settings) as app:
        report = app.scan(all_vms=True)
    assert [r.vm for r in report.results] == sorted(r.vm for r in report.results)
    assert len(report.peak_per_host) == 2          # both hosts had VMs to scan
    assert max(report.peak_per_host.values()) == 1


def _cli(sim, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
           "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
           "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password}
    env.pop("VSPHERE_AV_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "vsphere_av", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_json_shapes_and_exit_codes(sim, tmp_path):
    plant(sim, LINUX, "/root/cli/eicar.txt", EICAR)
    state = tmp_path / "state"
    run = _cli(sim, state, "scan", LINUX, "--json")
    assert run.returncode == 1, run.stderr
    doc = json.loads(run.stdout)
    (vm,) = doc["vms"]
    assert vm["status"] == "infected"
    assert {"scanned", "unchanged", "skipped", "errors"} <= set(vm)
    assert any(d["path"] == "/root/cli/eicar.txt" for d in vm["detections"])

    run = _cli(sim, state, "scan", CLEAN, "--json")
    assert run.returncode == 0, run.stderr

    status = json.loads(_cli(sim, state, "status", "--json").stdout)
    assert "vms" in status
    for row in status["vms"]:
        assert {"name", "moref", "host", "state", "reason", "last_scan",
                "signature_version"} <= set(row)
        assert row["state"] in ("protected", "stale", "infected", "unprotected", "unreachable")

    dets = json.loads(_cli(sim, state, "detections", "--json").stdout)["detections"]
    assert {"vm", "path", "threat", "sha256", "action", "time"} <= set(dets[0])
    items = json.loads(_cli(sim, state, "quarantine", "list", "--json").stdout)["items"]
    assert {"id", "vm", "path", "threat", "sha256", "size", "time"} <= set(items[0])

    run = _cli(sim, state, "scan", "no-such-vm")
    assert run.returncode == 2
    assert "no-such-vm" in run.stderr
    run = _cli(sim, state, "quarantine", "restore", "ffffffffffff")
    assert run.returncode == 2
    assert "no quarantine item" in run.stderr


def test_scan_stopped_by_progress_callback_closes_its_records(sim, tmp_path):
    for i in range(4):
        plant(sim, CLEAN, f"/stop/f{i}.txt", f"file {i}".encode())
    state = tmp_path / "state"
    with App(settings_for(sim, state)) as app:
        vm = inventory.find_vms(app.connection, [CLEAN])[0]
        ticks: list[str] = []

        def stop_after_two(tick) -> None:
            ticks.append(tick.path)
            if len(ticks) == 2:
                raise RuntimeError("controller stopping")

        result = app.scan_one(vm, full=True, on_progress=stop_after_two)
        assert result.status == "error"
        assert "controller stopping" in result.reason
        (scan,) = app.store.scans(vm_moref=vm.moref)
        assert scan["status"] == "error"
        assert scan["finished"]
    ends = [d for a, d in audit_actions(state) if a == "scan.end"]
    assert len(ends) == 1
    assert ends[0]["reason"].startswith("interrupted")


def test_resumed_scan_keeps_what_the_stopped_part_could_not_check(sim, tmp_path):
    # A time window closes after the first file read; the resumed scan walks only what
    # follows, so the too-large file before the resume point stays incomplete in it.
    plant(sim, CLEAN, "/resume/a_big.bin", b"\0" * (2 * MiB))
    for name in ("b.txt", "c.txt", "d.txt"):
        plant(sim, CLEAN, f"/resume/{name}", name.encode())
    toml = '[scan]\nmax_file_size = 1048576\nlinux_roots = ["/resume"]\n'
    with App(settings_for(sim, tmp_path / "state", toml=toml)) as app:
        vm = inventory.find_vms(app.connection, [CLEAN])[0]

        def window_closes(tick) -> None:
            raise errors.VsphereAvError("window closed")

        stopped = app.scan_one(vm, full=True, on_progress=window_closes)
        assert stopped.status == "error"
        assert stopped.resume_point == "/resume/b.txt"
        assert [f["path"] for f in stopped.files] == ["/resume/a_big.bin"]
        resumed = app.scan_one(vm, full=True, resume_after=stopped.resume_point)
        assert resumed.resumed_from == "/resume/b.txt"
        assert resumed.scanned == 2
        assert resumed.status == "incomplete", resumed.reason
        assert [f["path"] for f in resumed.files] == ["/resume/a_big.bin"]
        row = next(r for r in app.status(refresh=False) if r["name"] == CLEAN)
        assert row["state"] == "unprotected"
    for name in ("a_big.bin", "b.txt", "c.txt", "d.txt"):
        (sim.guest_root / CLEAN / "resume" / name).unlink()


def test_windows_quarantine_restore_and_stat(sim, tmp_path):
    target = plant(sim, WINDOWS, "C/ProgramData/Tasks/updater.com", EICAR)
    with App(settings_for(sim, tmp_path / "state")) as app:
        (result,) = app.scan(names=[WINDOWS], full=True).results
        hit = next(f for f in result.found if f.path == "C:\\ProgramData\\Tasks\\updater.com")
        assert not target.exists()
        target.parent.rmdir()                      # the restore recreates the directory
        app.quarantine_restore(hit.quarantine_id)
        assert target.read_bytes() == EICAR
        vm = inventory.find_vms(app.connection, [WINDOWS])[0]
        guest = GuestFiles(connection=app.connection, vm=vm, user=sim.guest_user,
                           password=config.Secret(sim.guest_password))
        entry = guest.stat("c:\\programdata\\tasks\\UPDATER.COM")
        assert entry is not None
        assert (entry.type, entry.size) == ("file", len(EICAR))
        assert guest.stat("C:\\ProgramData\\Tasks\\missing.exe") is None
        assert guest.stat("C:\\NoSuchDir\\x") is None
    target.unlink()


def test_insecure_mode_scans_without_verification(sim, tmp_path):
    plant(sim, CLEAN, "/srv/insecure.txt", b"ok")
    settings = settings_for(sim, tmp_path / "state", VSPHERE_AV_THUMBPRINT="",
                            VSPHERE_AV_INSECURE="1")
    with App(settings) as app:
        assert app.connection.trust.describe() == "insecure"
        (result,) = app.scan(names=[CLEAN], full=True).results
    assert result.status == "clean"
    assert result.scanned >= 1


def test_unlistable_root_is_an_error_not_a_clean_scan(sim, tmp_path):
    toml = '[scan]\nlinux_roots = ["/no/such/root"]\n'
    with App(settings_for(sim, tmp_path / "state", toml=toml)) as app:
        (result,) = app.scan(names=[CLEAN]).results
        assert result.status == "unreachable"
        assert "cannot list /no/such/root" in result.reason
        row = next(r for r in app.status() if r["name"] == CLEAN)
        assert row["state"] == "unreachable"


def _spool_files() -> set[str]:
    import tempfile
    return {p.name for p in Path(tempfile.gettempdir()).glob("vsphere-av-spool-*")}


def test_files_over_the_spool_threshold_are_received_ahead_and_leave_no_spool(sim, tmp_path,
                                                                           monkeypatch):
    # The transfer thread receives the next files into the engine (memory up to the spool
    # threshold, a spool file beyond) while the scan thread matches: every file still gets
    # its verdict, and no spool file outlives the scan, finished or stopped half-way.
    root = "/spooled"
    clean = [plant(sim, LINUX, f"{root}/clean{i}.bin", os.urandom(300_000)) for i in range(3)]
    bad = f"{root}/sub/infected.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("filler.bin", os.urandom(200_000))
        zf.writestr("eicar.com", EICAR)
    plant(sim, LINUX, bad, buf.getvalue())
    toml = (f'[engine]\nspool_threshold = 65536\n[scan]\nlinux_roots = ["{root}"]\n'
            'action = "report"\nfallback_action = ""\n')
    # Spool files go to this test's own temporary directory: other processes' spools in the
    # system's /tmp (a second test run, a scan elsewhere) cannot change what is compared.
    import tempfile
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    before = _spool_files()
    assert before == set()
    with App(settings_for(sim, tmp_path / "state", toml=toml)) as app:
        (result,) = app.scan(names=[LINUX], full=True).results
        assert result.status == "infected", result.reason
        assert [f.path for f in result.found] == [bad]
        assert (result.scanned, result.errors, result.skipped) == (4, 0, 0)
        assert result.bytes == 3 * 300_000 + len(buf.getvalue())
        assert _spool_files() == before

        vm = inventory.find_vms(app.connection, [LINUX])[0]
        ticks: list[str] = []

        def stop_at_first(tick) -> None:
            ticks.append(tick.path)
            time.sleep(0.5)     # let the transfer thread finish receiving the files ahead
            raise RuntimeError("controller stopping")

        stopped = app.scan_one(vm, full=True, on_progress=stop_at_first)
        assert stopped.status == "error"
        assert "controller stopping" in stopped.reason
        assert len(ticks) == 1
        assert _spool_files() == before
    for path in clean:
        assert path.exists()
