"""Running the appliances: reconcile, push signatures, check health, route scans to them.

Called by ``cli`` (``appliances ...``), ``app`` (status overlay, scan dispatch) and the
controller's ``serve`` loop (``reconcile_once`` each resync, ``check_health``). Calls the
vSphere adapter (``vsphere.appliances``), ``ssh`` (paramiko), ``engine.remote.EngineClient``,
``health`` (the engine check, ``health.json``), ``routing`` (which appliance scans which
host's VMs, read once per reconcile), the engine's signature store (to find the active
version directory) and the audit log.

Management addresses: the appliance's ``guest.ipAddress`` as VMware Tools reports it (see
``plan`` module docstring). SSH goes to ``<address>:<ssh_port>``; the engine service
is reached at ``http(s)://<address>:<engine_port>`` (https with ``engine_ca_file``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_av.config import ApplianceSettings
from vsphere_av.errors import ConfigError, VsphereAvError
from vsphere_av.fleet import plan as ap
from vsphere_av.fleet.health import (
    HEALTH_TIMEOUT,
    ApplianceCheck,
    engine_check,
    read_health,
    unhealthy_hosts,
    write_health,
)
from vsphere_av.fleet.routing import EngineRoutes, RoutedEngine, mark_fleet_changed

SCAN_TIMEOUT = 120.0        # seconds for one file's verdict from an appliance
HOST_KEY_CHANGED = "SSH host key of appliance"   # how ssh.HostKeyMismatch messages begin
UPGRADE_POLL = 1.0          # seconds between health checks of an upgrade's new appliance


@dataclass(frozen=True)
class UpgradeOutcome:
    """What ``appliances upgrade`` did on one host."""

    step: ap.UpgradeStep
    status: str                 # replaced | failed | skipped | not attempted
    new_vm_id: str = ""
    reason: str = ""
    move_seconds: float | None = None   # from routing to the new one until the old was gone

    @property
    def ok(self) -> bool:
        """False only for a failed replacement."""
        return self.status != "failed"

    def as_dict(self) -> dict[str, Any]:
        """JSON form: the step plus the outcome."""
        out = self.step.as_dict()
        out.update(status=self.status, ok=self.ok, new_vm_id=self.new_vm_id or None,
                   reason=self.reason or self.step.reason,
                   move_seconds=None if self.move_seconds is None
                   else round(self.move_seconds, 3))
        return out


@dataclass(frozen=True)
class UpgradeResult:
    """The upgrade plan and, unless dry-run, each host's outcome."""

    steps: tuple[ap.UpgradeStep, ...]
    outcomes: tuple[UpgradeOutcome, ...] = ()
    dry_run: bool = False
    image: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no host's replacement failed."""
        return all(o.ok for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        """``{"image": ..., "hosts": [...], "dry_run": ..., "ok": ...}``."""
        hosts = [s.as_dict() for s in self.steps] if self.dry_run else \
            [o.as_dict() for o in self.outcomes]
        return {"image": self.image, "hosts": hosts, "dry_run": self.dry_run, "ok": self.ok,
                "warnings": list(self.warnings)}


class ApplianceManager:
    """The appliances of one controller (one vCenter, one state directory)."""

    def __init__(self, *, state_dir: Path | str, settings: ApplianceSettings, adapter: Any,
                 audit: Any, actor: str, clock: Callable[[], float] = time.time,
                 ssh_open: Callable[..., Any] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.settings = settings
        self.desired = ap.Desired.from_settings(settings)
        self.adapter = adapter
        self.audit = audit
        self.actor = actor
        self.clock = clock
        self._ssh_open = ssh_open
        self._unhealthy: dict[str, str] | None = None   # None: no check run by this manager
        self.routes = EngineRoutes(state_dir=self.state_dir, read=self.appliances,
                                   connect=self._remote_engine)

    # -- vSphere side ----------------------------------------------------------------------
    def reconcile(self, *, dry_run: bool = False) -> ap.ReconcileResult:
        """One reconcile round (see ``appliances.reconcile_once``); remembers who is down."""
        from vsphere_av.fleet.image import placeholder_warning

        result = ap.reconcile_once(adapter=self.adapter, audit=self.audit, desired=self.desired,
                                   actor=self.actor, dry_run=dry_run)
        warning = placeholder_warning(self.settings)
        if warning:
            result = dataclasses.replace(result, warnings=(warning,))
        if dry_run:
            return result
        deployed = [r.action.vm for r in result.results if r.ok and r.action.kind == "deploy"]
        if warning and deployed:
            self.audit.append(actor=self.actor, action="appliance.placeholder_image",
                              details={"warning": warning, "vms": deployed,
                                       "ovf": self.settings.ovf})
        previous = read_health(self.state_dir)
        unhealthy = self._unhealthy if self._unhealthy is not None else \
            read_health(self.state_dir, section="unhealthy")   # keep the last check's verdict
        write_health(self.state_dir, down=result.down, unhealthy=unhealthy, clock=self.clock)
        mark_fleet_changed(self.state_dir)     # scans read the routes again
        back = tuple(sorted((set(previous) | set(result.back)) - set(result.down)
                            - set(unhealthy)))
        for host_id in back:
            self.audit.append(actor=self.actor, action="appliance.back",
                              details={"host_id": host_id,
                                       "was": previous.get(host_id, ap.APPLIANCE_DOWN)})
        # The controller rescans the VMs of ``back`` hosts (started or changed meanwhile).
        return dataclasses.replace(result, back=back)

    def appliances(self) -> list[Any]:
        """Every appliance with its host and management address."""
        return list(self.adapter.addresses())

    def down_hosts(self) -> dict[str, str]:
        """Host moref -> reason: appliance down now (live) or unhealthy at the last check."""
        observed = self.adapter.observe()
        down = ap.appliance_down_hosts(self.desired, observed)
        for host_id, reason in read_health(self.state_dir, section="unhealthy").items():
            down.setdefault(host_id, reason)
        return down

    # -- engine side -----------------------------------------------------------------------
    def _token(self) -> str:
        from vsphere_av.engine.remote import load_token

        if not self.settings.engine_token_file:
            raise ConfigError("appliances.engine_token_file is not set")
        return load_token(token_file=self.settings.engine_token_file)

    def engine_url(self, address: str) -> str:
        """Base URL of the engine service at ``address``."""
        scheme = "https" if self.settings.engine_ca_file else "http"
        host = f"[{address}]" if ":" in address else address
        return f"{scheme}://{host}:{self.settings.engine_port}"

    def engine_for_host(self, host_id: str) -> RoutedEngine | None:
        """The engine of the appliance that scans ``host_id``'s VMs; None when it has none
        running. The routes are read once per reconcile, not per scan (see ``routing``)."""
        return self.routes.engine_for_host(host_id)

    def _remote_engine(self, address: str) -> Any:
        from vsphere_av.engine.remote import RemoteEngine

        return RemoteEngine(self._engine_client(address))

    def _engine_client(self, address: str, *, timeout: float = SCAN_TIMEOUT) -> Any:
        """The client for the engine service at ``address``: the one route scans and health
        checks take (https, verified against ``engine_ca_file``, when that is set)."""
        from vsphere_av.engine.remote import EngineClient

        return EngineClient(self.engine_url(address), token=self._token(),
                            ca_file=self.settings.engine_ca_file, timeout=timeout)

    # -- SSH side --------------------------------------------------------------------------
    def _ssh(self, app: Any) -> Any:
        if self._ssh_open is not None:
            return self._ssh_open(app)
        from vsphere_av.fleet.ssh import ApplianceSsh

        if not self.settings.ssh_key_file:
            raise ConfigError("appliances.ssh_key_file is not set (SSH uses keys only)")
        return ApplianceSsh(host=app.address, port=self.settings.ssh_port,
                            user=self.settings.ssh_user, key_file=self.settings.ssh_key_file,
                            state_dir=self.state_dir, audit=self.audit, actor=self.actor,
                            appliance=app.vm)

    def _each(self, fn: Callable[[Any, Any], ApplianceCheck]) -> list[ApplianceCheck]:
        out = []
        for app in self.appliances():
            if app.standby:
                continue   # an upgrade checks its own new appliance (see upgrade)
            out.append(self._one(app, fn))
        return out

    def _one(self, app: Any, fn: Callable[[Any, Any], ApplianceCheck]) -> ApplianceCheck:
        """``fn(app, ssh)`` for one appliance; a failure becomes a not-ok check."""
        if not app.powered_on or not app.address:
            return ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=False,
                                  reason=ap.APPLIANCE_DOWN if not app.powered_on
                                  else "appliance has no management address yet")
        try:
            conn = self._ssh(app)
            conn.connect()
            try:
                return fn(app, conn)
            finally:
                conn.close()
        except VsphereAvError as exc:
            return ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=False,
                                  reason=str(exc))

    def push_signatures(self, *, version_dir: Path) -> list[ApplianceCheck]:
        """Push one signature version to every running appliance (checksum verified there)."""
        def push(app: Any, conn: Any) -> ApplianceCheck:
            result = conn.push_signatures(version_dir=version_dir,
                                          remote_state_dir=self.settings.remote_state_dir)
            return ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=True,
                                  signature_version=result.version)
        return self._each(push)

    def check_health(self, *, expected_version: int | None = None) -> list[ApplianceCheck]:
        """Check every appliance; remember the unhealthy ones.

        Healthy means: SSH answers with the pinned host key (signature pushes and restarts
        need it; a changed key may be an impostor) and the engine service answers ``/health``
        with the token, on the route scans take, with the expected signature version.
        """
        results = self._each(lambda app, conn: self._engine_check(app, expected_version))
        self._unhealthy = unhealthy_hosts(results)
        observed_down = ap.appliance_down_hosts(self.desired, self.adapter.observe())
        write_health(self.state_dir, down=observed_down, unhealthy=self._unhealthy,
                     clock=self.clock)
        return results

    def _engine_check(self, app: Any, expected_version: int | None) -> ApplianceCheck:
        """The engine half of a health check (the SSH half is ``_one`` connecting)."""
        return engine_check(app, self._engine_client(app.address, timeout=HEALTH_TIMEOUT),
                            expected_version=expected_version)

    # -- upgrade ---------------------------------------------------------------------------
    def upgrade(self, *, dry_run: bool = False, expected_version: int | None = None,
                version_dir: Path | None = None,
                sleep: Callable[[float], None] = time.sleep) -> UpgradeResult:
        """Replace, one host at a time, every appliance not on the configured image.

        Per host: deploy the new appliance beside the old one (a standby: scans and health
        rounds leave it alone), power it on, wait until it is healthy (SSH with a pinned host
        key, the engine's ``/health`` with the token and, when given, ``expected_version``;
        pushed from ``version_dir`` when it is behind), then move the work: pin it, clear its
        standby mark (scans of the host go to it from then on) and destroy the old one. A new
        appliance that is not healthy within ``appliances.upgrade_timeout`` is destroyed and
        the old one kept; the rollout stops there. Each host is re-read and re-planned just
        before its turn, so a rerun after an interruption continues where it stopped.
        """
        from vsphere_av.fleet.image import placeholder_warning

        warning = placeholder_warning(self.settings)
        warnings = (warning,) if warning else ()
        observed = self.adapter.observe()
        steps = ap.plan_upgrade(self.desired, observed)
        if dry_run:
            return UpgradeResult(tuple(steps), dry_run=True, image=self.desired.image,
                                 warnings=warnings)
        self.audit.append(actor=self.actor, action="appliance.upgrade.started", details={
            "image": self.desired.image,
            "hosts": [s.host for s in steps if s.kind == "replace"]})
        outcomes: list[UpgradeOutcome] = []
        stopped = ""
        for planned in steps:
            if planned.kind != "replace":
                outcomes.append(UpgradeOutcome(planned, "skipped"))
                continue
            if stopped:
                outcomes.append(UpgradeOutcome(planned, "not attempted",
                                               reason=f"stopped after the failure on {stopped}"))
                continue
            fresh = ap.plan_upgrade(self.desired, self.adapter.observe())
            step = next((s for s in fresh if s.host_id == planned.host_id), None)
            if step is None or step.kind != "replace":
                outcomes.append(UpgradeOutcome(step or planned, "skipped",
                                               reason=step.reason if step else "host gone"))
                continue
            outcome = self._replace(step, expected_version=expected_version,
                                    version_dir=version_dir, sleep=sleep)
            mark_fleet_changed(self.state_dir)   # another appliance may serve the host now
            outcomes.append(outcome)
            if not outcome.ok:
                stopped = step.host
        result = UpgradeResult(tuple(steps), tuple(outcomes), image=self.desired.image,
                               warnings=warnings)
        self.audit.append(actor=self.actor, action="appliance.upgrade.finished", details={
            "image": self.desired.image, "ok": result.ok,
            "replaced": [o.step.host for o in outcomes if o.status == "replaced"],
            "failed": [o.step.host for o in outcomes if o.status == "failed"]})
        return result

    def _upgrade_details(self, step: ap.UpgradeStep, **extra: Any) -> dict[str, Any]:
        return {"host": step.host, "host_id": step.host_id, "old_vm": step.old_vm,
                "old_vm_id": step.old_vm_id, "old_image": step.old_image or None,
                "new_vm": step.new_vm, "image": self.desired.image, **extra}

    def _replace(self, step: ap.UpgradeStep, *, expected_version: int | None,
                 version_dir: Path | None, sleep: Callable[[float], None]) -> UpgradeOutcome:
        """Deploy, check, move, remove on one host (see :meth:`upgrade`)."""
        new_id = ""
        serving = False     # True once scans of the host may go to the new appliance
        try:
            for leftover in step.remove_first:   # a standby of an interrupted earlier run
                self.adapter.destroy(vm_id=leftover)
                self.audit.append(actor=self.actor, action="appliance.upgrade.leftover_removed",
                                  details=self._upgrade_details(step, vm_id=leftover))
            new_id = self.adapter.deploy(host_id=step.host_id, name=step.new_vm,
                                         extra_config=dict(step.extra_config))
            self.adapter.power_on(vm_id=new_id)
            self.audit.append(actor=self.actor, action="appliance.upgrade.deployed",
                              details=self._upgrade_details(step, new_vm_id=new_id))
            check = self._await_healthy(new_id, expected_version=expected_version,
                                        version_dir=version_dir, sleep=sleep)
            if not check.ok:
                self.adapter.destroy(vm_id=new_id)
                self.audit.append(actor=self.actor, action="appliance.upgrade.failed",
                                  details=self._upgrade_details(
                                      step, new_vm_id=new_id, error=check.reason,
                                      kept=step.old_vm, removed=step.new_vm))
                return UpgradeOutcome(step, "failed", new_vm_id=new_id, reason=check.reason)
            self.audit.append(actor=self.actor, action="appliance.upgrade.healthy",
                              details=self._upgrade_details(
                                  step, new_vm_id=new_id, address=check.address,
                                  signature_version=check.signature_version))
            started = time.monotonic()
            if step.cluster_id:
                self.adapter.pin(cluster_id=step.cluster_id, host_id=step.host_id,
                                 vm_id=new_id)
            self.adapter.reconfigure(vm_id=new_id, extra_config={ap.STANDBY_KEY: ""})
            serving = True
            old = next((a for a in self.appliances() if a.vm_id == step.old_vm_id), None)
            self.adapter.destroy(vm_id=step.old_vm_id)
            moved = time.monotonic() - started
            if old is not None and old.address:
                self._forget_host_key(old)
            self.audit.append(actor=self.actor, action="appliance.upgrade.replaced",
                              details=self._upgrade_details(step, new_vm_id=new_id,
                                                            move_seconds=round(moved, 3)))
            return UpgradeOutcome(step, "replaced", new_vm_id=new_id, move_seconds=moved)
        except VsphereAvError as exc:
            if new_id and not serving:   # the old one still serves: keep it, drop the new
                # left as a standby if this fails too: the next upgrade removes it first
                with contextlib.suppress(VsphereAvError):
                    self.adapter.destroy(vm_id=new_id)
            self.audit.append(actor=self.actor, action="appliance.upgrade.failed",
                              details=self._upgrade_details(
                                  step, new_vm_id=new_id or None, error=str(exc),
                                  kept=step.new_vm if serving else step.old_vm))
            return UpgradeOutcome(step, "failed", new_vm_id=new_id, reason=str(exc))

    def _await_healthy(self, vm_id: str, *, expected_version: int | None,
                       version_dir: Path | None,
                       sleep: Callable[[float], None]) -> ApplianceCheck:
        """Check the new appliance until healthy or ``upgrade_timeout`` seconds passed."""
        def push(app: Any, conn: Any) -> ApplianceCheck:
            conn.push_signatures(version_dir=version_dir,
                                 remote_state_dir=self.settings.remote_state_dir)
            return self._engine_check(app, expected_version)

        timeout = self.settings.upgrade_timeout
        deadline = time.monotonic() + timeout
        reason = "not deployed"
        while True:
            app = next((a for a in self.appliances() if a.vm_id == vm_id), None)
            if app is not None:
                check = self._one(app, lambda a, conn: self._engine_check(a, expected_version))
                if not check.ok and "signature version" in check.reason and \
                        version_dir is not None:
                    check = self._one(app, push)
                if check.ok:
                    return check
                reason = check.reason
                if reason.startswith(HOST_KEY_CHANGED):   # waiting will not change the key
                    return dataclasses.replace(check, reason=f"new appliance refused: {reason}")
            if time.monotonic() >= deadline:
                return ApplianceCheck(app.host_id if app else "", app.host if app else "",
                                      app.vm if app else "", app.address if app else "",
                                      ok=False, reason=f"new appliance not healthy within "
                                      f"{timeout:g} s: {reason}")
            sleep(UPGRADE_POLL)

    def _forget_host_key(self, app: Any) -> None:
        """The destroyed appliance's pinned SSH host key: its address may go to another."""
        if self._ssh_open is None and not self.settings.ssh_key_file:
            return
        # a stale pin only makes a later appliance at that address unhealthy
        with contextlib.suppress(VsphereAvError):
            self._ssh(app).forget_host_key(reason="appliance replaced by appliances upgrade")

    def keep_signatures_current(self, *, version: int | None,
                                version_dir: Path | None) -> list[ApplianceCheck]:
        """Health check; when an appliance is behind the active signature version, push it
        to the fleet (checksum verified there) and check again. Returns the last checks."""
        checks = self.check_health(expected_version=version)
        behind = [c for c in checks if not c.ok and "signature version" in c.reason]
        if behind and version and version_dir is not None:
            self.push_signatures(version_dir=version_dir)
            checks = self.check_health(expected_version=version)
        return checks

    def restart_engines(self) -> list[ApplianceCheck]:
        """Restart the engine service on every running appliance."""
        def restart(app: Any, conn: Any) -> ApplianceCheck:
            conn.restart_engine(command=self.settings.restart_command)
            return ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=True)
        return self._each(restart)


def open_manager(settings: Any, *, connection: Any, audit: Any, actor: str) -> ApplianceManager:
    """Wire a manager from ``config.Settings`` and a vCenter ``Connection``."""
    from vsphere_av.fleet.image import ConfiguredImage
    from vsphere_av.vsphere.appliances import VsphereApplianceAdapter

    section = settings.appliances
    adapter = VsphereApplianceAdapter(connection=connection, settings=section,
                                      image=ConfiguredImage(section))
    return ApplianceManager(state_dir=settings.state_dir, settings=section, adapter=adapter,
                            audit=audit, actor=actor)


def reconcile_once(settings: Any, *, connection: Any, audit: Any, actor: str,
                   dry_run: bool = False) -> ap.ReconcileResult:
    """What ``serve`` calls each resync: one reconcile round when appliances are enabled."""
    manager = open_manager(settings, connection=connection, audit=audit, actor=actor)
    if not manager.settings.enabled:
        return ap.ReconcileResult(actions=(), dry_run=dry_run)
    return manager.reconcile(dry_run=dry_run)


def periodic_hook(settings: Any, *, connection: Callable[[], Any], audit: Any, actor: str,
                  on_back: Callable[[tuple[str, ...]], object] | None = None,
                  health_every: int = 1) -> Callable[[], None]:
    """A periodic task for ``serve``: reconcile, check health (SSH and engine), push signatures.

    ``connection`` returns the current vCenter session (it may be replaced after a loss);
    ``on_back`` gets the hosts whose appliance runs again so their VMs are rescanned. Does
    nothing when ``[appliances] enabled`` is false. Health checks need ``ssh_key_file`` and
    ``engine_token_file``; without them only the reconcile runs.
    """
    section = settings.appliances
    rounds = {"n": 0}

    def appliances_reconcile() -> None:
        if not section.enabled:
            return
        manager = open_manager(settings, connection=connection(), audit=audit, actor=actor)
        rounds["n"] += 1
        if section.ssh_key_file and section.engine_token_file and \
                rounds["n"] % max(1, health_every) == 0:
            from vsphere_av.engine.signatures import SignatureStore

            store = SignatureStore(state_dir=Path(settings.state_dir))
            expected = store.active_version()
            manager.keep_signatures_current(
                version=expected or None,
                version_dir=store.root / f"v{expected:04d}" if expected else None)
        result = manager.reconcile()
        if result.back and on_back is not None:
            on_back(result.back)

    return appliances_reconcile


def start_local_engines(manager: ApplianceManager, *, engine_settings: Any,
                        token: str) -> list[Any]:
    """Start one engine service per running appliance on its own address, in this process.

    For the bundled simulator and ``make demo`` only: there the "appliances" are loopback
    addresses (127.0.0.N) on this machine, so their engine services run here. On real
    appliances ``vsphere-av engine serve`` runs inside each VM instead. The caller stops
    them with ``shutdown()``.
    """
    from vsphere_av.engine import Engine
    from vsphere_av.engine.remote import EngineService

    services: list[Any] = []
    engine = Engine.open(engine_settings, use_cache=False,   # nothing to close afterwards
                         audit=manager.audit, actor=manager.actor)
    try:
        for app in manager.appliances():
            if app.powered_on and app.address:
                service = EngineService(engine=engine, token=token,
                                        listen=(app.address, manager.settings.engine_port))
                service.start()
                services.append(service)
    except BaseException:
        for service in services:
            service.shutdown()
        raise
    return services
