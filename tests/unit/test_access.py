"""Roles for security admins, infrastructure admins and auditors (``app.access``).

Uses this machine's real accounts and groups (root, nobody/nogroup, daemon), and sets
SUDO_USER the way sudo does: the state directory is the test's own (owned by the account
running the tests, which therefore plays the service account).
"""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from vsphere_av.app import access
from vsphere_av.cli import main
from vsphere_av.config import AccessSettings
from vsphere_av.errors import AccessDenied

ROLES = AccessSettings(security_admins=("alice", "%daemon"),
                       infrastructure_admins=("bob",), auditors=("%nogroup",))


def _paths(group: click.Group, prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _paths(command, f"{prefix}{name} ")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_every_command_has_its_roles() -> None:
    paths = _paths(main)
    assert len(paths) > 20
    unmapped = [p for p in paths if p not in access.COMMANDS and p not in access.UNCHECKED]
    assert unmapped == []
    assert set(access.COMMANDS) <= set(paths)        # no stale entries either


@pytest.mark.parametrize(("user", "entries", "member"), [
    ("alice", ("alice",), True),
    ("alice", ("bob", "%nogroup"), False),
    ("nobody", ("%nogroup",), True),                  # primary group
    ("daemon", ("%daemon",), True),
    ("nobody", ("%daemon",), False),
    ("root", ("%root",), True),
    ("ghost", ("%no-such-group-here",), False),
    ("ghost", ("%nogroup",), False),                 # unknown account: only by name
])
def test_membership(user: str, entries: tuple[str, ...], member: bool) -> None:
    assert access.in_entries(user, entries) is member


@pytest.mark.parametrize(("sudo_user", "command", "allowed"), [
    ("alice", "quarantine restore", True),
    ("alice", "status", True),
    ("alice", "appliances reconcile", False),
    ("daemon", "signatures activate", True),           # security admin through %daemon
    ("bob", "serve", True),
    ("bob", "scan", False),
    ("nobody", "audit export", True),                 # auditor through %nogroup
    ("nobody", "quarantine purge", False),
    ("mallory", "status", False),
    ("mallory", "vcsim", True),                       # not checked
])
def test_roles_decide_under_sudo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 sudo_user: str, command: str, allowed: bool) -> None:
    monkeypatch.setenv("SUDO_USER", sudo_user)
    cfg = _service_config(tmp_path)
    if allowed:
        access.check(command, settings=ROLES, state_dir=tmp_path, config_file=cfg)
    else:
        with pytest.raises(AccessDenied, match=f"{command} needs a role in .*; {sudo_user} "):
            access.check(command, settings=ROLES, state_dir=tmp_path, config_file=cfg)


def _service_config(directory: Path, mode: int = 0o600) -> str:
    """A configuration file of the service account (the account running the tests)."""
    path = directory / "vsphere-av.toml"
    path.write_text('[access]\nauditors = ["%nogroup"]\n')
    path.chmod(mode)
    return str(path)


def test_root_through_sudo_holds_everything(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    # Ansible's become: root runs the CLI as the service account with sudo.
    monkeypatch.setenv("SUDO_USER", "root")
    access.check("quarantine purge", settings=ROLES, state_dir=tmp_path)


@pytest.mark.parametrize(("config", "settings", "error"), [
    (None, ROLES, "give the service's configuration file with --config"),
    ("group-writable", ROLES, "must belong to root or .* and be writable by its owner only"),
    ("missing", ROLES, "No such file or directory"),
    ("service", AccessSettings(), "the configuration must define \\[access\\]"),
])
def test_a_person_through_sudo_cannot_bring_their_own_configuration(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, config: str | None,
        settings: AccessSettings, error: str) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")         # a security admin, even so
    path = {None: None, "missing": str(tmp_path / "nope.toml")}.get(config or "")
    if config in ("service", "group-writable"):
        path = _service_config(tmp_path, 0o620 if config == "group-writable" else 0o600)
    with pytest.raises(AccessDenied, match=error):
        access.check("status", settings=settings, state_dir=tmp_path, config_file=path)


def test_without_roles_nothing_is_checked(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    access.check("quarantine purge", settings=AccessSettings(), state_dir=Path("/"))


def test_the_service_account_acting_itself_holds_everything(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", "alice")              # never trusted: the uid decides
    access.check("quarantine purge", settings=AccessSettings(auditors=("nobody",)),
                 state_dir=tmp_path)
    assert access.caller(state_dir=tmp_path) not in ("alice", "")


def test_sudo_user_counts_only_for_accounts_reached_through_sudo(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    assert access.caller(state_dir=tmp_path) == "alice"           # we own the state dir
    if access._account() != "root":
        foreign = Path("/")                                        # owned by root
        assert access.caller(state_dir=foreign) == access._account()
