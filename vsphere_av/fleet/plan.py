"""One hardened security appliance per ESXi host: the pure plan and its idempotent application.

Called by ``cli`` (``appliances reconcile``) and by the controller's ``serve`` loop through
:func:`reconcile_once`. Calls only the collaborators it is handed: an :class:`ApplianceAdapter`
(``vsphere_av.vsphere.appliances.VsphereApplianceAdapter`` in production, which does every
vSphere call) and the audit log; its settings are ``config.ApplianceSettings`` (``[appliances]``).
:func:`plan` is a pure function of the desired spec and the observed inventory; :func:`apply`
performs the actions and is idempotent because every adapter method re-reads what it changes
(adding a group that exists edits it, powering on a running VM is a no-op, destroying a VM
that is gone succeeds).

Desired state, for every connected host of the configured clusters (all when none are named):
exactly one VM named ``<name_prefix><host name>`` marked with extraConfig
``vsphere-av.role = appliance`` and ``vsphere-av.host = <host moref>``, carrying the hardening
keys of :data:`HARDENING`, running on that host, pinned there (mandatory VM-Host rule, DRS and
HA overrides disabled) and powered on; powered off cleanly while the host is in maintenance
mode. Appliances of hosts that left the inventory (or the configured clusters) are destroyed
and their rules and groups removed.

How the controller finds an appliance's management address (SSH, engine service): the IP
address VMware Tools reports (``guest.ipAddress``). When ``appliances.addresses`` names a pool,
the controller assigns one address per appliance at deploy time as the OVF property /
extraConfig ``guestinfo.ipaddress``, which the appliance image applies to its NIC at boot
(and which the bundled simulator reports back as ``guest.ipAddress``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vsphere_av.config import ApplianceSettings  # the [appliances] section, declared there
from vsphere_av.errors import ApplianceError, VsphereAvError
from vsphere_av.fleet.image import IMAGE_KEY, image_id

# The inventory types and extraConfig keys are shared with the adapter: see models.
from vsphere_av.models import ADDRESS_KEY as ADDRESS_KEY
from vsphere_av.models import HOST_KEY as HOST_KEY
from vsphere_av.models import POWERED_OFF as POWERED_OFF
from vsphere_av.models import POWERED_ON as POWERED_ON
from vsphere_av.models import ROLE_KEY as ROLE_KEY
from vsphere_av.models import ROLE_VALUE as ROLE_VALUE
from vsphere_av.models import STANDBY_KEY as STANDBY_KEY
from vsphere_av.models import ApplianceVm as ApplianceVm
from vsphere_av.models import Audit
from vsphere_av.models import FleetHost as FleetHost
from vsphere_av.models import HostPin as HostPin
from vsphere_av.models import Observed as Observed

# VMware security configuration guide, VM controls (see shared design vsphere-api.md).
HARDENING: Mapping[str, str] = {
    "isolation.tools.copy.disable": "TRUE",
    "isolation.tools.paste.disable": "TRUE",
    "isolation.tools.dnd.disable": "TRUE",
    "isolation.tools.diskShrink.disable": "TRUE",
    "isolation.tools.diskWiper.disable": "TRUE",
    "isolation.device.connectable.disable": "TRUE",
    "mks.enable3d": "FALSE",
    "tools.guestlib.enableFleetHost": "FALSE",
    "RemoteDisplay.maxConnections": "1",
    "tools.setInfo.sizeLimit": "1048576",
    "log.keepOld": "10",
    "log.rotateSize": "2048000",
}

APPLIANCE_DOWN = "appliance down"   # the status reason of VMs whose appliance cannot scan

# Order in which a plan's actions are applied: clean-up first (so names and addresses are
# free), then creation, then the fixes that depend on the VM existing.
KINDS = ("destroy", "unpin", "deploy", "configure", "relocate", "pin", "power_on", "shutdown")


# ----------------------------------------------------------------------------- desired state


@dataclass(frozen=True)
class Desired:
    """What the configuration asks for (the part of :class:`ApplianceSettings` plan reads)."""

    clusters: frozenset[str] = frozenset()
    name_prefix: str = "vsphere-av-appliance-"
    addresses: tuple[str, ...] = ()
    image: str = ""     # "sha256:<hex>" of the configured image; recorded on every deploy

    @classmethod
    def from_settings(cls, settings: ApplianceSettings) -> Desired:
        """Build from the ``[appliances]`` settings."""
        try:
            image = image_id(settings)
        except ApplianceError:
            image = ""      # an unreadable image: the deploy itself says why
        return cls(clusters=frozenset(settings.clusters), name_prefix=settings.name_prefix,
                   addresses=tuple(settings.address_pool()), image=image)


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Action:
    """One change to make; ``vm_id`` is empty for a VM this plan deploys."""

    kind: str
    host: str                   # host name (for people)
    host_id: str
    vm: str                     # VM name
    vm_id: str = ""
    cluster_id: str = ""
    reason: str = ""
    extra_config: tuple[tuple[str, str], ...] = ()   # deploy / configure: keys to set

    def as_dict(self) -> dict[str, Any]:
        """JSON form: kind, host, vm plus the identifiers and reason."""
        out: dict[str, Any] = {"kind": self.kind, "host": self.host, "host_id": self.host_id,
                               "vm": self.vm, "vm_id": self.vm_id or None,
                               "reason": self.reason}
        if self.cluster_id:
            out["cluster_id"] = self.cluster_id
        if self.extra_config:
            out["extra_config"] = dict(self.extra_config)
        return out


def appliance_name(desired: Desired, host: FleetHost) -> str:
    """``<prefix><host name>``: the name of the appliance VM for ``host``."""
    return f"{desired.name_prefix}{host.name}"


def expected_extra_config(host_id: str) -> dict[str, str]:
    """The extraConfig every appliance of ``host_id`` must carry (markers + hardening)."""
    return {**HARDENING, ROLE_KEY: ROLE_VALUE, HOST_KEY: host_id}


def _in_scope(desired: Desired, host: FleetHost) -> bool:
    return not desired.clusters or host.cluster_name in desired.clusters


def _keeper(apps: Sequence[ApplianceVm], host: FleetHost, name: str,
            image: str = "") -> ApplianceVm:
    """The one appliance to keep among several for the same host (deterministic); one on
    the configured image first (an interrupted upgrade keeps the new appliance)."""
    def score(app: ApplianceVm) -> tuple[int, int, int, int, str]:
        return (0 if image and app.extra_config.get(IMAGE_KEY) == image else 1,
                0 if app.host_id == host.id else 1,
                0 if app.power_state == POWERED_ON else 1,
                0 if app.name == name else 1,
                app.id)
    return min(apps, key=score)


def _free_address(desired: Desired, taken: set[str]) -> str:
    for addr in desired.addresses:
        if addr not in taken:
            taken.add(addr)
            return addr
    if desired.addresses:
        raise ApplianceError("appliances.addresses: the address pool is exhausted")
    return ""


def _host_name(hosts: Mapping[str, FleetHost], host_id: str | None) -> str:
    host = hosts.get(host_id or "")
    return host.name if host else str(host_id)


def plan(desired: Desired, observed: Observed) -> list[Action]:
    """The actions that turn ``observed`` into ``desired``; empty when nothing must change."""
    hosts = {h.id: h for h in observed.hosts}
    scope = {h.id: h for h in observed.hosts if _in_scope(desired, h)}
    by_host: dict[str, list[ApplianceVm]] = {}
    for app in sorted(observed.appliances, key=lambda a: a.id):
        if not _standby_of_live(app, observed):   # an upgrade in progress owns it
            by_host.setdefault(app.marker_host, []).append(app)
    taken = {a.extra_config.get(ADDRESS_KEY, "") for a in observed.appliances} | {
        a.address for a in observed.appliances}
    taken.discard("")
    actions: list[Action] = []

    def add(kind: str, host: FleetHost | None, host_id: str, vm: str, vm_id: str = "",
            **kw: Any) -> None:
        actions.append(Action(kind=kind, host=host.name if host else host_id, host_id=host_id,
                              vm=vm, vm_id=vm_id, **kw))

    # Appliances whose host is gone or out of scope.
    for host_id, apps in sorted(by_host.items()):
        if host_id not in scope:
            why = "host removed" if host_id not in hosts else "host not in the configured clusters"
            for app in apps:
                add("destroy", hosts.get(host_id), host_id, app.name, app.id, reason=why)

    # Pin rules and groups whose host is gone, out of scope or now in another cluster.
    for pin in sorted(observed.pins, key=lambda p: (p.cluster_id, p.host_id)):
        host = scope.get(pin.host_id)
        if host is None or host.cluster_id != pin.cluster_id:
            if pin.host_id not in hosts:
                why = "host removed"
            elif host is None:
                why = "host not in the configured clusters"
            else:
                why = "host moved to another cluster"
            add("unpin", hosts.get(pin.host_id), pin.host_id, "", cluster_id=pin.cluster_id,
                reason=why)

    pins: dict[tuple[str, str], HostPin] = {(p.cluster_id, p.host_id): p for p in observed.pins}
    for host in sorted(scope.values(), key=lambda h: (h.name, h.id)):
        if not host.connected:
            continue  # nothing can be changed on it; its VMs are unprotected meanwhile
        name = appliance_name(desired, host)
        apps = by_host.get(host.id, [])
        want_extra = expected_extra_config(host.id)
        if not apps:
            if host.maintenance:
                continue  # nothing can be deployed onto a host in maintenance mode
            extra = dict(want_extra)
            if desired.image:
                extra[IMAGE_KEY] = desired.image
            address = _free_address(desired, taken)
            if address:
                extra[ADDRESS_KEY] = address
            add("deploy", host, host.id, name, reason="no appliance",
                extra_config=tuple(sorted(extra.items())))
            if host.cluster_id:
                add("pin", host, host.id, name, cluster_id=host.cluster_id,
                    reason="new appliance")
            add("power_on", host, host.id, name, reason="new appliance")
            continue

        keep = _keeper(apps, host, name, desired.image)
        for dup in apps:
            if dup is not keep:
                add("destroy", host, host.id, dup.name, dup.id, reason="duplicate appliance")
        drift = {k: v for k, v in want_extra.items() if keep.extra_config.get(k) != v}
        if keep.extra_config.get(STANDBY_KEY):
            drift[STANDBY_KEY] = ""    # the appliance it was to replace is gone: promote it
        if drift:
            add("configure", host, host.id, keep.name, keep.id,
                reason="hardening or markers changed: " + ", ".join(sorted(drift)),
                extra_config=tuple(sorted(drift.items())))
        if keep.host_id != host.id and not host.maintenance:
            add("relocate", host, host.id, keep.name, keep.id,
                reason=f"moved to {_host_name(hosts, keep.host_id)}")
        if host.cluster_id:
            found = pins.get((host.cluster_id, host.id))
            wrong = []
            if found is None or found.vm_group != frozenset({keep.id}):
                wrong.append("vm group")
            if found is None or found.host_group != frozenset({host.id}):
                wrong.append("host group")
            if found is None or not found.rule_ok:
                wrong.append("rule")
            if not keep.drs_disabled:
                wrong.append("drs override")
            if not keep.ha_disabled:
                wrong.append("ha override")
            if wrong:
                add("pin", host, host.id, keep.name, keep.id, cluster_id=host.cluster_id,
                    reason="not pinned: " + ", ".join(wrong))
        if host.maintenance:
            if keep.power_state == POWERED_ON:
                add("shutdown", host, host.id, keep.name, keep.id,
                    reason="host in maintenance mode")
        elif keep.power_state != POWERED_ON:
            add("power_on", host, host.id, keep.name, keep.id,
                reason=f"found {keep.power_state}")

    order = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(actions, key=lambda a: order[a.kind])  # stable: host order kept per kind


def _standby_of_live(app: ApplianceVm, observed: Observed) -> bool:
    """True for an upgrade's new appliance while the appliance it replaces still exists."""
    old = app.extra_config.get(STANDBY_KEY, "")
    return bool(old) and any(a.id == old and a.marker_host == app.marker_host
                             for a in observed.appliances)


# ----------------------------------------------------------------------------- upgrade


@dataclass(frozen=True)
class UpgradeStep:
    """One host's appliance to replace (``kind = "replace"``), or why a host is left alone
    (``kind = "skip"``)."""

    kind: str
    host: str
    host_id: str
    old_vm: str = ""
    old_vm_id: str = ""
    old_image: str = ""
    new_vm: str = ""
    cluster_id: str = ""
    reason: str = ""
    extra_config: tuple[tuple[str, str], ...] = ()   # the new appliance's deploy keys
    remove_first: tuple[str, ...] = ()   # standbys an interrupted upgrade left behind

    def as_dict(self) -> dict[str, Any]:
        """JSON form (the deploy keys are not printed: they hold nothing people need)."""
        return {"kind": self.kind, "host": self.host, "host_id": self.host_id,
                "old_vm": self.old_vm or None, "old_vm_id": self.old_vm_id or None,
                "old_image": self.old_image or None, "new_vm": self.new_vm or None,
                "remove_first": list(self.remove_first), "reason": self.reason}


def upgrade_name(desired: Desired, host: FleetHost) -> str:
    """The new appliance's name: ``<prefix><host>-<first 8 hex of the image>`` (never the
    name of the appliance it replaces, which runs beside it until the move)."""
    return f"{appliance_name(desired, host)}-{desired.image.removeprefix('sha256:')[:8]}"


def plan_upgrade(desired: Desired, observed: Observed) -> list[UpgradeStep]:
    """Which hosts' appliances to replace by one on ``desired.image``, in host-name order.

    A host is replaced only when exactly one running appliance serves it (reconcile first
    otherwise) and that one records another image; hosts in maintenance mode, disconnected
    or without a running appliance are skipped with the reason. Pure.
    """
    if not desired.image:
        raise ApplianceError("appliances upgrade needs an image: set appliances.ova (or ovf) "
                             "with source = \"ovf\"")
    taken = {a.extra_config.get(ADDRESS_KEY, "") for a in observed.appliances} | {
        a.address for a in observed.appliances}
    taken.discard("")
    steps: list[UpgradeStep] = []
    for host in sorted(observed.hosts, key=lambda h: (h.name, h.id)):
        if not _in_scope(desired, host):
            continue
        apps = [a for a in observed.appliances if a.marker_host == host.id]
        active = [a for a in apps if not _standby_of_live(a, observed)]
        skip = ""
        if not host.connected:
            skip = "host disconnected"
        elif host.maintenance:
            skip = "host in maintenance mode"
        elif len(active) != 1:
            skip = ("no appliance: run appliances reconcile" if not active
                    else "several appliances: run appliances reconcile")
        elif active[0].power_state != POWERED_ON or active[0].host_id != host.id:
            skip = "its appliance is not running on it: run appliances reconcile"
        elif active[0].extra_config.get(IMAGE_KEY) == desired.image:
            skip = "already on the image"
        if skip:
            old = active[0] if len(active) == 1 else None
            steps.append(UpgradeStep("skip", host.name, host.id,
                                     old_vm=old.name if old else "",
                                     old_vm_id=old.id if old else "",
                                     old_image=old.extra_config.get(IMAGE_KEY, "") if old else "",
                                     reason=skip))
            continue
        old = active[0]
        extra = {**expected_extra_config(host.id), IMAGE_KEY: desired.image, STANDBY_KEY: old.id}
        address = _free_address(desired, taken)
        if address:
            extra[ADDRESS_KEY] = address
        steps.append(UpgradeStep(
            "replace", host.name, host.id, old_vm=old.name, old_vm_id=old.id,
            old_image=old.extra_config.get(IMAGE_KEY, ""), new_vm=upgrade_name(desired, host),
            cluster_id=host.cluster_id or "",
            reason=f"image {old.extra_config.get(IMAGE_KEY) or 'unrecorded'} -> {desired.image}",
            extra_config=tuple(sorted(extra.items())),
            remove_first=tuple(sorted(a.id for a in apps if a not in active))))
    return steps


# ----------------------------------------------------------------------------- health


def appliance_down_hosts(desired: Desired, observed: Observed) -> dict[str, str]:
    """Host moref -> reason, for every in-scope host whose appliance cannot scan now."""
    down: dict[str, str] = {}
    by_host: dict[str, list[ApplianceVm]] = {}
    for app in observed.appliances:
        by_host.setdefault(app.marker_host, []).append(app)
    for host in observed.hosts:
        if not _in_scope(desired, host):
            continue
        running = [a for a in by_host.get(host.id, [])
                   if a.power_state == POWERED_ON and a.host_id == host.id]
        if host.maintenance:
            down[host.id] = "appliance down (host in maintenance mode)"
        elif not host.connected:
            down[host.id] = "appliance down (host disconnected)"
        elif not running:
            down[host.id] = APPLIANCE_DOWN
    return down


def overlay_states(states: Sequence[Any], down: Mapping[str, str]) -> list[Any]:
    """VM states with every VM on a host in ``down`` shown ``unprotected`` with that reason.

    ``states`` are ``models.VmState`` (anything with ``host_moref``, ``state``, ``reason``);
    a VM whose host's appliance is down or unhealthy is never reported as protected.
    """
    from dataclasses import replace as _replace

    out = []
    for state in states:
        reason = down.get(getattr(state, "host_moref", "") or "")
        if reason:
            state = _replace(state, state="unprotected", reason=reason)
        out.append(state)
    return out


# ----------------------------------------------------------------------------- apply


class ApplianceAdapter(Protocol):
    """The side effects :func:`apply` needs; every method is idempotent."""

    def observe(self) -> Observed:
        """Read hosts, appliance VMs and pin rules."""
        ...

    def deploy(self, *, host_id: str, name: str, extra_config: Mapping[str, str]) -> str:
        """Deploy a new appliance VM on ``host_id`` (powered off); return its moref."""
        ...

    def reconfigure(self, *, vm_id: str, extra_config: Mapping[str, str]) -> None:
        """Set these extraConfig keys on the VM."""
        ...

    def relocate(self, *, vm_id: str, host_id: str) -> None:
        """Move the VM back onto ``host_id``."""
        ...

    def pin(self, *, cluster_id: str, host_id: str, vm_id: str) -> None:
        """Ensure VM group, host group, mandatory rule, DRS and HA overrides for the VM."""
        ...

    def unpin(self, *, cluster_id: str, host_id: str) -> None:
        """Remove the rule and groups of ``host_id`` from the cluster."""
        ...

    def power_on(self, *, vm_id: str) -> None:
        """Power the VM on (no-op when it runs)."""
        ...

    def shutdown(self, *, vm_id: str) -> None:
        """Shut the guest down cleanly (power off when Tools do not run)."""
        ...

    def destroy(self, *, vm_id: str) -> None:
        """Power off and delete the VM (no-op when it is gone)."""
        ...


@dataclass(frozen=True)
class ActionResult:
    """What happened to one action."""

    action: Action
    ok: bool
    vm_id: str = ""
    error: str = ""
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON form: the action plus outcome."""
        out = self.action.as_dict()
        out.update(ok=self.ok, vm_id=self.vm_id or out["vm_id"], error=self.error or None,
                   skipped=self.skipped)
        return out


def apply(actions: Sequence[Action], *, adapter: ApplianceAdapter, audit: Audit,
          actor: str) -> list[ActionResult]:
    """Perform the actions in order; a failure skips that host's later actions, not others'."""
    deployed: dict[tuple[str, str], str] = {}   # (host_id, name) -> new moref
    failed_hosts: set[str] = set()
    results: list[ActionResult] = []
    for action in actions:
        if action.host_id in failed_hosts and action.kind != "unpin":
            results.append(ActionResult(action, ok=False, skipped=True,
                                        error="skipped after an earlier failure on this host"))
            continue
        vm_id = action.vm_id or deployed.get((action.host_id, action.vm), "")
        try:
            vm_id = _perform(action, vm_id, adapter=adapter)
        except VsphereAvError as exc:
            failed_hosts.add(action.host_id)
            results.append(ActionResult(action, ok=False, vm_id=vm_id, error=str(exc)))
            audit.append(actor=actor, action=f"appliance.{action.kind}.failed",
                         details={**_audit_details(action, vm_id), "error": str(exc)})
            continue
        if action.kind == "deploy":
            deployed[(action.host_id, action.vm)] = vm_id
        results.append(ActionResult(action, ok=True, vm_id=vm_id))
        audit.append(actor=actor, action=f"appliance.{action.kind}",
                     details=_audit_details(action, vm_id))
    return results


def _audit_details(action: Action, vm_id: str) -> dict[str, Any]:
    details = {"host": action.host, "host_id": action.host_id, "vm": action.vm,
               "vm_id": vm_id or None, "cluster_id": action.cluster_id or None,
               "reason": action.reason}
    image = dict(action.extra_config).get(IMAGE_KEY)
    if image:
        details["image"] = image
    return details


def _perform(action: Action, vm_id: str, *, adapter: ApplianceAdapter) -> str:
    kind = action.kind
    if kind == "deploy":
        return adapter.deploy(host_id=action.host_id, name=action.vm,
                              extra_config=dict(action.extra_config))
    if kind == "unpin":
        adapter.unpin(cluster_id=action.cluster_id, host_id=action.host_id)
        return ""
    if not vm_id:
        raise ApplianceError(f"{kind} {action.vm}: the VM was not deployed")
    if kind == "configure":
        adapter.reconfigure(vm_id=vm_id, extra_config=dict(action.extra_config))
    elif kind == "relocate":
        adapter.relocate(vm_id=vm_id, host_id=action.host_id)
    elif kind == "pin":
        adapter.pin(cluster_id=action.cluster_id, host_id=action.host_id, vm_id=vm_id)
    elif kind == "power_on":
        adapter.power_on(vm_id=vm_id)
    elif kind == "shutdown":
        adapter.shutdown(vm_id=vm_id)
    elif kind == "destroy":
        adapter.destroy(vm_id=vm_id)
    else:  # pragma: no cover - plan() only emits KINDS
        raise ApplianceError(f"unknown appliance action {kind!r}")
    return vm_id


@dataclass(frozen=True)
class ReconcileResult:
    """One reconcile round: the plan and, unless dry-run, what applying it did."""

    actions: tuple[Action, ...]
    results: tuple[ActionResult, ...] = ()
    dry_run: bool = False
    down: Mapping[str, str] = field(default_factory=dict)   # host moref -> reason, after apply
    back: tuple[str, ...] = ()   # hosts whose appliance was down and runs again: rescan them
    warnings: tuple[str, ...] = ()   # e.g. the bundled placeholder is the configured image

    @property
    def ok(self) -> bool:
        """True when every applied action succeeded."""
        return all(r.ok for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        """``{"actions": [...], "dry_run": ..., "ok": ...}``."""
        if self.dry_run or not self.results:
            actions = [a.as_dict() for a in self.actions]
        else:
            actions = [r.as_dict() for r in self.results]
        return {"actions": actions, "dry_run": self.dry_run, "ok": self.ok,
                "down": dict(self.down), "back": list(self.back),
                "warnings": list(self.warnings)}


def reconcile_once(*, adapter: ApplianceAdapter, audit: Audit, desired: Desired, actor: str,
                   dry_run: bool = False) -> ReconcileResult:
    """Observe, plan and (unless ``dry_run``) apply one round; level-based and idempotent."""
    observed = adapter.observe()
    actions = plan(desired, observed)
    if dry_run or not actions:
        return ReconcileResult(tuple(actions), dry_run=dry_run,
                               down=appliance_down_hosts(desired, observed))
    results = apply(actions, adapter=adapter, audit=audit, actor=actor)
    before = appliance_down_hosts(desired, observed)
    down = appliance_down_hosts(desired, adapter.observe())
    return ReconcileResult(tuple(actions), tuple(results), down=down,
                           back=tuple(sorted(set(before) - set(down))))
