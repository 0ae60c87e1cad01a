"""``/metrics`` (issue 14): every family read from real stores in a state directory.

The state, job and audit stores are real SQLite files; what the controller and scans would
have written is written through the stores' own methods; the text is parsed back with
prometheus_client's own parser.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from vsphere_av import config
from vsphere_av.api.metrics import StateCollector, render
from vsphere_av.fleet.health import HEALTH_FILE
from vsphere_av.models import HostId, HostInfo, VmId, VmInfo
from vsphere_av.store.audit import SIEM_CURSOR_FILE, AuditLog, AuditOnUse
from vsphere_av.store.jobs import JobStore
from vsphere_av.store.state import StateStore


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_family_comes_from_the_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = config.parse({"siem": {"target": "tcp://127.0.0.1:6514"}},
                            env={"VSPHERE_AV_STATE_DIR": str(state)})
    from vsphere_av.engine import Engine
    Engine.open(settings, audit=AuditOnUse(settings.state_dir),   # the built-in version 1
                actor="tester").close()
    with JobStore.open(state) as jobs:
        for vm, started, isolated in (("vm-1", 100.0, 100.012), ("vm-2", 200.0, 203.0)):
            jobs.open_exposure(vm=vm, vm_name=vm, trigger="poweron", started=started,
                               seen=started)
            jobs.mark_exposure(vm, isolated=isolated, outcome="isolated", close=True)
        jobs.open_exposure(vm="vm-3", vm_name="vm-3", trigger="poweron", started=300.0,
                           seen=300.0)                 # still open: no window yet
        jobs.publish_hosts({"host-1": ("esx-a", 3, 1), "host-2": ("esx-b", 0, 0)})
        jobs.beat(os.getpid())
    with AuditLog.open(state) as log:
        for i in range(5):
            log.append(actor="tester", action="test.entry", details={"i": i})
        head = log.head()
    (state / SIEM_CURSOR_FILE).write_text(json.dumps({"seq": head[0] - 2, "hash": "x"}))
    health = state / HEALTH_FILE
    health.parent.mkdir(parents=True, exist_ok=True)
    health.write_text(json.dumps({"hosts": {"host-2": "appliance down"}}))

    body, media = render(settings=settings)
    assert media.startswith("text/plain")
    got = samples(body.decode())
    bucket = "vsphere_av_exposure_window_seconds_bucket"
    assert got[(bucket, (("le", "0.05"),))] == 1      # 12 ms: isolated at power-on
    assert got[(bucket, (("le", "2.5"),))] == 1
    assert got[(bucket, (("le", "5.0"),))] == 2       # 3 s
    assert got[(bucket, (("le", "+Inf"),))] == 2
    assert round(got[("vsphere_av_exposure_window_seconds_sum", ())], 3) == 3.012
    assert got[("vsphere_av_controller_up", ())] == 1
    assert got[("vsphere_av_queue_depth", (("host", "esx-a"),))] == 3
    assert got[("vsphere_av_active_scans", (("host", "esx-a"),))] == 1
    assert got[("vsphere_av_queue_depth", (("host", "esx-b"),))] == 0
    assert got[("vsphere_av_audit_head", ())] == head[0]
    assert got[("vsphere_av_audit_forward_lag_entries", ())] == 2
    assert got[("vsphere_av_signature_version", ())] == 1
    assert got[("vsphere_av_scans_started_total", ())] == 0
    assert got[("vsphere_av_appliance_down", (("host", "host-2"),))] == 1
    assert ("vsphere_av_appliance_down", (("host", "host-1"),)) not in got


def test_signature_age_follows_the_clock(tmp_path: Path) -> None:
    settings = config.parse({}, env={"VSPHERE_AV_STATE_DIR": str(tmp_path / "state")})
    from vsphere_av.engine import Engine
    from vsphere_av.engine.signatures import SignatureStore

    Engine.open(settings, audit=AuditOnUse(settings.state_dir), actor="tester").close()
    from datetime import datetime
    imported = datetime.fromisoformat(
        SignatureStore(state_dir=settings.state_dir).info(1).imported_at).timestamp()
    collector = StateCollector(settings=settings, clock=lambda: imported + 3600)
    ages = [m for m in collector.collect() if m.name == "vsphere_av_signature_age_seconds"]
    assert ages[0].samples[0].value == 3600


def _vm(moref: str) -> VmInfo:
    host = HostInfo(moref=HostId("host-1"), name="esx1", address="10.0.0.1")
    return VmInfo(moref=VmId(moref), name=moref, instance_uuid="uuid-" + moref,
                  power_state="poweredOff", tools_running=False, guest_id="otherGuest", host=host)


def test_bytes_and_files_read_are_labelled_by_the_path_each_scan_took(tmp_path: Path) -> None:
    settings = config.parse({}, env={"VSPHERE_AV_STATE_DIR": str(tmp_path / "state")})
    with StateStore.open(settings.state_dir) as store:
        for moref, via, scanned, nbytes in (("vm-1", "guest", 3, 300), ("vm-2", "disk", 5, 5000),
                                            ("vm-1", "disk", 2, 20), ("vm-3", "guest", 4, 40)):
            scan = store.begin_scan(_vm(moref), full=False, signature_version=1, via=via)
            store.finish_scan(scan, status="clean", reason="clean",
                              counts={"scanned": scanned, "bytes": nbytes})
        store.begin_scan(_vm("vm-2"), full=False, signature_version=1, via="disk")  # running

    got = samples(render(settings=settings)[0].decode())
    assert got[("vsphere_av_read_bytes_total", (("path", "guest"),))] == 340
    assert got[("vsphere_av_read_files_total", (("path", "guest"),))] == 7
    assert got[("vsphere_av_read_bytes_total", (("path", "disk"),))] == 5020
    assert got[("vsphere_av_read_files_total", (("path", "disk"),))] == 7
    assert got[("vsphere_av_scans_started_total", ())] == 5
    assert not [key for key in got if ("path", "all") in key[1]]


def test_an_old_state_file_reads_as_guest_and_disk_starts_at_zero(tmp_path: Path) -> None:
    """Scans recorded before ``via`` existed all read through Guest Operations."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = sqlite3.connect(state / "state.sqlite")
    db.executescript(
        "CREATE TABLE scans (id INTEGER PRIMARY KEY AUTOINCREMENT, vm_moref TEXT NOT NULL,"
        " vm_name TEXT NOT NULL, host TEXT NOT NULL DEFAULT '', started TEXT NOT NULL,"
        " finished TEXT NOT NULL DEFAULT '', full INTEGER NOT NULL DEFAULT 0,"
        " status TEXT NOT NULL DEFAULT 'running', reason TEXT NOT NULL DEFAULT '',"
        " signature_version INTEGER, scanned INTEGER NOT NULL DEFAULT 0,"
        " unchanged INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0,"
        " errors INTEGER NOT NULL DEFAULT 0, detections INTEGER NOT NULL DEFAULT 0,"
        " bytes INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO scans (vm_moref, vm_name, started, finished, status, scanned, bytes)"
        " VALUES ('vm-1', 'web01', '2026-01-01T00:00:00+00:00', '2026-01-01T00:01:00+00:00',"
        " 'clean', 9, 900);")
    db.close()
    settings = config.parse({}, env={"VSPHERE_AV_STATE_DIR": str(state)})

    got = samples(render(settings=settings)[0].decode())
    assert got[("vsphere_av_read_bytes_total", (("path", "guest"),))] == 900
    assert got[("vsphere_av_read_files_total", (("path", "guest"),))] == 9
    assert got[("vsphere_av_read_bytes_total", (("path", "disk"),))] == 0
    assert got[("vsphere_av_read_files_total", (("path", "disk"),))] == 0
