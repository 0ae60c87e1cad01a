"""Crash safety of remediation (issue 3 point 4, issue 5 point 8): write-ahead detections.

A process killed between changing the guest (quarantine stored, guest file deleted) and
recording the outcome must lose neither the detection nor its audit entry, and the next scan
must finish the job without a second quarantine item, detection row or audit entry. The kill
is made deterministic in-process: the guest access raises a ``BaseException`` at the chosen
moment, which nothing in the scanner catches, so nothing after it runs (as with SIGKILL). The
state and the audit log are the real files; the next scan opens them fresh.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.scan import scan_vm
from vsphere_av.store.audit import AuditLog
from vsphere_av.vsphere import inventory
from vsphere_av.vsphere.guest import GuestFiles

simulator = pytest.importorskip("vsphere_av.lab.simulator")

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
VM = "DC0_C0_RP0_VM0"
PATH = "/crash/eicar.com"


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the scanner runs."""


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not simulator.binary_path().exists():
        pytest.skip("build/vcsim missing: run make vcsim")
    s = simulator.start(guest_root=tmp_path_factory.mktemp("guests"), hosts=1, vms=1)
    yield s
    s.stop()


def _settings(sim: Any, state: Path) -> config.Settings:
    return config.load(config_file=None, env={
        "VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
        "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
        "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password})


def _crash_scan(sim: Any, state: Path, *, delete_first: bool) -> None:
    """Scan with a guest access that 'dies' at guest delete (after it, or instead of it)."""
    settings = _settings(sim, state)
    with App(settings) as app:
        vm = inventory.find_vms(app.connection, [VM])[0]
        real = GuestFiles(connection=app.connection, vm=vm, user=sim.guest_user,
                          password=config.Secret(sim.guest_password))

        class Dying:
            """The real guest access; the process dies at the delete of the infected file."""

            windows = False

            def walk(self, roots: Any, **kw: Any) -> Any:
                return real.walk(roots, **kw)

            def open_download(self, path: str) -> Any:
                return real.open_download(path)

            def stat(self, path: str) -> Any:
                return real.stat(path)

            def delete_file(self, path: str) -> None:
                if delete_first:
                    real.delete_file(path)
                raise Killed(path)

        with app.engine.session() as session, pytest.raises(Killed):
            scan_vm(vm=vm, guest=Dying(), session=session, store=app.store, audit=app.audit,
                    quarantine=app.quarantine, policy=settings.scan, full=True, actor="test")
        # What the dead process left behind, durably: the detection, written ahead.
        (pending,) = app.store.detections()
        assert (pending.path, pending.action) == (PATH, "pending")
        assert len(app.quarantine.items()) == 1
        actions = [(e.action, e.details.get("path")) for e in app.audit.entries()]
        assert ("detection", PATH) in actions
        assert ("remediation", PATH) not in actions


@pytest.mark.parametrize("delete_first", [True, False], ids=["after-guest-delete",
                                                             "before-guest-delete"])
def test_crash_mid_remediation_is_finished_once_by_the_next_scan(
        sim: Any, tmp_path: Path, delete_first: bool) -> None:
    target = sim.guest_root / VM / PATH.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(EICAR)
    (sim.guest_root / VM / "crash" / "notes.txt").write_bytes(b"harmless\n")
    state = tmp_path / "state"

    _crash_scan(sim, state, delete_first=delete_first)
    assert target.exists() is not delete_first

    # A fresh process on the same state directory scans the VM again.
    with App(_settings(sim, state)) as app:
        vm = inventory.find_vms(app.connection, [VM])[0]
        result = app.scan_one(vm)
        assert not target.exists()
        (det,) = app.store.detections()
        items = app.quarantine.items()
        listed = app.detections()
        with app.quarantine.reader(items[0].id) as reader:
            kept = b"".join(reader)
    if delete_first:
        assert result.status == "clean", result.reason
        assert result.recovered == 1
    else:
        assert result.status == "infected", result.reason
        assert [f.action for f in result.found] == ["quarantined"]
    assert len(items) == 1
    assert kept == EICAR
    assert (det.path, det.action, det.quarantine_id) == (PATH, "quarantined", items[0].id)
    assert det.sha256 == hashlib.sha256(EICAR).hexdigest()
    assert [d["action"] for d in listed] == ["quarantined"]

    with AuditLog.open(state) as log:
        entries = [(e.action, dict(e.details)) for e in log.entries()]
        assert log.verify().ok
    detections = [d for a, d in entries if a == "detection" and d["path"] == PATH]
    remediations = [d for a, d in entries if a == "remediation" and d["path"] == PATH]
    assert len(detections) == 1
    assert len(remediations) == 1
    assert remediations[0]["quarantine_id"] == items[0].id
    expected = "quarantined (recovered after restart)" if delete_first else "quarantined"
    assert remediations[0]["result"] == expected
