"""Who may run which command: security admins, infrastructure admins and auditors.

Called by ``cli`` before every command (through :func:`check`) and by
``store.audit.current_actor`` (through :func:`caller`). Calls ``pwd`` / ``grp`` only.

Roles, from ``[access]`` (users, or ``%group``):
- ``security_admins``: what changes protection or guests: ``scan`` (remediates),
  quarantine ``restore`` / ``purge``, signature ``import`` / ``activate`` / ``rollback``;
- ``infrastructure_admins``: what runs and deploys the product: ``serve``, the appliance
  commands that change appliances (``reconcile``, ``upgrade``, ``push-signatures``,
  ``restart-engine``) and ``engine serve``;
- ``auditors``: reading only: ``status``, ``detections``, quarantine and signature lists,
  ``audit verify`` / ``head`` / ``export`` / ``forward``, appliance ``list`` / ``health``,
  ``scan-files`` (local files only). Every role may read.

Without an ``[access]`` section (or with all three lists empty) nothing is checked: one
administrator. With one, the caller must hold a role that may run the command, except the
owner of the state directory (the service account, which could change the files anyway)
and root acting on their own.

The caller is the person, not the account the command runs as: admins run
``sudo -u <service account> vsphere-av ...``, so when the command runs as the state
directory's owner or as root, the caller is ``SUDO_USER`` (sudo sets it; reaching those
accounts takes sudo); otherwise the effective user, named from its uid (never from USER,
which anyone can set). The same name goes into every audit entry. This separates duties
between people who do not hold the service account; whoever holds it (or root) holds
everything, as with any local service.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Sequence
from pathlib import Path

from vsphere_av.config import AccessSettings
from vsphere_av.errors import AccessDenied
from vsphere_av.store.audit import account as _account
from vsphere_av.store.audit import caller
from vsphere_av.store.audit import privileged as _privileged

SECURITY, INFRASTRUCTURE, AUDITOR = "security_admins", "infrastructure_admins", "auditors"
ROLES = (SECURITY, INFRASTRUCTURE, AUDITOR)
READ = frozenset(ROLES)

# Command path (as typed after "vsphere-av") -> the roles that may run it.
COMMANDS: dict[str, frozenset[str]] = {
    "scan": frozenset({SECURITY}),
    "quarantine restore": frozenset({SECURITY}),
    "quarantine purge": frozenset({SECURITY}),
    "signatures import": frozenset({SECURITY}),
    "signatures activate": frozenset({SECURITY}),
    "signatures rollback": frozenset({SECURITY}),
    "serve": frozenset({INFRASTRUCTURE}),
    "engine serve": frozenset({INFRASTRUCTURE}),
    "appliances reconcile": frozenset({INFRASTRUCTURE}),
    "appliances push-signatures": frozenset({INFRASTRUCTURE}),
    "appliances restart-engine": frozenset({INFRASTRUCTURE}),
    "appliances upgrade": frozenset({INFRASTRUCTURE}),
    "status": READ,
    "detections": READ,
    "scan-files": READ,
    "quarantine list": READ,
    "signatures list": READ,
    "audit verify": READ,
    "audit head": READ,
    "audit export": READ,
    "audit forward": READ,
    "appliances list": READ,
    "appliances health": READ,
    # the console (issue 14): tokens hand out roles, so only security admins create or
    # revoke them (and, past that, only for a role they hold: see may_grant)
    "api token create": frozenset({SECURITY}),
    "api token revoke": frozenset({SECURITY}),
    "api token list": READ,
    "report": READ,
}
# REST API route (method, path as declared) -> the command whose roles it needs: one map
# for the CLI and the API (api/server.py checks every request's token role against it).
API_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/vms"): "status",
    ("GET", "/api/v1/vms/{moref}"): "status",
    ("GET", "/api/v1/detections"): "detections",
    ("GET", "/api/v1/quarantine"): "quarantine list",
    ("POST", "/api/v1/quarantine/{item_id}/restore"): "quarantine restore",
    ("DELETE", "/api/v1/quarantine/{item_id}"): "quarantine purge",
    ("POST", "/api/v1/scans"): "scan",
    ("GET", "/api/v1/scans/{request_id}"): "status",
    ("GET", "/api/v1/audit"): "audit export",
    ("GET", "/api/v1/audit/verify"): "audit verify",
    ("GET", "/api/v1/signatures"): "signatures list",
    ("POST", "/api/v1/signatures/{version}/activate"): "signatures activate",
    ("GET", "/api/v1/appliances"): "appliances list",
    ("GET", "/api/v1/events"): "audit export",
    ("GET", "/api/v1/report"): "report",
    ("GET", "/metrics"): "status",
    # the dashboard's pages: what each shows needs the role of the command that shows it
    ("GET", "/"): "status",
    ("GET", "/vms/{moref}"): "status",
    ("GET", "/detections"): "detections",
    ("GET", "/quarantine"): "quarantine list",
    ("GET", "/audit"): "audit verify",
    ("GET", "/signatures"): "signatures list",
    ("GET", "/appliances"): "appliances list",
}
# Routes any caller may reach: the login form, the OpenAPI document, static files, liveness.
PUBLIC_ROUTES = frozenset({("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),
                           ("GET", "/health"), ("GET", "/api/v1/openapi.json")})
UNCHECKED = frozenset({"vcsim"})     # the bundled simulator: a development tool, no state


def in_entries(user: str, entries: Sequence[str]) -> bool:
    """True when ``user`` is named, or is a member (primary or supplementary) of a %group."""
    primary_gid: int | None
    try:
        primary_gid = pwd.getpwnam(user).pw_gid
    except KeyError:
        primary_gid = None
    for entry in entries:
        if not entry.startswith("%"):
            if entry == user:
                return True
            continue
        try:
            group = grp.getgrnam(entry[1:])
        except KeyError:
            continue
        if user in group.gr_mem or group.gr_gid == primary_gid:
            return True
    return False


def roles_of(user: str, settings: AccessSettings) -> list[str]:
    """Every role ``user`` holds."""
    return [role for role in ROLES if in_entries(user, settings.members(role))]


def check(command: str, *, settings: AccessSettings, state_dir: Path,
          config_file: str | None = None) -> None:
    """Raise AccessDenied unless the caller may run ``command`` ("quarantine restore", ...).

    A person who came through sudo must also run with the service's own configuration: a
    file only root or the service account can write, that defines ``[access]``; otherwise
    ``--config`` with a file of their own (no ``[access]``) would switch the checks off.
    """
    if command in UNCHECKED:
        return
    who = caller(state_dir=state_dir)
    account = _account()
    if who == "root" or (who == account and _privileged(state_dir)):
        return          # root, or the service account acting itself: it holds everything
    if who != account:  # a person through sudo
        _require_service_config(command, config_file)
        if not settings.enabled:
            raise AccessDenied(f"{command}: run through sudo, the configuration must "
                               "define [access]")
    if not settings.enabled:
        return
    allowed = COMMANDS.get(command)
    if allowed is None:
        raise AccessDenied(f"{command}: no role may run it (unknown to the access rules)")
    held = roles_of(who, settings)
    if not allowed & set(held):
        needed = " or ".join(sorted(f"access.{r}" for r in allowed))
        raise AccessDenied(f"{command} needs a role in {needed}; {who} holds "
                           f"{', '.join(held) or 'none'}")


def may_run(command: str, role: str) -> bool:
    """True when ``role`` (an API token's) may run ``command``; unknown commands: never."""
    return role in COMMANDS.get(command, frozenset())


def may_grant(role: str, *, settings: AccessSettings, state_dir: Path) -> bool:
    """``api token create --role``: the caller must hold that role themselves (a security
    admin cannot mint an infrastructure admin's token); root, the service account, or no
    ``[access]`` at all: any role."""
    who = caller(state_dir=state_dir)
    if not settings.enabled or who == "root" or (who == _account() and _privileged(state_dir)):
        return True
    return role in roles_of(who, settings)


def _require_service_config(command: str, config_file: str | None) -> None:
    """The configuration file must be one only root or this account can have written."""
    if not config_file:
        raise AccessDenied(f"{command}: run through sudo, give the service's configuration "
                           "file with --config")
    try:
        st = os.stat(config_file)
    except OSError as exc:
        raise AccessDenied(f"{command}: configuration {config_file}: {exc.strerror}") from exc
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise AccessDenied(f"{command}: run through sudo, the configuration {config_file} must "
                           f"belong to root or {_account()} and be writable by its owner only")
