"""How a VM is read (``app.scan_route``) and which scan snapshots are leftovers
(``app.snapshot_in_use``): pure rules, table-tested."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from vsphere_av import errors
from vsphere_av.app import SNAPSHOT_PREFIX, scan_route, scan_snapshot_name, snapshot_in_use


@pytest.mark.parametrize(("via", "powered_on", "credentials", "tools", "route"), [
    ("auto", True, True, True, "guest"),
    ("auto", False, True, True, "disk"),       # dormant: the point of the disk path
    ("auto", True, False, True, "disk"),       # no guest password configured
    ("auto", True, True, False, "disk"),       # tools not running
    ("auto", False, False, False, "disk"),
    ("guest", False, True, True, "guest"),     # forced: the scan job reports it skipped
    ("guest", True, False, False, "guest"),
    ("disk", True, True, True, "disk"),
])
def test_scan_route(via: str, powered_on: bool, credentials: bool, tools: bool,
                    route: str) -> None:
    assert scan_route(via, powered_on=powered_on, credentials=credentials,
                      tools_running=tools) == route


def test_an_unknown_route_is_one_config_line() -> None:
    with pytest.raises(errors.ConfigError, match="must be one of auto, disk, guest"):
        scan_route("floppy", powered_on=True, credentials=True, tools_running=True)


def test_scan_snapshot_names_carry_machine_and_pid_and_differ() -> None:
    first, second = scan_snapshot_name(), scan_snapshot_name()
    assert first.startswith(f"{SNAPSHOT_PREFIX}{socket.gethostname()}-{os.getpid()}-")
    assert first != second


def test_which_scan_snapshots_are_in_use() -> None:
    here = socket.gethostname()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        assert snapshot_in_use(f"{SNAPSHOT_PREFIX}{here}-{alive.pid}-0a0b0c0d")
    finally:
        alive.kill()
        alive.wait()
    # The process is gone now: its snapshot is a leftover.
    assert not snapshot_in_use(f"{SNAPSHOT_PREFIX}{here}-{alive.pid}-0a0b0c0d")
    # Our own pid at start: a dead run whose pid came back.
    assert not snapshot_in_use(scan_snapshot_name())
    # Another machine, or a name not ours to parse: removable.
    assert snapshot_in_use(f"{SNAPSHOT_PREFIX}{here}-{os.getppid()}-0a0b0c0d")
    assert not snapshot_in_use(f"{SNAPSHOT_PREFIX}elsewhere-{os.getppid()}-0a0b0c0d")
    assert not snapshot_in_use(f"{SNAPSHOT_PREFIX}garbage")
