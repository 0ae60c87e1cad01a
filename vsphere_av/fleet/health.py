"""Appliance health: one engine check, and what the last checks and reconciles found.

Called by ``fleet.manager`` (health rounds, upgrades, reconcile), ``app`` (the status
overlay reads the file when it does not ask vCenter) and ``api`` (metrics, the appliances
page). Calls an engine client's ``/health`` (``engine.remote.EngineClient``) and the file
system.

Health is remembered in ``<state_dir>/appliances/health.json`` (host moref -> reason, time):
written by ``ApplianceManager.reconcile`` (appliances down) and ``ApplianceManager.check_health``
(engine not answering, wrong signature version), read by ``status`` so that VMs on such a
host show ``unprotected`` with the reason, never silently ``protected``; the controller keeps
those hosts' jobs queued until the reason clears.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsphere_av.errors import ApplianceError
from vsphere_av.models import ApplianceAddress

HEALTH_FILE = Path("appliances") / "health.json"
HEALTH_TIMEOUT = 10.0       # seconds for an engine's /health answer (as for SSH)


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


def engine_check(app: ApplianceAddress, client: Any, *,
                 expected_version: int | None) -> ApplianceCheck:
    """The engine half of a health check: ``/health`` with the token on the route scans take,
    status ok and, when given, ``expected_version``. Closes ``client``."""
    try:
        health = client.health()
    finally:
        client.close()
    if "signature_version" not in health:
        raise ApplianceError(f"engine service {client.base_url}: the token was not accepted")
    version = health.get("signature_version")
    if health.get("status") != "ok":
        reason = f"appliance unhealthy: engine status {health.get('status')}"
    elif expected_version is not None and version != expected_version:
        reason = version_reason(version, expected=expected_version)
    else:
        reason = ""
    return ApplianceCheck(app.host_id, app.host, app.vm, app.address, ok=not reason,
                          reason=reason, signature_version=version)


def version_reason(version: Any, *, expected: int) -> str:
    """Why an appliance on another signature version than the controller's active one may
    not scan (the push from the health loop brings it up to date; scans wait for it)."""
    return f"appliance unhealthy: signature version {version}, expected {expected}"


def unhealthy_hosts(checks: Iterable[ApplianceCheck]) -> dict[str, str]:
    """Host moref -> reason for every failed check (``appliance unhealthy: ...``)."""
    out: dict[str, str] = {}
    for check in checks:
        if not check.ok:
            out[check.host_id] = check.reason if check.reason.startswith("appliance ") else \
                f"appliance unhealthy: {check.reason}"
    return out


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


def write_health(state_dir: Path | str, *, down: Mapping[str, str],
                 unhealthy: Mapping[str, str], clock: Callable[[], float]) -> None:
    """Replace ``health.json`` (atomically) with hosts down and unhealthy now."""
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
