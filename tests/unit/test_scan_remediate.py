"""Remediation decisions of ``scan.remediate`` on a real state store (no vSphere involved)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vsphere_av.models import HostId, HostInfo, VmId, VmInfo
from vsphere_av.scan import remediation_via
from vsphere_av.store.state import PENDING, StateStore


def _vm(*, running: bool) -> VmInfo:
    host = HostInfo(moref=HostId("host-1"), name="esx1", address="10.0.0.1")
    return VmInfo(moref=VmId("vm-1"), name="web01", instance_uuid="uuid-vm-1",
                  power_state="poweredOn" if running else "poweredOff", tools_running=False,
                  guest_id="otherGuest", host=host)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore.open(tmp_path)
    yield s
    s.close()


@pytest.mark.parametrize(("via", "running", "credentials", "pending", "route"), [
    ("auto", True, True, True, "guest"),     # a disk scan's detections wait for the guest
    ("auto", True, True, False, None),       # nothing waits: scan.via decides
    ("auto", True, False, True, None),       # no guest account: nothing could quarantine
    ("auto", False, True, True, None),       # off: the disks are read again
    ("disk", True, True, True, None),        # an operator's choice stands
    ("guest", True, True, True, None),
])
def test_remediation_via(store: StateStore, via: str, running: bool, credentials: bool,
                         pending: bool, route: str | None) -> None:
    vm = _vm(running=running)
    store.sync_inventory([vm])
    if pending:
        scan = store.begin_scan(vm, full=False, signature_version=1, via="disk")
        store.add_detection(scan_id=scan, vm_moref=vm.moref, vm_name=vm.name, path="/x",
                            threat="EICAR", sha256="0" * 64, size=68, rule="eicar",
                            source="yara", action=PENDING, detail="waiting for the guest")
    assert remediation_via(vm, via=via, credentials=credentials, store=store) == route
