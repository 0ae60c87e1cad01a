"""vSphere side of the per-host appliances: read what exists, deploy, pin, harden, heal, remove.

Called by ``vsphere_av.fleet.plan`` (through the ``ApplianceAdapter`` protocol: ``plan`` /
``apply`` / ``reconcile_once``) and by ``fleet.manager`` to find each appliance's management
address; ``fleet.manager.open_manager`` builds it with the image to deploy (a
``models.ApplianceImage``: the checked descriptor and the OVF property values). Calls pyVmomi
through ``Connection.call`` (faults become ``vsphere_av.errors``) and ``requests`` for the NFC
upload of the OVF's disks. Returns the plain dataclasses of ``models`` and moref strings,
never live vim objects; imports nothing of the fleet or the engine.

Deploy, in the order vCenter wants it:
  * OVF: ``OvfManager.CreateImportSpec`` (entity name, target host, network mapping, the
    ``guestinfo.ipaddress`` property) -> add markers + hardening extraConfig, EFI with secure
    boot -> ``ResourcePool.ImportVApp(spec, folder, host)`` -> wait for the lease -> stream each
    file item with an HTTP PUT to its device URL (``*`` replaced by the host's management
    address, the host certificate pinned as for guest transfers) -> ``HttpNfcLeaseComplete``
    (``HttpNfcLeaseAbort`` on any failure, which also removes the half-made VM).
  * template: ``CloneVM_Task`` onto the host (pool of its cluster), powered off, with the
    same extraConfig.
Pinning is one ``ReconfigureComputeResource_Task`` per change with ``modify=True``: a VM group
``vsphere-av-vms-<host moref>``, a host group ``vsphere-av-hosts-<host moref>``, a mandatory
VM-Host rule ``vsphere-av-pin-<host moref>``, a DRS override (``enabled=False``) and an HA
override (restart priority ``disabled``). Each method re-reads the current state first and
writes only what differs, so applying an action twice is harmless. :attr:`writes` counts
every call that changes vCenter (tests check that a converged reconcile makes none),
:attr:`observes` every read of the appliances (scans reuse the routes read once per
reconcile: see ``fleet.routing``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import requests
from pyVmomi import vim

from vsphere_av import errors
from vsphere_av.config import ApplianceSettings
from vsphere_av.models import (
    HOST_KEY,
    POWERED_OFF,
    POWERED_ON,
    ROLE_KEY,
    ROLE_VALUE,
    STANDBY_KEY,
    ApplianceAddress,
    ApplianceImage,
    ApplianceVm,
    FleetHost,
    HostPin,
    Observed,
    TransferChunks,
)
from vsphere_av.vsphere.connection import Connection
from vsphere_av.vsphere.guest import _http_session, _Sized, transfer_url
from vsphere_av.vsphere.inventory import _host_from, _props, _retrieve
from vsphere_av.vsphere.tasks import wait_task

VM_GROUP = "vsphere-av-vms-"
HOST_GROUP = "vsphere-av-hosts-"
RULE = "vsphere-av-pin-"
TASK_TIMEOUT = 600.0
LEASE_TIMEOUT = 120.0
SHUTDOWN_TIMEOUT = 120.0
MAX_OVF_BYTES = 1024 * 1024
UPLOAD_CHUNK = 1024 * 1024

VM_PATHS = ["name", "config.extraConfig", "config.template", "runtime.host",
            "runtime.powerState", "guest.ipAddress", "guest.toolsRunningStatus"]
HOST_PATHS = ["name", "parent", "runtime.connectionState", "runtime.inMaintenanceMode"]
CLUSTER_PATHS = ["name", "configurationEx"]


def _option_dict(options: Iterable[Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for opt in options or []:
        out[str(opt.key)] = "" if opt.value is None else str(opt.value)
    return out


def _moid(ref: Any) -> str:
    return str(ref._moId) if ref is not None else ""


class VsphereApplianceAdapter:
    """Implements ``appliances.ApplianceAdapter`` against vCenter (or the bundled simulator)."""

    def __init__(self, *, connection: Connection, settings: ApplianceSettings,
                 image: ApplianceImage) -> None:
        self._conn = connection
        self._settings = settings
        self._image = image
        self._lock = threading.Lock()
        self.writes = 0
        self.observes = 0   # inventory reads (tests check scans do not read it each time)
        self.uploads: list[tuple[str, int]] = []   # (file name, bytes) put through NFC leases

    def __repr__(self) -> str:
        return f"VsphereApplianceAdapter({self._conn!r}, source={self._settings.source!r})"

    # -- helpers ---------------------------------------------------------------------------
    def _wrote(self) -> None:
        with self._lock:
            self.writes += 1

    def _ref(self, kind: str, moref: str) -> Any:
        return self._conn.ref(kind, moref)

    def _call(self, what: str, fn: Any) -> Any:
        return self._conn.call(what, fn)

    def _task(self, what: str, start: Any, *, timeout: float = TASK_TIMEOUT) -> Any:
        task = self._call(what, lambda _c: start())
        self._wrote()
        return wait_task(self._conn, task, what, timeout=timeout)

    # -- reading ---------------------------------------------------------------------------
    def observe(self) -> Observed:
        """Hosts, our appliance VMs (by marker) and our pin groups/rules, in one round trip."""
        with self._lock:
            self.observes += 1
        objects = self._call("read appliances", lambda c: _retrieve(c, [
            (vim.HostSystem, HOST_PATHS), (vim.VirtualMachine, VM_PATHS),
            (vim.ClusterComputeResource, CLUSTER_PATHS)]))
        clusters: dict[str, dict[str, Any]] = {}
        hosts_raw: list[tuple[str, dict[str, Any]]] = []
        vms_raw: list[tuple[str, dict[str, Any]]] = []
        for obj in objects:
            props = _props(obj)
            moref = _moid(obj.obj)
            if isinstance(obj.obj, vim.ClusterComputeResource):
                clusters[moref] = props
            elif isinstance(obj.obj, vim.HostSystem):
                hosts_raw.append((moref, props))
            elif isinstance(obj.obj, vim.VirtualMachine):
                vms_raw.append((moref, props))

        hosts = []
        for moref, p in hosts_raw:
            parent = p.get("parent")
            cluster_id = _moid(parent) if isinstance(parent, vim.ClusterComputeResource) else None
            hosts.append(FleetHost(
                id=moref, name=str(p.get("name", moref)), cluster_id=cluster_id,
                cluster_name=str(clusters.get(cluster_id or "", {}).get("name", "")),
                connected=str(p.get("runtime.connectionState") or "connected") == "connected",
                maintenance=bool(p.get("runtime.inMaintenanceMode"))))

        drs_off: set[str] = set()
        ha_off: set[str] = set()
        pins: list[HostPin] = []
        for cluster_id, p in clusters.items():
            cfg = p.get("configurationEx")
            if cfg is None:
                continue
            for o in cfg.drsVmConfig or []:
                if o.enabled is False:
                    drs_off.add(_moid(o.key))
            for o in cfg.dasVmConfig or []:
                if o.dasSettings is not None and o.dasSettings.restartPriority == "disabled":
                    ha_off.add(_moid(o.key))
            pins.extend(_pins_of(cluster_id, cfg))

        appliances = []
        for moref, p in vms_raw:
            if p.get("config.template"):
                continue
            extra = _option_dict(p.get("config.extraConfig"))
            if extra.get(ROLE_KEY) != ROLE_VALUE:
                continue
            appliances.append(ApplianceVm(
                id=moref, name=str(p.get("name", moref)), marker_host=extra.get(HOST_KEY, ""),
                host_id=_moid(p.get("runtime.host")) or None,
                power_state=str(p.get("runtime.powerState") or POWERED_OFF),
                extra_config=extra, drs_disabled=moref in drs_off, ha_disabled=moref in ha_off,
                address=str(p.get("guest.ipAddress") or ""),
                tools_running=p.get("guest.toolsRunningStatus") == "guestToolsRunning"))
        return Observed(hosts=tuple(sorted(hosts, key=lambda h: h.name)),
                        appliances=tuple(sorted(appliances, key=lambda a: a.id)),
                        pins=tuple(pins))

    def addresses(self) -> list[ApplianceAddress]:
        """Each host's appliance and its management address (for SSH and scan dispatch)."""
        observed = self.observe()
        names = {h.id: h.name for h in observed.hosts}
        out = []
        for app in observed.appliances:
            if app.marker_host in names:
                out.append(ApplianceAddress(
                    host_id=app.marker_host, host=names[app.marker_host], vm_id=app.id,
                    vm=app.name, address=app.address, powered_on=app.power_state == POWERED_ON,
                    standby=bool(app.extra_config.get(STANDBY_KEY))))
        return sorted(out, key=lambda a: (a.host, a.vm_id))

    def _host_context(self, host_id: str) -> dict[str, Any]:
        """What deploying onto a host needs: pool, folder, datastore, network, address, cert."""
        host = self._ref("HostSystem", host_id)

        def read(content: Any) -> dict[str, Any]:
            parent = host.parent
            datacenter = parent
            while datacenter is not None and not isinstance(datacenter, vim.Datacenter):
                datacenter = datacenter.parent
            if datacenter is None:
                raise errors.VsphereError(f"host {host_id} is not in a datacenter")
            return {
                "host": host, "name": host.name, "pool": parent.resourcePool,
                "datacenter": datacenter, "folder": datacenter.vmFolder,
                "datastores": [(ds, ds.name, bool(ds.summary.multipleHostAccess))
                               for ds in host.datastore],
                "networks": [(n, n.name) for n in host.network],
                "info": _host_from(host_id, {
                    "name": host.name, "config.network.vnic": host.config.network.vnic,
                    "config.certificate": host.config.certificate}),
            }

        ctx: dict[str, Any] = self._call(f"read host {host_id}", read)
        wanted_ds = self._settings.datastore
        candidates = [d for d in ctx["datastores"] if not wanted_ds or d[1] == wanted_ds]
        if not candidates:
            raise errors.ApplianceError(
                f"host {ctx['name']} has no datastore" + (f" named {wanted_ds!r}" if wanted_ds
                                                          else ""))
        # Host-local storage first: the appliance never needs to leave its host.
        ctx["datastore"] = sorted(candidates, key=lambda d: (d[2], d[1]))[0][0]
        wanted_net = self._settings.network
        nets = [n for n in ctx["networks"] if (n[1] == wanted_net if wanted_net else True)]
        if wanted_net and not nets:
            raise errors.ApplianceError(f"host {ctx['name']} has no network named {wanted_net!r}")
        ctx["network"] = nets[0][0] if nets else None
        if self._settings.folder:
            ctx["folder"] = self._find_folder(ctx["datacenter"], self._settings.folder)
        return ctx

    def _find_named(self, root: Any, kind: Any, name: str, what: str) -> Any:
        """The first ``kind`` object named ``name`` below ``root`` (None: the root folder)."""
        def find(content: Any) -> Any:
            view = content.viewManager.CreateContainerView(root or content.rootFolder, [kind],
                                                           True)
            try:
                return next((obj for obj in view.view if obj.name == name), None)
            finally:
                view.DestroyView()

        return self._call(f"find {what} {name}", find)

    def _find_folder(self, datacenter: Any, name: str) -> Any:
        folder = self._find_named(datacenter.vmFolder, vim.Folder, name, "folder")
        if folder is None:
            raise errors.ApplianceError(f"appliances.folder: no VM folder named {name!r}")
        return folder

    # -- deploy ----------------------------------------------------------------------------
    def deploy(self, *, host_id: str, name: str, extra_config: Mapping[str, str]) -> str:
        """Deploy a powered-off appliance on the host (OVF or template); return its moref."""
        ctx = self._host_context(host_id)
        if self._settings.source == "template":
            return self._clone(ctx, name, extra_config)
        return self._import_ovf(ctx, name, extra_config)

    def _config_extras(self, spec: Any, extra_config: Mapping[str, str]) -> None:
        existing = {o.key: o for o in (spec.extraConfig or [])}
        for key, value in extra_config.items():
            existing[key] = vim.option.OptionValue(key=key, value=value)
        spec.extraConfig = list(existing.values())
        spec.firmware = "efi"
        spec.bootOptions = vim.vm.BootOptions(efiSecureBootEnabled=True)

    def _import_ovf(self, ctx: dict[str, Any], name: str, extra_config: Mapping[str, str]) -> str:
        # An OVA is unpacked and checked against its manifest before anything is imported.
        with self._image.descriptor() as ovf_path:
            return self._import_descriptor(ctx, name, extra_config, ovf_path)

    def _import_descriptor(self, ctx: dict[str, Any], name: str,
                           extra_config: Mapping[str, str], ovf_path: Path) -> str:
        try:
            if ovf_path.stat().st_size > MAX_OVF_BYTES:
                raise errors.ApplianceError(f"OVF descriptor {ovf_path} is larger than 1 MiB")
            descriptor = ovf_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise errors.ApplianceError(f"cannot read OVF descriptor {ovf_path}: "
                                        f"{exc.strerror}") from exc
        mapping = []
        if ctx["network"] is not None:
            mapping = [vim.OvfManager.NetworkMapping(name=_ovf_network_name(descriptor),
                                                     network=ctx["network"])]
        properties = [vim.KeyValue(key=key, value=value) for key, value in self._image.properties(
            extra_config=extra_config, descriptor=descriptor).items()]
        params = vim.OvfManager.CreateImportSpecParams(
            entityName=name, hostSystem=ctx["host"], networkMapping=mapping,
            propertyMapping=properties, diskProvisioning="thin")
        result = self._call(f"create import spec for {name}", lambda c: c.ovfManager
                            .CreateImportSpec(descriptor, ctx["pool"], ctx["datastore"], params))
        if result.error:
            first = result.error[0]
            why = getattr(first, "msg", "") or type(first).__name__
            raise errors.ApplianceError(f"OVF {ovf_path.name} rejected: {why}")
        spec = result.importSpec
        self._config_extras(spec.configSpec, extra_config)
        lease = self._call(f"import {name}", lambda _c: ctx["pool"].ImportVApp(
            spec, ctx["folder"], ctx["host"]))
        self._wrote()
        try:
            info = self._wait_lease(lease, name)
            vm_id = _moid(info.entity)
            self._upload_files(lease, info, result.fileItem or [], ovf_path.parent, ctx)
            self._call(f"complete import of {name}", lambda _c: lease.HttpNfcLeaseComplete())
        except BaseException:
            # The lease may be gone already; the next reconcile cleans up what is left.
            with contextlib.suppress(errors.VsphereAvError):
                self._call(f"abort import of {name}", lambda _c: lease.HttpNfcLeaseAbort())
            raise
        return vm_id

    def _wait_lease(self, lease: Any, name: str) -> Any:
        deadline = time.monotonic() + LEASE_TIMEOUT
        while True:
            state = self._call(f"import {name}", lambda _c: lease.state)
            if state == "ready":
                return self._call(f"import {name}", lambda _c: lease.info)
            if state == "error":
                fault = self._call(f"import {name}", lambda _c: lease.error)
                raise errors.ApplianceError(f"import of {name} failed: "
                                            f"{getattr(fault, 'msg', '') or 'lease error'}")
            if state == "done" or time.monotonic() > deadline:
                raise errors.ApplianceError(f"import of {name}: lease not ready ({state})")
            time.sleep(0.1)

    def _upload_files(self, lease: Any, info: Any, items: list[Any], base: Path,
                      ctx: dict[str, Any]) -> None:
        urls = {u.importKey: u for u in info.deviceUrl or []}
        total = sum(max(int(i.size or 0), 0) for i in items) or 1
        done = 0
        host_info = ctx["info"]
        for item in items:
            device = urls.get(item.deviceId)
            if device is None:
                raise errors.ApplianceError(f"import lease has no URL for {item.deviceId}")
            source = (base / item.path).resolve()
            if base.resolve() not in source.parents:
                raise errors.ApplianceError(f"OVF file reference {item.path!r} leaves its folder")
            url = transfer_url(str(device.url), host_info.address)
            session, verify = _http_session(host_info, self._conn.trust)
            try:
                with source.open("rb") as body:
                    size = source.stat().st_size
                    response = session.put(
                        url, data=_Sized(body, size), verify=verify, timeout=TASK_TIMEOUT,
                        headers={"Content-Type": "application/x-vnd.vmware-streamVmdk",
                                 "Overwrite": "t"})
            except OSError as exc:
                raise errors.ApplianceError(f"cannot read {source}: {exc}") from exc
            except requests.exceptions.RequestException as exc:
                raise errors.TransientError(f"upload of {item.path} to "
                                            f"{host_info.name} failed: {exc}") from exc
            finally:
                session.close()
            if response.status_code not in (200, 201, 204):
                raise errors.ApplianceError(f"upload of {item.path} to {host_info.name}: "
                                            f"HTTP {response.status_code}")
            done += size
            with self._lock:
                self.uploads.append((item.path, size))
            percent = min(99, int(done * 100 / total))
            self._call("import progress", lambda _c, p=percent: lease.HttpNfcLeaseProgress(p))

    def _clone(self, ctx: dict[str, Any], name: str, extra_config: Mapping[str, str]) -> str:
        template = self._find_vm(self._settings.template)
        config = vim.vm.ConfigSpec()
        self._config_extras(config, extra_config)
        spec = vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(host=ctx["host"], pool=ctx["pool"],
                                         datastore=ctx["datastore"]),
            powerOn=False, template=False, config=config)
        result = self._task(f"clone {self._settings.template} to {name}",
                            lambda: template.CloneVM_Task(folder=ctx["folder"], name=name,
                                                          spec=spec))
        return _moid(result)

    def _find_vm(self, name: str) -> Any:
        vm = self._find_named(None, vim.VirtualMachine, name, "template")
        if vm is None:
            raise errors.ApplianceError(f"appliances.template: no VM or template named {name!r}")
        return vm

    # -- fixing ----------------------------------------------------------------------------
    def reconfigure(self, *, vm_id: str, extra_config: Mapping[str, str]) -> None:
        """Set the given extraConfig keys (only those that differ)."""
        vm = self._ref("VirtualMachine", vm_id)
        current = _option_dict(self._call(f"read {vm_id}", lambda _c: vm.config.extraConfig))
        changes = [vim.option.OptionValue(key=k, value=v) for k, v in sorted(extra_config.items())
                   if current.get(k) != v]
        if changes:
            self._task(f"reconfigure {vm_id}",
                       lambda: vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(extraConfig=changes)))

    def relocate(self, *, vm_id: str, host_id: str) -> None:
        """Move the VM onto ``host_id`` (within its cluster's root pool)."""
        vm = self._ref("VirtualMachine", vm_id)
        host = self._ref("HostSystem", host_id)
        if _moid(self._call(f"read {vm_id}", lambda _c: vm.runtime.host)) == host_id:
            return
        pool = self._call(f"read {host_id}", lambda _c: host.parent.resourcePool)
        self._task(f"relocate {vm_id} to {host_id}",
                   lambda: vm.RelocateVM_Task(spec=vim.vm.RelocateSpec(host=host, pool=pool)))

    def pin(self, *, cluster_id: str, host_id: str, vm_id: str) -> None:
        """Ensure the VM group, host group, mandatory rule, DRS and HA overrides."""
        cluster = self._ref("ClusterComputeResource", cluster_id)
        vm = self._ref("VirtualMachine", vm_id)
        host = self._ref("HostSystem", host_id)
        cfg = self._call(f"read cluster {cluster_id}", lambda _c: cluster.configurationEx)
        groups = {g.name: g for g in cfg.group or []}
        rules = {r.name: r for r in cfg.rule or []}
        vm_group, host_group, rule_name = (VM_GROUP + host_id, HOST_GROUP + host_id,
                                           RULE + host_id)
        spec = vim.cluster.ConfigSpecEx()
        group_specs = []
        existing = groups.get(vm_group)
        if existing is None or {_moid(v) for v in existing.vm or []} != {vm_id}:
            group_specs.append(vim.cluster.GroupSpec(
                operation="edit" if existing is not None else "add",
                info=vim.cluster.VmGroup(name=vm_group, vm=[vm])))
        existing = groups.get(host_group)
        if existing is None or {_moid(h) for h in existing.host or []} != {host_id}:
            group_specs.append(vim.cluster.GroupSpec(
                operation="edit" if existing is not None else "add",
                info=vim.cluster.HostGroup(name=host_group, host=[host])))
        rule = rules.get(rule_name)
        if rule is None or not _rule_ok(rule, host_id):
            info = vim.cluster.VmHostRuleInfo(
                name=rule_name, enabled=True, mandatory=True, vmGroupName=vm_group,
                affineHostGroupName=host_group, userCreated=True)
            if rule is not None:
                info.key = rule.key
            spec.rulesSpec = [vim.cluster.RuleSpec(operation="edit" if rule is not None else "add",
                                                   info=info)]
        drs = {_moid(o.key): o for o in cfg.drsVmConfig or []}.get(vm_id)
        if drs is None or drs.enabled is not False:
            spec.drsVmConfigSpec = [vim.cluster.DrsVmConfigSpec(
                operation="edit" if drs is not None else "add",
                info=vim.cluster.DrsVmConfigInfo(key=vm, enabled=False))]
        das = {_moid(o.key): o for o in cfg.dasVmConfig or []}.get(vm_id)
        if das is None or das.dasSettings is None or \
                das.dasSettings.restartPriority != "disabled":
            spec.dasVmConfigSpec = [vim.cluster.DasVmConfigSpec(
                operation="edit" if das is not None else "add",
                info=vim.cluster.DasVmConfigInfo(
                    key=vm, dasSettings=vim.cluster.DasVmSettings(restartPriority="disabled")))]
        if group_specs:
            spec.groupSpec = group_specs
        if group_specs or spec.rulesSpec or spec.drsVmConfigSpec or spec.dasVmConfigSpec:
            self._task(f"pin {vm_id} to {host_id}",
                       lambda: cluster.ReconfigureComputeResource_Task(spec=spec, modify=True))

    def unpin(self, *, cluster_id: str, host_id: str) -> None:
        """Remove the host's rule and groups (and the overrides of VMs in its VM group)."""
        cluster = self._ref("ClusterComputeResource", cluster_id)
        cfg = self._call(f"read cluster {cluster_id}", lambda _c: cluster.configurationEx)
        groups = {g.name: g for g in cfg.group or []}
        rules = {r.name: r for r in cfg.rule or []}
        spec = vim.cluster.ConfigSpecEx()
        rule = rules.get(RULE + host_id)
        if rule is not None:
            spec.rulesSpec = [vim.cluster.RuleSpec(operation="remove", removeKey=rule.key)]
        group_specs = [vim.cluster.GroupSpec(operation="remove", removeKey=name)
                       for name in (VM_GROUP + host_id, HOST_GROUP + host_id) if name in groups]
        members = {_moid(v) for v in getattr(groups.get(VM_GROUP + host_id), "vm", None) or []}
        drs = [o for o in cfg.drsVmConfig or [] if _moid(o.key) in members]
        das = [o for o in cfg.dasVmConfig or [] if _moid(o.key) in members]
        if group_specs:
            spec.groupSpec = group_specs
        if drs:
            spec.drsVmConfigSpec = [vim.cluster.DrsVmConfigSpec(operation="remove",
                                                                removeKey=o.key) for o in drs]
        if das:
            spec.dasVmConfigSpec = [vim.cluster.DasVmConfigSpec(operation="remove",
                                                                removeKey=o.key) for o in das]
        if spec.rulesSpec or group_specs or drs or das:
            self._task(f"unpin {host_id}",
                       lambda: cluster.ReconfigureComputeResource_Task(spec=spec, modify=True))

    def _power_state(self, vm: Any, vm_id: str) -> str:
        return str(self._call(f"read {vm_id}", lambda _c: vm.runtime.powerState))

    def power_on(self, *, vm_id: str) -> None:
        """Power on (no-op when running)."""
        vm = self._ref("VirtualMachine", vm_id)
        if self._power_state(vm, vm_id) != POWERED_ON:
            self._task(f"power on {vm_id}", lambda: vm.PowerOnVM_Task())

    def shutdown(self, *, vm_id: str) -> None:
        """Shut the guest down cleanly through Tools; power off when Tools do not answer."""
        vm = self._ref("VirtualMachine", vm_id)
        if self._power_state(vm, vm_id) == POWERED_OFF:
            return
        tools = self._call(f"read {vm_id}", lambda _c: vm.guest.toolsRunningStatus)
        if tools == "guestToolsRunning":
            try:
                self._call(f"shut down {vm_id}", lambda _c: vm.ShutdownGuest())
                self._wrote()
                deadline = time.monotonic() + SHUTDOWN_TIMEOUT
                while time.monotonic() < deadline:
                    if self._power_state(vm, vm_id) == POWERED_OFF:
                        return
                    time.sleep(0.1)
            except errors.VsphereError:
                pass   # Tools gave up: fall back to a hard power off below
        if self._power_state(vm, vm_id) != POWERED_OFF:
            self._task(f"power off {vm_id}", lambda: vm.PowerOffVM_Task())

    def destroy(self, *, vm_id: str) -> None:
        """Power off and delete the VM; a VM that is already gone is fine."""
        vm = self._ref("VirtualMachine", vm_id)
        try:
            if self._power_state(vm, vm_id) != POWERED_OFF:
                self._task(f"power off {vm_id}", lambda: vm.PowerOffVM_Task())
            self._task(f"destroy {vm_id}", lambda: vm.Destroy_Task())
        except errors.NotFound:
            return


def _pins_of(cluster_id: str, cfg: Any) -> list[HostPin]:
    groups = {g.name: g for g in cfg.group or []}
    rules = {r.name: r for r in cfg.rule or []}
    host_ids = {name[len(prefix):] for prefix in (VM_GROUP, HOST_GROUP, RULE)
                for name in (*groups, *rules) if name.startswith(prefix)}
    pins = []
    for host_id in sorted(host_ids):
        vm_group = groups.get(VM_GROUP + host_id)
        host_group = groups.get(HOST_GROUP + host_id)
        rule = rules.get(RULE + host_id)
        pins.append(HostPin(
            cluster_id=cluster_id, host_id=host_id,
            vm_group=frozenset(_moid(v) for v in vm_group.vm or [])
            if isinstance(vm_group, vim.cluster.VmGroup) else None,
            host_group=frozenset(_moid(h) for h in host_group.host or [])
            if isinstance(host_group, vim.cluster.HostGroup) else None,
            rule_ok=rule is not None and _rule_ok(rule, host_id), rule_exists=rule is not None))
    return pins


def _rule_ok(rule: Any, host_id: str) -> bool:
    return (isinstance(rule, vim.cluster.VmHostRuleInfo) and bool(rule.mandatory)
            and bool(rule.enabled) and rule.vmGroupName == VM_GROUP + host_id
            and rule.affineHostGroupName == HOST_GROUP + host_id
            and not rule.antiAffineHostGroupName)


def _ovf_network_name(descriptor: str) -> str:
    """The first network name the OVF declares (mapped to the host's network)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(descriptor)   # our own descriptor, size-bounded
    except ET.ParseError as exc:
        raise errors.ApplianceError(f"OVF descriptor is not XML: {exc}") from exc
    for element in root.iter():
        if element.tag.endswith("}Network"):
            for key, value in element.attrib.items():
                if key.endswith("}name"):
                    return value
    return "VM Network"


# ----------------------------------------------------------------------------- scan dispatch


class DeferredDownload:
    """A started guest transfer whose bytes the appliance pulls (see ``ApplianceGuestFiles``)."""

    def __init__(self, *, path: str, size: int, chunks: TransferChunks) -> None:
        self.path = path
        self.size = size
        self._chunks = chunks
        self._opened: Any = None

    def chunks(self) -> TransferChunks:
        """The transfer (iterating it streams through the controller instead)."""
        return self._chunks

    def open_fallback(self, opener: Any) -> Iterable[bytes]:
        """Open a normal download (a fresh ticket: transfer URLs are single-use)."""
        self._opened = opener(self.path)
        return self._opened.chunks()

    def close(self) -> None:
        """Close the fallback download if one was opened."""
        if self._opened is not None:
            self._opened.close()


class ApplianceGuestFiles:
    """``GuestFiles`` for scans dispatched to an appliance: downloads are handed over as URLs.

    ``open_download`` only initiates the transfer (``InitiateFileTransferFromGuest``) and
    returns the single-use URL with ``*`` replaced by the VM's host address and the host
    certificate's SHA-256 to pin; the appliance's engine service fetches it from its own
    host. Every other operation (walk, delete, upload, ...) is the wrapped object's.
    """

    def __init__(self, guest: Any, *, connection: Connection) -> None:
        self._guest = guest
        self._conn = connection
        host = guest.vm.host
        self.thumbprint = (host.certificate_sha256 if host is not None else "") or \
            connection.trust.thumbprint

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guest, name)

    def open_download(self, path: str) -> Any:
        """Initiate the transfer; the appliance pulls it (or the controller, as a fallback)."""
        if not self.thumbprint:   # nothing to pin the ESXi certificate with: stream it here
            return self._guest.open_download(path)
        info = self._guest._call(f"download {path}", "InitiateFileTransferFromGuest",
                                 guestFilePath=path)
        host = self._guest.vm.host
        url = transfer_url(str(info.url), host.address if host is not None else "")
        holder: dict[str, DeferredDownload] = {}

        def fallback() -> Iterable[bytes]:
            return holder["download"].open_fallback(self._guest.open_download)

        download = DeferredDownload(path=path, size=int(info.size), chunks=TransferChunks(
            url=url, thumbprint=self.thumbprint, size=int(info.size), fallback=fallback))
        holder["download"] = download
        return download
