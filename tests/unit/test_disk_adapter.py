"""Pure parts of the disk adapter: datastore paths, /folder URLs, Content-Range, snapshot faults."""

from __future__ import annotations

import pytest
from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.models import DatastoreId, DatastoreInfo, HostId, HostInfo
from vsphere_av.vsphere import disks, guest
from vsphere_av.vsphere.connection import TlsTrust

DS = DatastoreInfo(moref=DatastoreId("datastore-1"), name="LocalDS_0", datacenter_path="EU/DC1")


@pytest.mark.parametrize(("name", "expected"), [
    ("[LocalDS_0] vm/vm.vmdk", ("LocalDS_0", "vm/vm.vmdk")),
    ("[ds with space] My VM/My VM-000001.vmdk", ("ds with space", "My VM/My VM-000001.vmdk")),
    ("[ds]vm.vmdk", ("ds", "vm.vmdk")),
    ("[ds] ", ("ds", "")),
])
def test_split_datastore_path(name: str, expected: tuple[str, str]) -> None:
    assert disks.split_datastore_path(name) == expected


@pytest.mark.parametrize("name", ["vm/vm.vmdk", "ds] x", ""])
def test_split_datastore_path_refuses_other_strings(name: str) -> None:
    with pytest.raises(ValueError, match="not a datastore path"):
        disks.split_datastore_path(name)


@pytest.mark.parametrize(("address", "port", "path", "expected"), [
    ("10.0.0.5", 443, "vm/vm-flat.vmdk",
     "https://10.0.0.5/folder/vm/vm-flat.vmdk?dcPath=EU%2FDC1&dsName=LocalDS_0"),
    ("127.0.0.1", 8989, "/My VM/a#b.vmdk",
     "https://127.0.0.1:8989/folder/My%20VM/a%23b.vmdk?dcPath=EU%2FDC1&dsName=LocalDS_0"),
    ("fd00::5", 443, "x.vmdk", "https://[fd00::5]/folder/x.vmdk?dcPath=EU%2FDC1&dsName=LocalDS_0"),
])
def test_folder_url(address: str, port: int, path: str, expected: str) -> None:
    assert disks.folder_url(address, port, DS, path) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("bytes 0-0/1234", (0, 0, 1234)),
    ("bytes 100-199/1000", (100, 199, 1000)),
    ("bytes */0", (None, None, 0)),
    ("bytes 0-9/*", (0, 9, None)),
    ("", (None, None, None)),
    ("items 0-1/2", (None, None, None)),
])
def test_content_range(value: str, expected: tuple[int | None, ...]) -> None:
    assert disks._content_range(value) == expected


@pytest.mark.parametrize(("start", "up", "expected"), [
    ("group-s5", {"group-s5": ("datastore", "datacenter-2", False),
                  "datacenter-2": ("DC0", "group-d1", True),
                  "group-d1": ("Datacenters", "", False)}, "DC0"),
    ("group-s9", {"group-s9": ("datastore", "datacenter-3", False),
                  "datacenter-3": ("DC1", "group-d7", True),
                  "group-d7": ("EU", "group-d1", False),
                  "group-d1": ("Datacenters", "", False)}, "EU/DC1"),
    ("group-s5", {}, ""),                                     # nothing known above it
    ("group-a", {"group-a": ("a", "group-b", False),          # a loop, no datacenter
                 "group-b": ("b", "group-a", False)}, ""),
])
def test_datacenter_path(start: str, up: dict[str, tuple[str, str, bool]],
                         expected: str) -> None:
    assert disks._datacenter_path(start, up) == expected


@pytest.mark.parametrize(("fault", "error", "words"), [
    (vim.fault.SnapshotIncompatibleDeviceInVm(msg="disk 2"), errors.SnapshotError,
     "independent disk"),
    (vim.fault.ApplicationQuiesceFault(msg="VSS"), errors.SnapshotError, "quiesced"),
    (vim.fault.TooManySnapshotLevels(msg="32"), errors.SnapshotError, "TooManySnapshotLevels"),
    (vim.fault.SnapshotDisabled(), errors.SnapshotError, "SnapshotDisabled"),
    (vim.fault.NoDiskSpace(msg="full", datastore="ds1"), errors.SnapshotError, "NoDiskSpace"),
    (vim.fault.InvalidState(), errors.SnapshotError, "InvalidState"),
    (vmodl.fault.NotSupported(), errors.SnapshotError, "NotSupported"),
    (vim.fault.TaskInProgress(msg="reconfigure"), errors.TransientError, "busy"),
    (vmodl.fault.ManagedObjectNotFound(), errors.NotFound, "no longer exists"),
    (vim.fault.NoPermission(privilegeId="VirtualMachine.State.CreateSnapshot"),
     errors.PermissionDenied, "VirtualMachine.State.CreateSnapshot"),
])
def test_snapshot_faults_say_why(fault: Exception, error: type[errors.VsphereAvError],
                                 words: str) -> None:
    got = disks._snapshot_error(fault, "snapshot vm-1 for scanning")
    assert type(got) is error
    assert str(got).startswith("snapshot vm-1 for scanning: ")
    assert words in str(got)
    assert "\n" not in str(got)
    assert "vim.fault." not in str(got)          # fault names as vSphere prints them


def test_keep_alive_sessions_pin_like_transfers_and_bound_their_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    monkeypatch.setattr(guest, "_new_context",
                        lambda ca_file="": ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    host = HostInfo(moref=HostId("host-1"), name="esx1", address="10.0.0.1",
                    certificate_sha256="AA:" * 31 + "AA")
    session, verify = guest._http_session(host, TlsTrust(thumbprint="11:" * 31 + "11"),
                                          keep_alive=True, pool_maxsize=4)
    adapter = session.get_adapter("https://10.0.0.1/folder/x")
    assert verify is False
    assert adapter._fingerprint == "aa" * 32            # the host's own certificate first
    assert session.headers["Connection"] == "keep-alive"
    assert (adapter._pool_maxsize, adapter._pool_block) == (4, True)
    session.close()
