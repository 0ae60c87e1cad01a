"""The appliance's disk sessions: grants brokered between its readers and the controller,
errors carried across as themselves, sessions that end (``scan.sources.disk_service``).

Pure Python: the broker with real threads, the service's routes called directly with a
reader that only records what it was asked (no host is read here; the simulator tests in
``tests/integration/test_appliance_disk.py`` read real disks).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest

from vsphere_av import errors
from vsphere_av.models import DatastoreInfo, FolderGrant
from vsphere_av.scan.sources.disk_service import (
    DiskService,
    _Broker,
    error_from,
    error_json,
)

DS = DatastoreInfo(moref="datastore-1", name="LocalDS_0", datacenter_path="DC0")  # type: ignore[arg-type]
GRANT = FolderGrant(url="https://10.0.0.1/folder/vm/disk.vmdk?dcPath=DC0&dsName=LocalDS_0",
                    ticket="t-1", thumbprint="AB" * 32)


def test_a_reader_waits_for_the_grant_the_controller_sends_with_its_next_poll() -> None:
    broker = _Broker(timeout=10)
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(broker.grant(DS, "vm/disk.vmdk")))
    reader.start()
    needs = broker.exchange([], wait=5)
    assert needs == [{"id": 1, "datastore": {"moref": "datastore-1", "name": "LocalDS_0",
                                             "datacenter_path": "DC0"},
                      "path": "vm/disk.vmdk", "tickets": 1}]
    assert broker.exchange([{"id": 1, "grant": {"url": GRANT.url, "ticket": "t-1",
                                                "thumbprint": GRANT.thumbprint}}],
                           wait=0) == []
    reader.join(5)
    assert got == [GRANT]


def test_a_refused_grant_is_the_controllers_error_and_no_grant_is_an_outage() -> None:
    broker = _Broker(timeout=0.3)
    failures: list[BaseException] = []

    def read() -> None:
        try:
            broker.grant(DS, "vm/disk.vmdk")
        except errors.VsphereAvError as exc:
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    (need,) = broker.exchange([], wait=5)
    denied = errors.PermissionDenied("vm/other.vmdk: not in a folder of vm's disks")
    broker.exchange([{"id": need["id"], "error": error_json(denied)}], wait=0)
    reader.join(5)
    assert [type(e) for e in failures] == [errors.PermissionDenied]
    assert str(failures[0]) == str(denied)

    with pytest.raises(errors.ConnectionLost, match="no service ticket"):
        broker.grant(DS, "vm/disk.vmdk")       # nobody polls: times out


def test_errors_cross_as_their_own_class_and_unknown_kinds_as_the_base() -> None:
    assert type(error_from(error_json(errors.DiskFileError("x")))) is errors.DiskFileError
    assert type(error_from({"kind": "SystemExit", "message": "m"})) is errors.VsphereAvError
    assert type(error_from({"kind": "ConnectionLost"})) is errors.ConnectionLost
    assert str(error_from(None)) == "error on the appliance"


def test_closing_a_session_fails_its_waiting_reads_and_forgets_it() -> None:
    asked: list[Any] = []

    class Reader:
        def __init__(self, *, grant: Any) -> None:
            self.grant = grant
            self.closed = False

        def open(self, *args: Any) -> Any:
            asked.append(args)
            return self.grant(DS, "vm/disk.vmdk")

        def close(self) -> None:
            self.closed = True

    service = DiskService(scanning=contextlib.nullcontext, reader=Reader, grant_timeout=30)
    vm = {"moref": "vm-1", "name": "vm", "guest_id": "otherLinux64Guest",
          "power_state": "poweredOff"}
    disk = {"vm": "vm-1", "key": 2000, "label": "Hard disk 1", "capacity": 1 << 20,
            "disk_mode": "persistent", "backing": "flat",
            "datastore": {"moref": "datastore-1", "name": "LocalDS_0", "datacenter_path": "DC0"},
            "host": "host-1", "chain": [{"files": [{
                "name": "[LocalDS_0] vm/disk.vmdk", "path": "vm/disk.vmdk", "type":
                "diskDescriptor", "size": 100, "datastore": {
                    "moref": "datastore-1", "name": "LocalDS_0", "datacenter_path": "DC0"}}]}]}
    session = service.open({"vm": vm, "disks": [disk]})["session"]
    answers: list[dict[str, Any]] = []
    walker = threading.Thread(target=lambda: answers.append(service.walk(
        {"session": session, "roots": ["/"], "excludes": []})))
    walker.start()
    needs = service.grants({"session": session, "answers": [], "wait": 5})
    assert [n["path"] for n in needs["needs"]] == ["vm/disk.vmdk"]
    assert service.close({"session": session})["closed"] is True
    walker.join(10)
    assert not walker.is_alive()
    # The waiting read failed as an outage (the disk is reported, never read as clean).
    (page,) = answers
    assert (page["done"], page["items"]) == (True, [])
    assert page["raise"] == {"kind": "ConnectionLost", "message": (
        "[LocalDS_0] vm/disk.vmdk: the disk session ended while the read waited for its "
        "service ticket")}
    assert service.grants({"session": session, "wait": 0}) == {"needs": [], "closed": True}
    with pytest.raises(errors.EngineError, match="no such disk session"):
        service.walk({"session": session, "roots": ["/"]})


def test_the_controller_grants_tickets_only_for_the_folders_of_the_vms_disks() -> None:
    from vsphere_av.models import DiskFile, DiskUnit, HostId, HostInfo, VirtualDiskInfo, VmInfo
    from vsphere_av.scan.sources.remote_disk import RemoteDiskGuest

    host = HostInfo(moref=HostId("host-1"), name="esx1", address="10.0.0.1")
    vm = VmInfo(moref="vm-1", name="vm", instance_uuid="", power_state="poweredOff",  # type: ignore[arg-type]
                tools_running=False, guest_id="otherLinux64Guest", host=host)
    descriptor = DiskFile(name="[LocalDS_0] vm/disk.vmdk", datastore=DS, path="vm/disk.vmdk",
                          type="diskDescriptor", size=100)
    disk = VirtualDiskInfo(vm=vm.moref, key=2000, label="Hard disk 1", capacity=1 << 20,
                           disk_mode="persistent", backing="flat", datastore=DS,
                           host=host.moref, chain=(DiskUnit(files=(descriptor,)),))
    granted: list[tuple[str, str, str, int]] = []

    def grant(host_id: str, datastore: DatastoreInfo, path: str, *,
              tickets: int = 1) -> FolderGrant:
        granted.append((host_id, datastore.name, path, tickets))
        return GRANT

    guest = RemoteDiskGuest(vm=vm, disks=[disk], client=None, reader="the host's appliance",
                            grant=grant, excludes=())
    guest._host = host.moref
    where = {"moref": "datastore-1", "name": "LocalDS_0", "datacenter_path": "DC0"}
    ok = guest._answer({"id": 1, "datastore": where, "path": "vm/disk-flat.vmdk",
                        "tickets": 4})
    assert ok == {"id": 1, "grant": {"url": GRANT.url, "ticket": "t-1",
                                     "thumbprint": GRANT.thumbprint, "spare": ()}}
    for path, ds in (("other-vm/disk.vmdk", where), ("vm.vmx", where),
                     ("vm/disk.vmdk", {**where, "name": "SharedDS"})):
        refused = guest._answer({"id": 2, "datastore": ds, "path": path})
        assert refused["error"]["kind"] == "PermissionDenied", path
    assert granted == [("host-1", "LocalDS_0", "vm/disk-flat.vmdk", 4)]


def test_the_disk_routes_need_the_token_and_a_well_formed_request() -> None:
    import requests

    from vsphere_av.engine.remote import EngineClient, EngineService

    token = "disk-routes-token-0123456789"
    service = EngineService(engine=None, token=token, listen=("127.0.0.1", 0))
    service.routes.update(DiskService(scanning=contextlib.nullcontext, reader=lambda **_: None)
                          .routes())
    service.start()
    try:
        anonymous = requests.post(service.url + "/v1/disk/open", json={"vm": {}, "disks": []},
                                  timeout=10)
        assert anonymous.status_code == 401
        client = EngineClient(service.url, token=token)
        with pytest.raises(errors.EngineError, match=r"HTTP 400.*malformed disk session"):
            client.call("/v1/disk/open", {"vm": {"name": "no moref"}, "disks": []})
        with pytest.raises(errors.EngineError, match=r"HTTP 400.*no such disk session"):
            client.call("/v1/disk/walk", {"session": "guessed", "roots": ["/"]})
        client.close()
    finally:
        service.shutdown()



def test_the_engine_service_answers_with_tcp_nodelay() -> None:
    """One call per file in a disk scan: an answer's headers and body are two writes, and
    with Nagle the body waits for the client's delayed ACK (about 40 ms a call; the disk
    bench took 150 s instead of 22-33 s). The stdlib handler sets TCP_NODELAY on every
    accepted socket when asked; the timing itself is the benchmark's business, not a test's."""
    from vsphere_av.engine.remote.server import _Handler

    assert _Handler.disable_nagle_algorithm is True
