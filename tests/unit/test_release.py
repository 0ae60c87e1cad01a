"""Release rule and NIC restore plan (issue 11, points 5 and 6): pure functions, tables."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from vsphere_av.controller import nics_to_restore, release_allowed
from vsphere_av.store.jobs import JobStore


def _nic(connected: bool, start: bool) -> dict[str, object]:
    return {"key": 4000, "label": "Network adapter 1", "mac": "00:50:56:00:00:01",
            "connected": connected, "start_connected": start, "allow_guest_control": True}


@pytest.mark.parametrize(("connected", "start", "running", "want"), [
    (False, True, True, True),      # isolated while powering on: connects as ESXi would
    (True, True, True, True),
    (True, False, True, True),      # connected by hand after boot: stays connected
    (False, False, True, False),
    (True, True, False, False),     # powered off now: ESXi reports it disconnected
    (False, True, False, False),
])
def test_nics_to_restore(connected: bool, start: bool, running: bool, want: bool) -> None:
    (nic,) = nics_to_restore([_nic(connected, start)], running=running)
    assert nic == {**_nic(connected, start), "connected": want}


@pytest.mark.parametrize(("held", "rule", "operator", "full", "want"), [
    ("", "operator", False, False, True),             # stale only: any clean scan
    ("detection", "operator", False, False, False),
    ("detection", "operator", False, True, False),    # not even a full automatic one
    ("detection", "operator", True, False, True),     # the operator's rescan
    ("detection", "clean_rescan", False, False, False),
    ("detection", "clean_rescan", False, True, True),
    ("detection", "clean_rescan", True, False, True),
])
def test_release_allowed(held: str, rule: str, operator: bool, full: bool, want: bool) -> None:
    assert release_allowed(held=held, rule=rule, operator=operator, full=full) is want


def test_hold_survives_reopen_and_an_older_store_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE isolation (vm TEXT PRIMARY KEY, vm_name TEXT NOT NULL,"
               " nics TEXT NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL,"
               " since REAL NOT NULL)")
    db.execute("INSERT INTO isolation VALUES ('vm-1', 'web01', '[]', 'stale', 'isolated', 1.0)")
    db.commit()
    db.close()
    with JobStore.open(tmp_path) as jobs:
        rec = jobs.isolation("vm-1")
        assert rec is not None
        assert rec.held == ""
        jobs.hold_isolation("vm-1", held="detection (job 7)")
    with JobStore.open(tmp_path) as jobs:
        rec = jobs.isolation("vm-1")
        assert rec is not None
        assert rec.held == "detection (job 7)"
