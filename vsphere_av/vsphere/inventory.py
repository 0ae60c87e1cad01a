"""Read VMs and hosts in one PropertyCollector round trip and return them as models.

Called by ``app`` (scan selection, status) and later by the controller; calls
``Connection.call`` and pyVmomi's PropertyCollector. Every ContainerView is destroyed in
``finally``. Returns ``models.VmInfo`` / ``models.HostInfo``, never live vim objects.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

from pyVmomi import vim, vmodl

from vsphere_av import errors
from vsphere_av.models import HostId, HostInfo, VmId, VmInfo
from vsphere_av.vsphere.connection import Connection

MARKER_PREFIX = "vsphere-av."

VM_PATHS = ["name", "config.instanceUuid", "config.guestId", "config.template",
            "config.extraConfig", "runtime.host", "runtime.powerState",
            "guest.toolsRunningStatus", "parent"]
HOST_PATHS = ["name", "config.network.vnic", "config.certificate", "runtime.connectionState",
              "runtime.inMaintenanceMode"]
FOLDER_PATHS = ["name", "parent"]


def _retrieve(content: Any, types: Sequence[tuple[type, list[str]]]) -> list[Any]:
    """All objects of the given types under the root folder, with the given properties."""
    view = content.viewManager.CreateContainerView(content.rootFolder, [t for t, _ in types], True)
    try:
        traverse = vmodl.query.PropertyCollector.TraversalSpec(
            name="view", type=vim.view.ContainerView, path="view", skip=False)
        obj_spec = vmodl.query.PropertyCollector.ObjectSpec(obj=view, skip=True,
                                                            selectSet=[traverse])
        prop_specs = [vmodl.query.PropertyCollector.PropertySpec(type=t, pathSet=paths)
                      for t, paths in types]
        spec = vmodl.query.PropertyCollector.FilterSpec(objectSet=[obj_spec], propSet=prop_specs)
        collector = content.propertyCollector
        out: list[Any] = []
        options = vmodl.query.PropertyCollector.RetrieveOptions()
        result = collector.RetrievePropertiesEx([spec], options)
        while result is not None:
            out.extend(result.objects)
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
        return out
    finally:
        view.DestroyView()


def _props(obj: Any) -> dict[str, Any]:
    return {p.name: p.val for p in (obj.propSet or [])}


def _cert_sha256(pem: Any) -> str:
    """SHA-256 of the host certificate vCenter reports (PEM bytes), colon hex; "" if unknown."""
    if not pem:
        return ""
    raw = bytes(pem) if not isinstance(pem, str) else pem.encode()
    text = raw.decode("ascii", "ignore")
    if "-----BEGIN CERTIFICATE-----" not in text:
        return ""
    body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except ValueError:
        return ""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _host_from(moref: str, p: dict[str, Any]) -> HostInfo:
    address = ""
    for vnic in p.get("config.network.vnic") or []:
        ip = getattr(getattr(getattr(vnic, "spec", None), "ip", None), "ipAddress", "") or ""
        if ip:
            address = ip
            break
    return HostInfo(
        moref=HostId(moref), name=str(p.get("name", moref)),
        address=address or str(p.get("name", "")),
        certificate_sha256=_cert_sha256(p.get("config.certificate")),
        connection_state=str(p.get("runtime.connectionState") or "connected"),
        in_maintenance=bool(p.get("runtime.inMaintenanceMode")),
    )


def _folder_path(parent: str, folders: dict[str, tuple[str, str]]) -> str:
    names: list[str] = []
    seen: set[str] = set()
    while parent and parent in folders and parent not in seen:
        seen.add(parent)
        name, parent = folders[parent]
        names.append(name)
    return "/" + "/".join(reversed(names)) if names else ""


def _vm_from(moref: str, p: dict[str, Any], hosts: dict[str, HostInfo],
             folders: dict[str, tuple[str, str]]) -> VmInfo:
    host_ref = p.get("runtime.host")
    host = hosts.get(host_ref._moId) if host_ref is not None else None
    markers = tuple(sorted(
        (str(opt.key), str(opt.value)) for opt in (p.get("config.extraConfig") or [])
        if str(opt.key).startswith(MARKER_PREFIX)
    ))
    parent = p.get("parent")
    return VmInfo(
        moref=VmId(moref), name=str(p.get("name", moref)),
        instance_uuid=str(p.get("config.instanceUuid") or ""),
        power_state=str(p.get("runtime.powerState") or "poweredOff"),
        tools_running=p.get("guest.toolsRunningStatus") == "guestToolsRunning",
        guest_id=str(p.get("config.guestId") or ""),
        host=host,
        folder_path=_folder_path(parent._moId if parent is not None else "", folders),
        template=bool(p.get("config.template")),
        markers=markers,
    )


def read_inventory(conn: Connection) -> tuple[list[VmInfo], list[HostInfo]]:
    """All VMs (templates excluded) and hosts, in one collector round trip."""
    def fetch(content: Any) -> list[Any]:
        return _retrieve(content, [(vim.VirtualMachine, VM_PATHS), (vim.HostSystem, HOST_PATHS),
                                   (vim.Folder, FOLDER_PATHS), (vim.Datacenter, FOLDER_PATHS)])

    objects = conn.call("read inventory", fetch)
    hosts: dict[str, HostInfo] = {}
    folders: dict[str, tuple[str, str]] = {}
    vms_raw: list[tuple[str, dict[str, Any]]] = []
    for obj in objects:
        moref = obj.obj._moId
        p = _props(obj)
        if isinstance(obj.obj, vim.HostSystem):
            hosts[moref] = _host_from(moref, p)
        elif isinstance(obj.obj, vim.VirtualMachine):
            vms_raw.append((moref, p))
        else:
            parent = p.get("parent")
            folders[moref] = (str(p.get("name", "")), parent._moId if parent is not None else "")
    vms = [_vm_from(m, p, hosts, folders) for m, p in vms_raw]
    vms = [vm for vm in vms if not vm.template]
    vms.sort(key=lambda v: v.name)
    return vms, sorted(hosts.values(), key=lambda h: h.name)


def read_host(conn: Connection, host_id: HostId) -> HostInfo:
    """Fresh data for one host (address, certificate); NotFound when it is gone."""
    pc = vmodl.query.PropertyCollector
    ref = conn.ref("HostSystem", host_id)
    spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=ref, skip=False)],
                         propSet=[pc.PropertySpec(type=vim.HostSystem, pathSet=HOST_PATHS)])

    def fetch(content: Any) -> Any:
        return content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())

    result = conn.call(f"read host {host_id}", fetch)
    for obj in result.objects if result is not None else []:
        if obj.missingSet and not obj.propSet:
            break
        return _host_from(host_id, _props(obj))
    raise errors.NotFound(f"host {host_id} no longer exists")


def list_vms(conn: Connection) -> list[VmInfo]:
    """All VMs (no templates), sorted by name."""
    return read_inventory(conn)[0]


def list_hosts(conn: Connection) -> list[HostInfo]:
    """All ESXi hosts, sorted by name."""
    return read_inventory(conn)[1]


def find_vms(conn: Connection, names: Iterable[str]) -> list[VmInfo]:
    """The VMs with these names (or morefs), in the order asked; NotFound names the missing."""
    vms = list_vms(conn)
    by_name = {vm.name: vm for vm in vms}
    by_moref = {str(vm.moref): vm for vm in vms}
    out: list[VmInfo] = []
    missing: list[str] = []
    for name in names:
        vm = by_name.get(name) or by_moref.get(name)
        if vm is None:
            missing.append(name)
        elif vm not in out:
            out.append(vm)
    if missing:
        raise errors.NotFound(f"no VM named {', '.join(repr(m) for m in missing)} in vCenter")
    return out


def get_vm(conn: Connection, vm_id: VmId) -> VmInfo:
    """Fresh data for one VM by moref; NotFound when it is gone."""
    for vm in list_vms(conn):
        if vm.moref == vm_id:
            return vm
    raise errors.NotFound(f"VM {vm_id} no longer exists")


def host_clusters(conn: Connection) -> dict[str, str]:
    """Host name -> the name of its cluster ("" for a standalone host), one round trip.

    For the console's fleet overview (``api.server``), which counts VMs per cluster and host.
    """
    def fetch(content: Any) -> list[Any]:
        return _retrieve(content, [(vim.HostSystem, ["name", "parent"]),
                                   (vim.ClusterComputeResource, ["name"])])

    parents: dict[str, str] = {}
    clusters: dict[str, str] = {}
    for obj in conn.call("read clusters", fetch):
        p = _props(obj)
        if isinstance(obj.obj, vim.HostSystem):
            parent = p.get("parent")
            parents[str(p.get("name", obj.obj._moId))] = parent._moId if parent else ""
        else:
            clusters[obj.obj._moId] = str(p.get("name", ""))
    return {host: clusters.get(parent, "") for host, parent in parents.items()}
