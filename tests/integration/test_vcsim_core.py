"""The bundled simulator's core (issue 2, points 2 and 6-9), driven with pyVmomi.

Runs ``build/vcsim`` through the fixtures of ``conftest.py``: start-up contract (URL line,
thumbprint, clean exit, missing binary), inventory sizes, tools status seen through
WaitForUpdatesEx, the tools-disabled extraConfig key, snapshot revert (guest files, power
state, EventEx), clone / relocate / migrate placement, eventTypeId event filters and the
hosts' management address.
"""

from __future__ import annotations

import hashlib
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import connect
from pyVim.task import WaitForTask
from pyVmomi import SoapStubAdapter, vim, vmodl

from vsphere_av import cli, errors
from vsphere_av.lab import simulator

REVERTED = "com.vmware.vc.vm.VmStateRevertedToSnapshot"
Factory = Callable[..., simulator.Simulator]


# --- helpers -------------------------------------------------------------------------------

def objects(si: vim.ServiceInstance, kind: type) -> list[Any]:
    """All managed objects of one kind (container view destroyed after use)."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return list(view.view)
    finally:
        view.DestroyView()


def by_name(si: vim.ServiceInstance, kind: type, name: str) -> Any:
    for obj in objects(si, kind):
        if obj.name == name:
            return obj
    raise AssertionError(f"no {kind.__name__} named {name}")


def run(task: vim.Task) -> Any:
    WaitForTask(task)
    return task.info.result


def host_vm_names(si: vim.ServiceInstance) -> dict[str, set[str]]:
    return {h.name: {v.name for v in h.vm} for h in objects(si, vim.HostSystem)}


def other_host(si: vim.ServiceInstance, vm: vim.VirtualMachine, *,
               skip: tuple[str, ...] = ()) -> Any:
    for h in objects(si, vim.HostSystem):
        if h != vm.runtime.host and h.name not in skip:
            return h
    raise AssertionError("no other host")


class Watch:
    """One property of one object, watched with WaitForUpdatesEx (filter destroyed at close)."""

    def __init__(self, si: vim.ServiceInstance, obj: Any, path: str) -> None:
        self.pc = si.content.propertyCollector.CreatePropertyCollector()
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj, skip=False)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=[path])],
        )
        self.filter = self.pc.CreateFilter(spec, partialUpdates=False)
        self.version = ""
        self.path = path

    def next_values(self, timeout: int = 10) -> list[Any]:
        """Values of the property in the next update batch (empty on timeout)."""
        opts = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=timeout)
        update = self.pc.WaitForUpdatesEx(self.version, opts)
        if update is None:
            return []
        self.version = update.version
        return [c.val for fs in update.filterSet for o in fs.objectSet for c in o.changeSet
                if c.name == self.path]

    def wait_for(self, value: Any, timeout: float = 10.0) -> list[Any]:
        """Read updates until the property takes value; returns everything seen."""
        seen: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += self.next_values(timeout=max(1, int(deadline - time.monotonic())))
            if seen and seen[-1] == value:
                return seen
        raise AssertionError(f"{self.path} never became {value!r}; saw {seen!r}")

    def close(self) -> None:
        self.pc.Destroy()


def extra_config(key: str, value: str) -> vim.vm.ConfigSpec:
    return vim.vm.ConfigSpec(extraConfig=[vim.option.OptionValue(key=key, value=value)])


def tools_of(vm: vim.VirtualMachine) -> tuple[str, str]:
    return vm.guest.toolsRunningStatus, str(vm.guest.toolsStatus)


def reverted_events(si: vim.ServiceInstance, vm: vim.VirtualMachine) -> list[Any]:
    spec = vim.event.EventFilterSpec(
        eventTypeId=[REVERTED],
        entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"),
    )
    return list(si.content.eventManager.QueryEvents(spec))


# --- start-up contract ----------------------------------------------------------------------

def test_url_line_and_thumbprint_match_the_served_certificate(vcsim: simulator.Simulator) -> None:
    assert re.fullmatch(r"https://user:pass@127\.0\.0\.1:\d+/sdk", vcsim.url)
    assert vcsim.port > 0
    pem = ssl.get_server_certificate((vcsim.host, vcsim.port))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    assert vcsim.thumbprint == ":".join(digest[i:i + 2] for i in range(0, 64, 2))
    assert "pass" not in repr(vcsim)


def test_certificate_is_rsa_2048_for_127_0_0_1(vcsim: simulator.Simulator) -> None:
    out = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(vcsim.cert_file)],
                         capture_output=True, text=True, check=True).stdout
    assert "Public-Key: (2048 bit)" in out
    assert "IP Address:127.0.0.1" in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_gives_a_clean_exit_zero(vcsim_factory: Factory, sig: int) -> None:
    sim = vcsim_factory(vms=0, hosts=1)
    sim.process.send_signal(sig)
    assert sim.process.wait(timeout=15) == 0


def test_identity_restart_is_the_same_vcenter(vcsim_factory: Factory, tmp_path: Path) -> None:
    identity = tmp_path / "identity.pem"
    first = vcsim_factory(hosts=1, vms=2, identity=identity)
    assert identity.stat().st_mode & 0o777 == 0o600
    def inventory(sim: simulator.Simulator) -> list[tuple[str, str]]:
        si = connect(sim)
        return sorted((o.name, o._moId) for kind in (vim.VirtualMachine, vim.HostSystem)
                      for o in objects(si, kind))

    before = inventory(first)
    first.process.send_signal(signal.SIGKILL)          # an outage, not a shutdown
    first.process.wait(timeout=10)
    again = vcsim_factory(listen=f"{first.host}:{first.port}", guest_root=first.guest_root,
                          hosts=1, vms=2, identity=identity)
    assert (again.port, again.thumbprint) == (first.port, first.thumbprint)
    assert inventory(again) == before
    other = vcsim_factory(hosts=1, vms=0)              # without -identity: a fresh certificate
    assert other.thumbprint != first.thumbprint


def test_wrong_password_is_refused(vcsim: simulator.Simulator) -> None:
    stub = SoapStubAdapter(host=vcsim.host, port=vcsim.port, sslContext=vcsim.ssl_context())
    try:
        content = vim.ServiceInstance("ServiceInstance", stub).RetrieveContent()
        with pytest.raises(vim.fault.InvalidLogin):
            content.sessionManager.Login(vcsim.username, "wrong")
    finally:
        stub.DropConnections()


def test_missing_binary_says_run_make_vcsim(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv(simulator.BINARY_ENV, str(tmp_path / "absent"))
    with pytest.raises(errors.SimulatorMissing, match=r"not found at .*absent: run `make vcsim`"):
        simulator.binary_path()
    result = CliRunner().invoke(cli.main, ["vcsim"])
    assert result.exit_code == cli.EXIT_ERROR
    assert "run `make vcsim`" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hosts": -1}, "--hosts must be between"),
    ({"datacenters": 0}, "--datacenters must be at least 1"),
    ({"listen": "nonsense"}, "want HOST:PORT"),
    ({"ticket_delay": -0.5}, "ticket delay must be 0 to 60 seconds"),
])
def test_bad_options_are_one_line_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message):
        simulator.command_line(**kwargs)


def test_a_ticket_delay_out_of_range_is_refused_by_the_simulator_in_one_line() -> None:
    argv = [str(simulator.binary_path()), "-ticket-delay=-5ms"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "-ticket-delay must be between 0 and 1m" in done.stderr
    assert done.stdout == ""


def test_the_ticket_delay_holds_back_service_tickets_and_nothing_else(
        vcsim_factory: Factory) -> None:
    # A delay long enough that no load on the test machine makes a plain call take as long.
    sim = vcsim_factory(hosts=1, vms=1, ticket_delay=1.0)
    si = connect(sim)
    spec = vim.SessionManager.HttpServiceRequestSpec(
        method="httpGet", url=f"https://{sim.host}:{sim.port}/folder/x?dsName=LocalDS_0")
    started = time.monotonic()
    tickets = [si.content.sessionManager.AcquireGenericServiceTicket(spec=spec).id
               for _ in range(2)]
    assert time.monotonic() - started >= 2 * 1.0
    assert len(set(tickets)) == 2
    started = time.monotonic()
    si.CurrentTime()
    assert time.monotonic() - started < 1.0


def test_inventory_sizes_follow_the_flags(vcsim_factory: Factory) -> None:
    sim = vcsim_factory(datacenters=2, clusters=2, hosts=2, vms=3)
    si = connect(sim)
    assert len(objects(si, vim.Datacenter)) == 2
    clusters = objects(si, vim.ClusterComputeResource)
    assert len(clusters) == 4
    assert len(objects(si, vim.HostSystem)) == 8
    assert len(objects(si, vim.VirtualMachine)) == 12
    for cluster in clusters:
        assert len(cluster.host) == 2
        assert len(cluster.resourcePool.vm) == 3
        assert sum(len(h.vm) for h in cluster.host) == 3


def test_default_inventory(vcsim: simulator.Simulator) -> None:
    si = connect(vcsim)
    names = sorted(v.name for v in objects(si, vim.VirtualMachine))
    assert names == ["DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"]
    # An unset property reads as None (the library alone drops the connection).
    assert all(v.snapshot is None for v in objects(si, vim.VirtualMachine))
    assert len(objects(si, vim.HostSystem)) == 3


def test_hosts_report_the_listen_address_as_management_address(vcsim: simulator.Simulator) -> None:
    si = connect(vcsim)
    for host in objects(si, vim.HostSystem):
        nic = host.config.network.vnic[0]
        assert nic.device == "vmk0"
        assert nic.portgroup == "Management Network"
        assert nic.spec.ip.ipAddress == "127.0.0.1"
        assert host.summary.managementServerIp == "127.0.0.1"


# --- tools ----------------------------------------------------------------------------------

def test_tools_follow_power_state_through_wait_for_updates(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=2))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    assert vm.runtime.powerState == "poweredOn"
    assert tools_of(vm) == ("guestToolsRunning", "toolsOk")
    assert vm.guest.guestOperationsReady is True
    watch = Watch(si, vm, "guest.toolsRunningStatus")
    try:
        assert watch.next_values() == ["guestToolsRunning"]  # the initial state
        run(vm.PowerOffVM_Task())
        assert watch.wait_for("guestToolsNotRunning")
        assert tools_of(vm) == ("guestToolsNotRunning", "toolsNotRunning")
        assert vm.guest.guestOperationsReady is False
        run(vm.PowerOnVM_Task())
        assert watch.wait_for("guestToolsRunning")
        assert tools_of(vm) == ("guestToolsRunning", "toolsOk")
    finally:
        watch.close()

    # VMs created later follow the same rule.
    folder = vm.parent
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(), powerOn=False)
    clone = run(vm.CloneVM_Task(folder=folder, name="later", spec=spec))
    assert clone.runtime.powerState == "poweredOff"
    assert tools_of(clone) == ("guestToolsNotRunning", "toolsNotRunning")
    run(clone.PowerOnVM_Task())
    assert tools_of(clone) == ("guestToolsRunning", "toolsOk")


def test_tools_disabled_key_keeps_tools_not_running(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=1, vms=1))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    watch = Watch(si, vm, "guest.toolsRunningStatus")
    try:
        watch.next_values()
        key = simulator.TOOLS_DISABLED_KEY
        run(vm.ReconfigVM_Task(extra_config(key, "TRUE")))
        assert watch.wait_for("guestToolsNotRunning")
        assert vm.runtime.powerState == "poweredOn"
        run(vm.PowerOffVM_Task())
        run(vm.PowerOnVM_Task())
        assert tools_of(vm) == ("guestToolsNotRunning", "toolsNotRunning")
        assert vm.guest.guestOperationsReady is False
        run(vm.ReconfigVM_Task(extra_config(key, "FALSE")))
        assert watch.wait_for("guestToolsRunning")
    finally:
        watch.close()


# --- snapshots ------------------------------------------------------------------------------

def test_revert_restores_guest_files_power_state_and_posts_event(vcsim_factory: Factory) -> None:
    sim = vcsim_factory(hosts=1, vms=1)
    si = connect(sim)
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    root = sim.guest_root / vm.name
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "kept.conf").write_text("original\n")
    (root / "etc" / "deleted-later").write_text("bring me back\n")

    snap = run(vm.CreateSnapshot_Task(name="clean", description="", memory=True, quiesce=False))
    assert vm.snapshot.currentSnapshot == snap

    (root / "etc" / "added-later").write_text("malware\n")
    (root / "etc" / "deleted-later").unlink()
    (root / "etc" / "kept.conf").write_text("changed\n")
    run(vm.PowerOffVM_Task())
    events_before = len(reverted_events(si, vm))

    task = snap.RevertToSnapshot_Task()
    WaitForTask(task)
    assert task.info.descriptionId == "vm.Snapshot.revert"
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["deleted-later", "kept.conf"]
    assert (root / "etc" / "kept.conf").read_text() == "original\n"
    assert (root / "etc" / "deleted-later").read_text() == "bring me back\n"
    assert vm.runtime.powerState == "poweredOn"  # the snapshot's power state
    assert tools_of(vm) == ("guestToolsRunning", "toolsOk")
    assert vm.snapshot.currentSnapshot == snap

    events = reverted_events(si, vm)
    assert len(events) == events_before + 1
    event = events[0]
    assert isinstance(event, vim.event.EventEx)
    assert event.eventTypeId == REVERTED
    assert event.vm.vm == vm
    assert event.host.host == vm.runtime.host
    assert event.datacenter is not None
    assert event.objectId == vm._moId
    assert event.userName == sim.username

    # Removing the snapshot: a task about the VM, and the recorded tree goes with it.
    task = snap.RemoveSnapshot_Task(removeChildren=False)
    WaitForTask(task)
    assert task.info.entity == vm
    assert vm.snapshot is None
    assert not (sim.guest_root / ".snapshots" / snap._moId).exists()


def test_revert_to_current_snapshot_and_suppress_power_on(vcsim_factory: Factory) -> None:
    sim = vcsim_factory(hosts=1, vms=1)
    si = connect(sim)
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    root = sim.guest_root / vm.name
    root.mkdir(parents=True, exist_ok=True)
    (root / "one").write_text("1")
    first = run(vm.CreateSnapshot_Task(name="one", memory=False, quiesce=False))
    (root / "two").write_text("2")
    run(vm.PowerOffVM_Task())
    second = run(vm.CreateSnapshot_Task(name="two-off", memory=False, quiesce=False))

    # Back to the first (powered on) snapshot, but with suppressPowerOn.
    run(first.RevertToSnapshot_Task(suppressPowerOn=True))
    assert sorted(p.name for p in root.iterdir()) == ["one"]
    assert vm.runtime.powerState == "poweredOff"
    assert vm.snapshot.currentSnapshot == first

    # The current snapshot is now the first one: reverting to it powers the VM on.
    (root / "junk").write_text("x")
    task = vm.RevertToCurrentSnapshot_Task()
    WaitForTask(task)
    assert task.info.descriptionId == "VirtualMachine.revertToCurrentSnapshot"
    assert sorted(p.name for p in root.iterdir()) == ["one"]
    assert vm.runtime.powerState == "poweredOn"

    # The second snapshot was taken powered off: reverting powers the VM off.
    run(second.RevertToSnapshot_Task())
    assert sorted(p.name for p in root.iterdir()) == ["one", "two"]
    assert vm.runtime.powerState == "poweredOff"
    assert tools_of(vm) == ("guestToolsNotRunning", "toolsNotRunning")
    assert len(reverted_events(si, vm)) == 3

    run(vm.RemoveAllSnapshots_Task())
    assert not any((sim.guest_root / ".snapshots").iterdir())


# --- placement ------------------------------------------------------------------------------

def test_clone_lands_on_the_requested_host_powered_on_with_guest_tree(
        vcsim_factory: Factory) -> None:
    sim = vcsim_factory(hosts=3, vms=1)
    si = connect(sim)
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    (sim.guest_root / vm.name / "data").mkdir(parents=True, exist_ok=True)
    (sim.guest_root / vm.name / "data" / "file.txt").write_text("payload")
    target = other_host(si, vm)

    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(host=target), powerOn=True)
    clone = run(vm.CloneVM_Task(folder=vm.parent, name="clone-on-host", spec=spec))
    assert clone.runtime.host == target
    assert clone.summary.runtime.host == target
    assert clone.runtime.powerState == "poweredOn"
    assert tools_of(clone) == ("guestToolsRunning", "toolsOk")
    lists = host_vm_names(si)
    assert "clone-on-host" in lists[target.name]
    assert sum("clone-on-host" in names for names in lists.values()) == 1
    assert (sim.guest_root / "clone-on-host" / "data" / "file.txt").read_text() == "payload"

    # Only a pool: the clone goes to a host of that pool's cluster, powered off as asked.
    pool = vm.resourcePool
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool), powerOn=False)
    clone2 = run(vm.CloneVM_Task(folder=vm.parent, name="clone-in-pool", spec=spec))
    cluster = pool.owner
    assert clone2.runtime.host in list(cluster.host)
    assert clone2.runtime.powerState == "poweredOff"
    assert clone2 in list(clone2.runtime.host.vm)


def test_relocate_and_migrate_keep_host_lists_right(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=3, vms=1))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    first = vm.runtime.host
    second = other_host(si, vm)

    run(vm.RelocateVM_Task(vim.vm.RelocateSpec(host=second)))
    assert vm.runtime.host == second
    lists = host_vm_names(si)
    assert vm.name in lists[second.name]
    assert vm.name not in lists[first.name]

    third = other_host(si, vm, skip=(first.name,))
    task = vm.MigrateVM_Task(host=third, priority="defaultPriority")
    WaitForTask(task)
    assert task.info.descriptionId == "VirtualMachine.migrate"
    assert vm.runtime.host == third
    lists = host_vm_names(si)
    assert [name for name, vms in lists.items() if vm.name in vms] == [third.name]


# --- events ---------------------------------------------------------------------------------

def test_event_type_id_filters_return_matching_event_ex(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=1, vms=2))
    em = si.content.eventManager
    vm0 = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    vm1 = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM1")

    def collector(ids: list[str], entity: Any = None) -> Any:
        spec = vim.event.EventFilterSpec(eventTypeId=ids)
        if entity is not None:
            spec.entity = vim.event.EventFilterSpec.ByEntity(entity=entity, recursion="self")
        return em.CreateCollectorForEvents(spec)

    waiting = collector([REVERTED])  # created before the events: sees them as they come
    cluster = by_name(si, vim.ClusterComputeResource, "DC0_C0")
    below_cluster = em.CreateCollectorForEvents(vim.event.EventFilterSpec(
        eventTypeId=[REVERTED],
        entity=vim.event.EventFilterSpec.ByEntity(entity=cluster, recursion="children")))
    waiting_vm1 = collector([REVERTED], vm1)
    snap = run(vm0.CreateSnapshot_Task(name="s", memory=False, quiesce=False))
    run(snap.RevertToSnapshot_Task())
    em.PostEvent(vim.event.EventEx(eventTypeId="com.example.custom", severity="info",
                                    createdTime=datetime.now(UTC), chainId=0, key=0, userName="",
                                    vm=vim.event.VmEventArgument(vm=vm1, name=vm1.name)))

    later = collector([REVERTED])  # created after: finds them in the history
    for c in (waiting, later):
        page = c.latestPage
        assert [e.eventTypeId for e in page] == [REVERTED]
        assert page[0].vm.vm == vm0
    assert waiting_vm1.latestPage == []
    assert [e.vm.vm for e in below_cluster.latestPage] == [vm0]  # the VM is below the cluster

    custom = collector(["com.example.custom"]).latestPage
    assert [(e.eventTypeId, e.vm.vm) for e in custom] == [("com.example.custom", vm1)]
    both = [REVERTED, "com.example.custom"]
    queried = em.QueryEvents(vim.event.EventFilterSpec(eventTypeId=both))
    assert sorted(e.eventTypeId for e in queried) == sorted([REVERTED, "com.example.custom"])

    # Class filters still work, and do not let EventEx through.
    powered = collector(["VmPoweredOffEvent", "VmPoweredOnEvent"]).latestPage
    assert powered
    power_events = vim.event.VmPoweredOffEvent | vim.event.VmPoweredOnEvent
    assert all(isinstance(e, power_events) for e in powered)
    keys = [e.key for e in powered]
    assert keys == sorted(keys, reverse=True)  # newest first
    run(vm1.PowerOffVM_Task())
    tail = collector(["VmPoweredOffEvent"], vm1)
    assert [e.vm.vm for e in tail.latestPage] == [vm1]
    for c in (waiting, waiting_vm1, later, tail, below_cluster):
        c.DestroyCollector()


def test_cli_runs_the_simulator_in_the_foreground(tmp_path: Path) -> None:
    simulator.binary_path()  # fails the test with the one-line hint if not built
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsphere_av", "vcsim", "--vms", "1", "--hosts", "1",
         "--username", "admin", "--password", "s3cret", "--guest-root", str(tmp_path / "g")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert re.fullmatch(r"https://admin:s3cret@127\.0\.0\.1:\d+/sdk", first)
        assert proc.stdout.readline().startswith("thumbprint=")
        assert (tmp_path / "g").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_another_loopback_listen_address_is_reported_by_hosts(vcsim_factory: Factory) -> None:
    sim = vcsim_factory(listen="127.0.0.2:0", hosts=2, vms=0)
    assert sim.url.startswith(f"https://user:pass@127.0.0.2:{sim.port}/")
    si = connect(sim)
    for host in objects(si, vim.HostSystem):
        assert host.config.network.vnic[0].spec.ip.ipAddress == "127.0.0.2"


def test_relocate_to_a_pool_keeps_the_vm_in_that_cluster(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(clusters=2, hosts=2, vms=1))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    target_cluster = by_name(si, vim.ClusterComputeResource, "DC0_C1")
    run(vm.RelocateVM_Task(vim.vm.RelocateSpec(pool=target_cluster.resourcePool)))
    assert vm.resourcePool == target_cluster.resourcePool
    assert vm.runtime.host in list(target_cluster.host)
    assert vm in list(target_cluster.resourcePool.vm)
    source_pool = by_name(si, vim.ClusterComputeResource, "DC0_C0").resourcePool
    assert vm not in list(source_pool.vm)
    lists = host_vm_names(si)
    assert [name for name, vms in lists.items() if vm.name in vms] == [vm.runtime.host.name]


def test_unusable_listen_address_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(errors.VsphereAvError, match=r"did not start \(exit status 2\)"):
        simulator.start(listen="192.0.2.1:0", guest_root=tmp_path, timeout=20)


def test_import_lease_urls_carry_the_simulator_port(vcsim_factory: Factory) -> None:
    sim = vcsim_factory(hosts=1, vms=1)
    si = connect(sim)
    pool = by_name(si, vim.ClusterComputeResource, "DC0_C0").resourcePool
    controller = vim.vm.device.ParaVirtualSCSIController(
        key=1000, busNumber=0, sharedBus="noSharing")
    disk = vim.vm.device.VirtualDisk(
        key=2000, controllerKey=1000, unitNumber=0, capacityInKB=1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName="", diskMode="persistent"),
    )
    add = vim.vm.device.VirtualDeviceSpec.Operation.add
    config = vim.vm.ConfigSpec(
        name="imported", guestId="otherGuest", files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"),
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(operation=add, device=controller),
            vim.vm.device.VirtualDeviceSpec(operation=add, device=disk, fileOperation="create"),
        ],
    )
    lease = pool.ImportVApp(vim.VirtualMachineImportSpec(configSpec=config))
    try:
        urls = [d.url for d in lease.info.deviceUrl]
        assert urls
        for url in urls:
            assert url.startswith(f"https://*:{sim.port}/nfc/")
    finally:
        lease.HttpNfcLeaseComplete()


def test_host_added_to_a_cluster_mounts_its_datastores(vcsim_factory: Factory) -> None:
    sim = vcsim_factory(hosts=2, vms=1)
    si = connect(sim)
    cluster = by_name(si, vim.ClusterComputeResource, "DC0_C0")
    spec = vim.host.ConnectSpec(hostName="esx-new", userName="root", password="x", force=True)
    new = run(cluster.AddHost_Task(spec, True))
    assert {d.name for d in new.datastore} == {d.name for d in cluster.datastore} == {"LocalDS_0"}
    assert new in [m.key for m in new.datastore[0].host]
    assert new.config.network.vnic[0].spec.ip.ipAddress == "127.0.0.1"
    dvs = objects(si, vim.DistributedVirtualSwitch)[0]
    assert new in list(dvs.summary.hostMember)
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    clone_spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(host=new), powerOn=True)
    clone = run(vm.CloneVM_Task(folder=vm.parent, name="on-new-host", spec=clone_spec))
    assert clone.runtime.host == new
    assert [v.name for v in new.vm] == ["on-new-host"]


def test_guestinfo_ipaddress_is_reported_while_tools_run(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=1, vms=1))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    assert vm.guest.ipAddress is None
    run(vm.ReconfigVM_Task(extra_config("guestinfo.ipaddress", "127.0.0.77")))
    assert vm.guest.ipAddress == "127.0.0.77"
    assert vm.summary.guest.ipAddress == "127.0.0.77"
    run(vm.PowerOffVM_Task())
    assert not vm.guest.ipAddress
    run(vm.PowerOnVM_Task())
    assert vm.guest.ipAddress == "127.0.0.77"


def test_event_collector_scrolls_like_vcenter(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=1, vms=1))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    for _ in range(3):
        run(vm.PowerOffVM_Task())
        run(vm.PowerOnVM_Task())
    spec = vim.event.EventFilterSpec(
        eventTypeId=["VmPoweredOnEvent", "VmPoweredOffEvent"],
        entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"))
    collector = si.content.eventManager.CreateCollectorForEvents(spec)
    try:
        # A new collector's view starts before the oldest event: reads go oldest to newest.
        first = [e.key for e in collector.ReadNextEvents(3)]
        rest = [e.key for e in collector.ReadNextEvents(100)]
        assert len(first) == 3
        assert len(first + rest) == 7  # the initial power-on and three off/on cycles
        assert first + rest == sorted(first + rest)
        assert collector.ReadNextEvents(10) == []
        back = [e.key for e in collector.ReadPreviousEvents(2)]
        assert back == sorted(first + rest, reverse=True)[:2]
        collector.RewindCollector()
        assert [e.key for e in collector.ReadNextEvents(100)] == first + rest

        collector.SetCollectorPageSize(2)
        latest = [e.key for e in collector.latestPage]
        assert latest == sorted(first + rest, reverse=True)[:2]
        collector.ResetCollector()
        older = [e.key for e in collector.ReadPreviousEvents(100)]
        assert older == sorted(first + rest, reverse=True)[2:]
        collector.ResetCollector()
        assert [e.key for e in collector.ReadNextEvents(100)] == sorted(latest)
        run(vm.PowerOffVM_Task())
        newest = collector.ReadNextEvents(100)
        assert [type(e).__name__ for e in newest] == ["vim.event.VmPoweredOffEvent"]
    finally:
        collector.DestroyCollector()


def test_eventex_reaches_a_collector_with_a_time_filter(vcsim_factory: Any) -> None:
    """An EventEx posted by the simulator itself matches eventTypeId + a begin time filter."""
    sim = vcsim_factory()
    si = connect(sim)
    content = si.RetrieveContent()
    vm = content.searchIndex.FindByInventoryPath("DC0/vm/DC0_C0_RP0_VM0")
    begin = si.CurrentTime() - timedelta(seconds=5)
    spec = vim.event.EventFilterSpec(
        eventTypeId=["com.vmware.vc.vm.VmStateRevertedToSnapshot"],
        time=vim.event.EventFilterSpec.ByTime(beginTime=begin))
    collector = content.eventManager.CreateCollectorForEvents(spec)
    try:
        WaitForTask(vm.CreateSnapshot_Task(name="s1", memory=False, quiesce=False))
        WaitForTask(vm.RevertToCurrentSnapshot_Task())
        latest = collector.latestPage       # the live page, kept by the library as events come
        assert [e.eventTypeId for e in latest] == ["com.vmware.vc.vm.VmStateRevertedToSnapshot"]
        events = collector.ReadNextEvents(50)
        assert [e.eventTypeId for e in events] == ["com.vmware.vc.vm.VmStateRevertedToSnapshot"]
        assert events[0].vm.vm._moId == vm._moId
    finally:
        collector.DestroyCollector()


# --- power-on as ESXi orders it (issue 11, point 6) ------------------------------------------

def _nic_flags(vm: vim.VirtualMachine) -> list[tuple[bool, bool]]:
    return [(bool(d.connectable.connected), bool(d.connectable.startConnected))
            for d in vm.config.hardware.device
            if isinstance(d, vim.vm.device.VirtualEthernetCard)]


def _set_nics(vm: vim.VirtualMachine, *, connected: bool, start_connected: bool) -> None:
    changes = []
    for d in vm.config.hardware.device:
        if isinstance(d, vim.vm.device.VirtualEthernetCard):
            d.connectable.connected = connected
            d.connectable.startConnected = start_connected
            changes.append(vim.vm.device.VirtualDeviceSpec(
                operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=d))
    run(vm.ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=changes)))


def test_nics_are_connected_only_while_running(vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=1, vms=2))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    other = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM1")
    run(vm.PowerOffVM_Task())
    run(other.PowerOffVM_Task())
    assert _nic_flags(vm)
    assert all(not c for c, _ in _nic_flags(vm))        # off: disconnected
    _set_nics(vm, connected=True, start_connected=True)
    assert _nic_flags(vm) == [(False, True)] * len(_nic_flags(vm))
    _set_nics(other, connected=False, start_connected=False)
    run(vm.PowerOnVM_Task())
    run(other.PowerOnVM_Task())
    assert all(c and s for c, s in _nic_flags(vm))        # startConnected: connects
    assert all(not c for c, _ in _nic_flags(other))       # not startConnected: stays down
    # While running, connected is the client's: disconnect it and it stays so.
    _set_nics(vm, connected=False, start_connected=True)
    assert _nic_flags(vm) == [(False, True)] * len(_nic_flags(vm))
    run(vm.PowerOffVM_Task())
    assert _nic_flags(vm) == [(False, True)] * len(_nic_flags(vm))
    run(vm.PowerOnVM_Task())
    assert all(c for c, _ in _nic_flags(vm))


def test_starting_event_comes_before_the_power_state_and_powered_on_after(
        vcsim_factory: Factory) -> None:
    si = connect(vcsim_factory(hosts=1, vms=1))
    vm = by_name(si, vim.VirtualMachine, "DC0_C0_RP0_VM0")
    run(vm.PowerOffVM_Task())
    run(vm.PowerOnVM_Task())
    boot = vm.summary.runtime.bootTime
    spec = vim.event.EventFilterSpec(
        eventTypeId=["VmStartingEvent", "VmPoweredOnEvent"],
        entity=vim.event.EventFilterSpec.ByEntity(entity=vm, recursion="self"))
    events = sorted(si.content.eventManager.QueryEvents(spec), key=lambda e: e.key)
    last = [e for e in events if e.createdTime >= boot - timedelta(seconds=5)][-2:]
    # One of each per power-on (the library posted both before changing the state).
    assert [type(e).__name__ for e in last] == ["vim.event.VmStartingEvent",
                                                "vim.event.VmPoweredOnEvent"]
    starting, powered_on = last
    assert starting.createdTime <= boot <= powered_on.createdTime
    assert starting.vm.vm == vm
    assert powered_on.host.host == vm.runtime.host
    # A power-on of a running VM fails in its task and posts nothing.
    with pytest.raises(vim.fault.InvalidPowerState):
        run(vm.PowerOnVM_Task())
    after = sorted(si.content.eventManager.QueryEvents(spec), key=lambda e: e.key)
    assert after[-1].key == powered_on.key
