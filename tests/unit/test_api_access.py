"""The console's share of ``app.access``: which token role may call what, and who may
mint a token of which role (this machine's real accounts; SUDO_USER set as sudo does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsphere_av.api.tokens import ROLE_NAMES
from vsphere_av.app import access
from vsphere_av.config import AccessSettings

ROLES = AccessSettings(security_admins=("alice",), infrastructure_admins=("bob",),
                       auditors=("%nogroup",))


@pytest.mark.parametrize(("route", "role", "allowed"), [
    (("GET", "/api/v1/vms"), "auditor", True),
    (("POST", "/api/v1/quarantine/{item_id}/restore"), "security_admin", True),
    (("POST", "/api/v1/quarantine/{item_id}/restore"), "auditor", False),
    (("DELETE", "/api/v1/quarantine/{item_id}"), "infrastructure_admin", False),
    (("POST", "/api/v1/scans"), "security_admin", True),
    (("POST", "/api/v1/scans"), "infrastructure_admin", False),
    (("POST", "/api/v1/signatures/{version}/activate"), "auditor", False),
    (("GET", "/api/v1/events"), "infrastructure_admin", True),
    (("GET", "/metrics"), "auditor", True),
])
def test_token_roles_follow_the_cli_map(route: tuple[str, str], role: str,
                                        allowed: bool) -> None:
    command = access.API_ROUTES[route]
    assert access.may_run(command, ROLE_NAMES[role]) is allowed
    assert (ROLE_NAMES[role] in access.COMMANDS[command]) is allowed


def test_an_unknown_command_is_never_allowed() -> None:
    assert not any(access.may_run("no such command", r) for r in access.ROLES)


@pytest.mark.parametrize(("sudo_user", "role", "allowed"), [
    ("alice", "security_admins", True),
    ("alice", "infrastructure_admins", False),     # a security admin cannot mint that
    ("alice", "auditors", False),
    ("bob", "infrastructure_admins", True),
    ("root", "security_admins", True),             # root holds everything
])
def test_a_token_grants_only_a_role_its_creator_holds(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path, sudo_user: str,
                                                      role: str, allowed: bool) -> None:
    monkeypatch.setenv("SUDO_USER", sudo_user)
    assert access.may_grant(role, settings=ROLES, state_dir=tmp_path) is allowed


def test_without_access_rules_any_role_may_be_granted(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    assert access.may_grant("infrastructure_admins", settings=AccessSettings(),
                            state_dir=tmp_path)
