"""Running the appliances: reconcile, push signatures, check health, route scans to them.

Called by ``cli.py`` (``appliances ...``), ``app.py`` (status overlay, scan dispatch) and the
controller's ``serve`` loop (``reconcile_once`` each resync, ``check_health``). Calls the
vSphere adapter (``vsphere.appliances``), ``ssh`` (paramiko), ``engine_service.EngineClient``,
the engine's signature store (to find the active version directory) and the audit log.

Health is remembered in ``<state_dir>/appliances/health.json`` (host moref -> reason, time):
written by :meth:`ApplianceManager.reconcile` (appliances down) and
:meth:`ApplianceManager.check_health` (engine not answering, wrong signature version), read by
``status`` so that VMs on such a host show ``unprotected`` with the reason, never silently
``protected``; the controller keeps those hosts' jobs queued until the reason clears.

Management addresses: the appliance's ``guest.ipAddress`` as VMware Tools reports it (see
``appliances`` module docstring). SSH goes to ``<address>:<ssh_port>``; the engine service
is reached at ``http(s)://<address>:<engine_port>`` (https with ``engine_ca_file``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_av import appliances as ap
from vsphere_av.config import ApplianceSettings
from vsphere_av.errors import ApplianceError, ConfigError, VsphereAvError

HEALTH_FILE = Path("appliances") / "health.json"
HEALTH_TIMEOUT = 10.0       # seconds for an engine's /health answer (as for SSH)
SCAN_TIMEOUT = 120.0        # seconds for one file's verdict from an appliance


@dataclass(frozen=True)
class ApplianceCheck:
    """The outcome of one health check or signature push on one appliance."""

    host_id: str
    host: str
    vm: str
    address: str
    ok: bool
    reason: str = ""
    signature_version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"host_id": self.host_id, "host": self.host, "vm": self.vm,
                "address": self.address, "ok": self.ok, "reason": self.reason or None,
                "signature_version": self.signature_version}


def read_health(state_dir: Path | str, *, section: str = "hosts") -> dict[str, str]:
    """Host moref -> reason for every host whose appliance was last seen down or unhealthy."""
    path = Path(state_dir) / HEALTH_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    hosts = data.get(section, {}) if isinstance(data, dict) else {}
    if not isinstance(hosts, dict):
        return {}
    return {str(k): str(v) for k, v in hosts.items() if isinstance(v, str) and v}


def _write_health(state_dir: Path | str, *, down: Mapping[str, str],
                  unhealthy: Mapping[str, str], clock: Callable[[], float]) -> None:
    path = Path(state_dir) / HEALTH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    hosts = dict(down)
    for host_id, reason in unhealthy.items():
        hosts.setdefault(host_id, reason)
    document = {"hosts": hosts, "down": dict(down), "unhealthy": dict(unhealthy),
                "checked_at": clock(), "previous": old.get("hosts", {})}
    tmp = path.with_name(f".health.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


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

    # -- vSphere side ----------------------------------------------------------------------
    def reconcile(self, *, dry_run: bool = False) -> ap.ReconcileResult:
        """One reconcile round (see ``appliances.reconcile_once``); remembers who is down."""
        result = ap.reconcile_once(adapter=self.adapter, audit=self.audit, desired=self.desired,
                                   actor=self.actor, dry_run=dry_run)
        if dry_run:
            return result
        previous = read_health(self.state_dir)
        unhealthy = self._unhealthy if self._unhealthy is not None else \
            read_health(self.state_dir, section="unhealthy")   # keep the last check's verdict
        _write_health(self.state_dir, down=result.down, unhealthy=unhealthy, clock=self.clock)
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
        return list(self.adapter.addresses(desired=self.desired))

    def down_hosts(self) -> dict[str, str]:
        """Host moref -> reason: appliance down now (live) or unhealthy at the last check."""
        observed = self.adapter.observe(desired=self.desired)
        down = ap.appliance_down_hosts(self.desired, observed)
        for host_id, reason in read_health(self.state_dir, section="unhealthy").items():
            down.setdefault(host_id, reason)
        return down

    # -- engine side -----------------------------------------------------------------------
    def _token(self) -> str:
        from vsphere_av.engine_service import load_token

        if not self.settings.engine_token_file:
            raise ConfigError("appliances.engine_token_file is not set")
        return load_token(token_file=self.settings.engine_token_file)

    def engine_url(self, address: str) -> str:
        """Base URL of the engine service at ``address``."""
        scheme = "https" if self.settings.engine_ca_file else "http"
        host = f"[{address}]" if ":" in address else address
        return f"{scheme}://{host}:{self.settings.engine_port}"

    def engine_for_host(self, host_id: str) -> Any:
        """A ``RemoteEngine`` for the appliance of ``host_id``; None when it has none running."""
        from vsphere_av.engine_service import RemoteEngine

        for app in self.appliances():
            if app.host_id == host_id and app.powered_on and app.address:
                return RemoteEngine(self._engine_client(app.address))
        return None

    def _engine_client(self, address: str, *, timeout: float = SCAN_TIMEOUT) -> Any:
        """The client for the engine service at ``address``: the one route scans and health
        checks take (https, verified against ``engine_ca_file``, when that is set)."""
        from vsphere_av.engine_service import EngineClient

        return EngineClient(self.engine_url(address), token=self._token(),
                            ca_file=self.settings.engine_ca_file, timeout=timeout)

    # -- SSH side --------------------------------------------------------------------------
    def _ssh(self, app: Any) -> Any:
        if self._ssh_open is not None:
            return self._ssh_open(app)
        from vsphere_av.ssh import ApplianceSsh

        if not self.settings.ssh_key_file:
            raise ConfigError("appliances.ssh_key_file is not set (SSH uses keys only)")
        return ApplianceSsh(host=app.address, port=self.settings.ssh_port,
                            user=self.settings.ssh_user, key_file=self.settings.ssh_key_file,
                            state_dir=self.state_dir, audit=self.audit, actor=self.actor,
                            appliance=app.vm)

    def _each(self, fn: Callable[[Any, Any], ApplianceCheck]) -> list[ApplianceCheck]:
        out = []
        for app in self.appliances():
            if not app.powered_on or not app.address:
                out.append(ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=False,
                                          reason=ap.APPLIANCE_DOWN if not app.powered_on
                                          else "appliance has no management address yet"))
                continue
            try:
                conn = self._ssh(app)
                conn.connect()
                try:
                    out.append(fn(app, conn))
                finally:
                    conn.close()
            except VsphereAvError as exc:
                out.append(ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=False,
                                          reason=str(exc)))
        return out

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
        def check(app: Any, conn: Any) -> ApplianceCheck:
            client = self._engine_client(app.address, timeout=HEALTH_TIMEOUT)
            try:
                health = client.health()
            finally:
                client.close()
            if "signature_version" not in health:
                raise ApplianceError(f"engine service {client.base_url}: the token was not "
                                     "accepted")
            version = health.get("signature_version")
            if health.get("status") != "ok":
                reason = f"appliance unhealthy: engine status {health.get('status')}"
            elif expected_version is not None and version != expected_version:
                reason = (f"appliance unhealthy: signature version {version}, "
                          f"expected {expected_version}")
            else:
                reason = ""
            return ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=not reason,
                                  reason=reason, signature_version=version)

        results = self._each(check)
        self._unhealthy = {}
        for r in results:
            if not r.ok:
                reason = r.reason if r.reason.startswith("appliance ") else \
                    f"appliance unhealthy: {r.reason}"
                self._unhealthy[r.host_id] = reason
        observed_down = ap.appliance_down_hosts(self.desired,
                                                self.adapter.observe(desired=self.desired))
        _write_health(self.state_dir, down=observed_down, unhealthy=self._unhealthy,
                      clock=self.clock)
        return results

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
    from vsphere_av.vsphere.appliances import VsphereApplianceAdapter

    section = settings.appliances
    adapter = VsphereApplianceAdapter(connection=connection, settings=section)
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
    from vsphere_av.engine_service import EngineService

    services: list[Any] = []
    engine = Engine.open(engine_settings, use_cache=False)   # nothing to close afterwards
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
