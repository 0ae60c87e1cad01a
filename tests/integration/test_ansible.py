"""The Ansible roles in ``ansible/`` run for real: syntax, the vCenter role, the controller role.

Called by pytest. Calls ``ansible-playbook`` from the test virtualenv (a subprocess) on
``ansible/site.yml``: the ``vcenter`` play against a private bundled simulator (trusted through
``SSL_CERT_FILE`` = its own certificate, so certificates stay verified), the ``controller``
play on localhost (``connection: local``) into a temporary prefix, with user creation and
service management off. Reads results back with pyVmomi (through ``conftest.connect``),
``vsphere_av.config.load`` and the installed ``vsphere-av`` command. Each playbook runs twice:
the second run must report ``changed=0`` (idempotence, counted from the PLAY RECAP).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import SimulatorFactory, connect
from pyVmomi import vim

from vsphere_av import config
from vsphere_av.lab import simulator

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
PLAYBOOK = ANSIBLE_DIR / "site.yml"
ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")

ROLE_NAMES = ("vsphere-av-scanner", "vsphere-av-isolation", "vsphere-av-appliances")
SYSTEM_PRIVILEGES = {"System.Anonymous", "System.View", "System.Read"}

# Distinctive secrets: a leak into the config file cannot hide behind a common word.
VC_PASSWORD = "Vc-Adm1n-7f2a9c"
GUEST_PASSWORD = "Gu3st-Pw-41d8e"
WIN_PASSWORD = "W1n-Pw-0c55aa"

RECAP_RE = re.compile(r"^(?P<host>\S+)\s+:\s+(?P<counts>(?:\w+=\d+\s*)+)$", re.MULTILINE)

pytestmark = pytest.mark.skipif(not ANSIBLE_PLAYBOOK.exists(),
                                reason="ansible is not installed (pip install -e '.[dev]')")


@dataclass(frozen=True)
class Run:
    """One ansible-playbook run: its output and the PLAY RECAP counts per host."""

    output: str
    recap: dict[str, dict[str, int]]

    def count(self, host: str, what: str) -> int:
        """A PLAY RECAP counter (ok, changed, failed, ...) for a host."""
        return self.recap[host][what]

    def status(self, task: str) -> str:
        """How the (last) task whose name starts with ``task`` ended: ok, changed, skipping..."""
        found = re.findall(rf"^TASK \[[^\]]*: {re.escape(task)}[^\n]*\n(\w+)", self.output,
                           re.MULTILINE)
        assert found, f"task {task!r} did not run"
        return str(found[-1])


def _recap(output: str) -> dict[str, dict[str, int]]:
    _, sep, tail = output.rpartition("PLAY RECAP")
    assert sep, f"no PLAY RECAP in output:\n{output[-4000:]}"
    recap = {}
    for m in RECAP_RE.finditer(tail):
        recap[m["host"]] = {k: int(v) for k, v in
                            (pair.split("=") for pair in m["counts"].split())}
    assert recap, f"PLAY RECAP without hosts:\n{tail}"
    return recap


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    home = tmp / "home"
    (home / ".ansible" / "tmp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VSPHERE_AV_", "ANSIBLE_"))}
    env.update(
        ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_LOCALHOST_WARNING="False",
        ANSIBLE_LOCAL_TEMP=str(home / ".ansible" / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / ".ansible" / "tmp"),
        ANSIBLE_RETRY_FILES_ENABLED="False",
        HOME=str(home),
        **extra,
    )
    # The role validates sudoers with visudo, which lives in sbin (not on every user's PATH).
    path = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(path + [d for d in ("/usr/sbin", "/sbin") if d not in path])
    return env


def _playbook(tmp: Path, inventory: dict[str, Any], *args: str, env: dict[str, str],
              expect_failure: bool = False) -> Run:
    inv = tmp / "inventory.yml"
    inv.write_text(json.dumps(inventory, indent=1), encoding="utf-8")  # JSON is YAML
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(inv), str(PLAYBOOK), *args],
        cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    output = proc.stdout + proc.stderr
    # Ansible's own warnings are defects here (deprecated syntax, non-boolean conditionals).
    assert "[DEPRECATION WARNING]" not in output, output[-6000:]
    if expect_failure:
        assert proc.returncode != 0, output[-4000:]
    else:
        assert proc.returncode == 0, output[-6000:]
    return Run(output=output, recap=_recap(proc.stdout))


# -- syntax ---------------------------------------------------------------------------------

def test_site_playbook_passes_syntax_check(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "--syntax-check", "-i", str(ANSIBLE_DIR / "inventory.example.yml"),
         "-e", "@" + str(ANSIBLE_DIR / "group_vars" / "all.example.yml"), str(PLAYBOOK)],
        cwd=ANSIBLE_DIR, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "playbook: " in proc.stdout


def test_role_defaults_never_turn_off_tls_or_hold_secrets() -> None:
    vc = (ANSIBLE_DIR / "roles/vsphere_av_vcenter_role/defaults/main.yml").read_text()
    ctl = (ANSIBLE_DIR / "roles/vsphere_av_controller/defaults/main.yml").read_text()
    assert re.search(r"^vsphere_av_vcenter_role_validate_certs: true$", vc, re.MULTILINE)
    assert re.search(r"^vsphere_av_controller_vcenter_insecure: false$", ctl, re.MULTILINE)
    assert "validate_certs: false" not in vc + ctl
    # Secret variables default to the environment or to nothing, never to a literal.
    assert re.search(r"^vsphere_av_vcenter_role_password: \"\{\{ lookup\('ansible.builtin.env'",
                     vc, re.MULTILINE)
    for name in ("vcenter_password", "guest_password", "appliances_engine_token",
                 "appliances_ssh_private_key"):
        assert re.search(rf'^vsphere_av_controller_{name}: ""$', ctl, re.MULTILINE), name


# -- vsphere_av_vcenter_role ----------------------------------------------------------------

def _vcenter_inventory(sim: simulator.Simulator, **role_vars: Any) -> dict[str, Any]:
    return {"all": {"children": {
        "vcenter": {"hosts": {"sim": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "vsphere_av_vcenter_role_hostname": sim.host,
            "vsphere_av_vcenter_role_port": sim.port,
            "vsphere_av_vcenter_role_username": sim.username,
            # the password comes from the environment, as the role default reads it
            **role_vars,
        }}},
        "vsphere_av_controllers": {"hosts": {}},
    }}}


def _roles(sim: simulator.Simulator) -> dict[str, set[str]]:
    si = connect(sim)
    return {r.name: set(r.privilege) for r in si.content.authorizationManager.roleList}


def test_vcenter_role_creates_least_privilege_roles_idempotently(
        tmp_path: Path, vcsim_factory: SimulatorFactory) -> None:
    sim = vcsim_factory(hosts=1, vms=0, password=VC_PASSWORD)
    # Certificates stay verified: the control node trusts exactly the simulator's CA.
    env = _env(tmp_path, VSPHERE_AV_VCENTER_ADMIN_PASSWORD=sim.password,
               SSL_CERT_FILE=str(sim.cert_file))
    grant = {"principal": "VSPHERE.LOCAL\\svc-vsphere-av", "role": "vsphere-av-scanner",
             "object_name": "rootFolder", "object_type": "Folder"}
    inventory = _vcenter_inventory(sim, vsphere_av_vcenter_role_permissions=[grant])
    assert not set(ROLE_NAMES) & set(_roles(sim))

    first = _playbook(tmp_path, inventory, "--tags", "vcenter", env=env)
    assert first.count("sim", "failed") == 0
    assert first.count("sim", "changed") == 2      # the roles (one loop) and the grant
    assert VC_PASSWORD not in first.output

    second = _playbook(tmp_path, inventory, "--tags", "vcenter", env=env)
    assert second.count("sim", "changed") == 0, second.output[-4000:]
    assert second.count("sim", "failed") == 0
    assert second.status("Check that each managed role exists with exactly its privileges") == "ok"

    roles = _roles(sim)
    assert roles["vsphere-av-scanner"] == SYSTEM_PRIVILEGES | {
        "VirtualMachine.GuestOperations.Query", "VirtualMachine.GuestOperations.Modify"}
    assert roles["vsphere-av-isolation"] == SYSTEM_PRIVILEGES | {
        "VirtualMachine.Config.EditDevice", "VirtualMachine.Interact.DeviceConnection"}
    appliances = roles["vsphere-av-appliances"]
    assert {"VApp.Import", "VirtualMachine.Inventory.Create", "Resource.AssignVMToPool",
            "Datastore.AllocateSpace", "Network.Assign", "Host.Inventory.EditCluster",
            "VirtualMachine.Interact.PowerOn", "VirtualMachine.Interact.PowerOff",
            "VirtualMachine.Provisioning.Clone"} <= appliances
    # Separation: scanning grants no power, deployment or guest-execution rights.
    assert not roles["vsphere-av-scanner"] & appliances - SYSTEM_PRIVILEGES
    assert not any("GuestOperations.Execute" in p for n in ROLE_NAMES for p in roles[n])
    assert "vsphere-av-tagging" not in roles     # off by default: nothing tags yet
    assert "vsphere-av-disk-scanner" not in roles    # off by default: no disk scans yet

    si = connect(sim)
    auth = si.content.authorizationManager
    scanner_id = next(r.roleId for r in auth.roleList if r.name == "vsphere-av-scanner")
    perms = auth.RetrieveEntityPermissions(si.content.rootFolder, False)
    assert any(p.principal == grant["principal"] and p.roleId == scanner_id and p.propagate
               for p in perms)

    # Someone widens a role by hand: the next run puts it back to exactly its privileges.
    widened = [*roles["vsphere-av-scanner"], "VirtualMachine.Interact.PowerOff"]
    auth.UpdateAuthorizationRole(scanner_id, "vsphere-av-scanner", widened)
    checked = _playbook(tmp_path, inventory, "--tags", "vcenter", "--check", env=env)
    assert checked.count("sim", "changed") == 1       # reported, not applied
    assert _roles(sim)["vsphere-av-scanner"] == set(widened)
    third = _playbook(tmp_path, inventory, "--tags", "vcenter", env=env)
    assert third.count("sim", "changed") == 1
    assert _roles(sim)["vsphere-av-scanner"] == roles["vsphere-av-scanner"]

    # state=absent removes them (force: the scanner role is still granted).
    gone = _playbook(tmp_path, _vcenter_inventory(
        sim, vsphere_av_vcenter_role_state="absent", vsphere_av_vcenter_role_force_remove=True),
        "--tags", "vcenter", env=env)
    assert gone.count("sim", "changed") == 1
    assert not set(ROLE_NAMES) & set(_roles(sim))


def test_vcenter_role_disk_scanner_holds_snapshot_and_datastore_privileges_only(
        tmp_path: Path, vcsim_factory: SimulatorFactory) -> None:
    sim = vcsim_factory(hosts=1, vms=0)
    env = _env(tmp_path, VSPHERE_AV_VCENTER_ADMIN_PASSWORD=sim.password,
               SSL_CERT_FILE=str(sim.cert_file))
    inventory = _vcenter_inventory(
        sim, vsphere_av_vcenter_role_diskscan_enabled=True,
        vsphere_av_vcenter_role_scanner_enabled=False,
        vsphere_av_vcenter_role_isolation_enabled=False,
        vsphere_av_vcenter_role_appliances_enabled=False)

    run = _playbook(tmp_path, inventory, "--tags", "vcenter", env=env)

    assert run.count("sim", "failed") == 0
    assert run.status("Check that each managed role exists with exactly its privileges") == "ok"
    roles = _roles(sim)
    assert roles["vsphere-av-disk-scanner"] == SYSTEM_PRIVILEGES | {
        "VirtualMachine.State.CreateSnapshot", "VirtualMachine.State.RemoveSnapshot",
        "Datastore.Browse", "Datastore.FileManagement"}
    assert not set(ROLE_NAMES) & set(roles)          # only the enabled role was made


def test_vcenter_role_refuses_to_run_without_credentials(
        tmp_path: Path, vcsim: simulator.Simulator) -> None:
    run = _playbook(tmp_path, _vcenter_inventory(vcsim), "--tags", "vcenter",
                    env=_env(tmp_path, SSL_CERT_FILE=str(vcsim.cert_file)), expect_failure=True)
    assert run.count("sim", "failed") == 1
    assert "VSPHERE_AV_VCENTER_ADMIN_PASSWORD" in run.output


def test_vcenter_role_verifies_certificates_by_default(
        tmp_path: Path, vcsim: simulator.Simulator) -> None:
    # No SSL_CERT_FILE: the self-signed simulator is not trusted, and the role must not
    # quietly connect anyway.
    run = _playbook(tmp_path, _vcenter_inventory(vcsim), "--tags", "vcenter",
                    env=_env(tmp_path, VSPHERE_AV_VCENTER_ADMIN_PASSWORD=vcsim.password),
                    expect_failure=True)
    assert run.count("sim", "failed") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in run.output or "certificate verify failed" in run.output


# -- vsphere_av_controller ------------------------------------------------------------------

def _prepare_venv(venv: Path) -> None:
    """Pre-create the role's virtualenv so it sees the test venv's dependencies.

    The role reuses an existing virtualenv. This machine has no package index for the
    runtime dependencies, and a venv made from a venv inherits the *base* interpreter's
    site-packages, not the test venv's; one .pth line appends the test venv's
    site-packages to sys.path instead (plain path lines do not run that directory's own
    .pth files, so the test venv's editable vsphere-av stays out). The role then installs
    vsphere-av itself from the repository with ``--no-deps``.
    """
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib"))
    query = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", query], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
    Path(purelib, "zz-test-deps.pth").write_text(f"{site}\n", encoding="utf-8")


def _bundle(path: Path, marker: str) -> Path:
    src = path.parent / (path.name + ".d")
    shutil.rmtree(src, ignore_errors=True)
    (src / "rules").mkdir(parents=True)
    (src / "rules" / "ansible_test.yar").write_text(
        f'rule AnsibleTest_{marker} {{ strings: $a = "vsphere-av-ansible-{marker}" '
        "condition: $a }\n", encoding="utf-8")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "rules", arcname="rules")
    return path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# [access] for the controller role: a user in two roles, groups, and the sudo rules they get
# (entries in role-name order, once each).
ACCESS = {"security_admins": ["alice", "%secops"], "infrastructure_admins": ["%vi-admins"],
          "auditors": ["%audit", "alice"]}
SUDO_ENTRIES = ["%audit", "alice", "%vi-admins", "%secops"]


def _sudo_rules(path: Path) -> list[dict[str, Any]]:
    """The User_Specs of a sudoers file as sudo itself parses them (cvtsudoers, JSON)."""
    out = subprocess.run(["cvtsudoers", "-f", "json", str(path)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return list(json.loads(out)["User_Specs"])


def _sudo_spec(entry: str, *, runas: str, cli: Path) -> dict[str, Any]:
    """One rule: the person may run exactly the CLI (any arguments) as runas, password asked."""
    who = {"usergroup": entry[1:]} if entry.startswith("%") else {"username": entry}
    return {"User_List": [who], "Host_List": [{"hostname": "ALL"}],
            "Cmnd_Specs": [{"runasusers": [{"username": runas}],
                            "Commands": [{"command": str(cli)}]}]}


# Two playbook runs of up to 240 s each: the suite-wide 300 s guard cut the second run on a
# loaded machine (load 10 on 2 cores); a hang is still caught.
@pytest.mark.timeout(600)
def test_controller_role_installs_configures_and_is_idempotent(
        tmp_path: Path, vcsim_factory: SimulatorFactory) -> None:
    assert shutil.which("visudo", path=_env(tmp_path)["PATH"]), "no visudo: make system-deps"
    sim = vcsim_factory(hosts=2, vms=1, password=VC_PASSWORD)
    prefix = tmp_path / "root"
    venv = tmp_path / "venv"
    _prepare_venv(venv)
    bundle = _bundle(tmp_path / "signatures.tar.gz", "one")
    user = subprocess.run(["id", "-un"], check=True, capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], check=True, capture_output=True, text=True).stdout.strip()
    has_systemd_analyze = shutil.which("systemd-analyze") is not None
    host_vars: dict[str, Any] = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "vsphere_av_controller_prefix": str(prefix),
        "vsphere_av_controller_venv": str(venv),
        "vsphere_av_controller_source": str(REPO),
        "vsphere_av_controller_pip_extra_args": "--no-deps",
        "vsphere_av_controller_system_packages": [],      # no apt on the test machine
        "vsphere_av_controller_create_user": False,
        "vsphere_av_controller_manage_service": False,
        "vsphere_av_controller_verify_unit": has_systemd_analyze,
        "vsphere_av_controller_user": user,
        "vsphere_av_controller_group": group,
        "vsphere_av_controller_vcenter_server": sim.host,
        "vsphere_av_controller_vcenter_port": sim.port,
        "vsphere_av_controller_vcenter_user": sim.username,
        "vsphere_av_controller_vcenter_password": sim.password,
        "vsphere_av_controller_vcenter_thumbprint": sim.thumbprint.lower(),
        "vsphere_av_controller_guest_user": "root",
        "vsphere_av_controller_guest_password": GUEST_PASSWORD,
        "vsphere_av_controller_guest_credentials": [
            {"user": "Administrator", "password": WIN_PASSWORD, "vm": "win-*"}],
        "vsphere_av_controller_scan": {"action": "report", "per_host_limit": 2,
                                       "exclude": ["/var/cache"]},
        "vsphere_av_controller_appliances": {"enabled": True},
        "vsphere_av_controller_appliances_reconcile": True,
        "vsphere_av_controller_signature_bundle": str(bundle),
        "vsphere_av_controller_access": ACCESS,
    }
    inventory = {"all": {"children": {
        "vcenter": {"hosts": {}},
        "vsphere_av_controllers": {"hosts": {"localhost": host_vars}},
    }}}
    env = _env(tmp_path)

    first = _playbook(tmp_path, inventory, "--tags", "controller", env=env)
    assert first.count("localhost", "failed") == 0
    assert first.count("localhost", "changed") >= 5
    for secret in (VC_PASSWORD, GUEST_PASSWORD, WIN_PASSWORD):
        assert secret not in first.output

    second = _playbook(tmp_path, inventory, "--tags", "controller", env=env)
    assert second.count("localhost", "changed") == 0, second.output[-6000:]
    assert second.count("localhost", "failed") == 0
    # The role's own verify step ran (and would have failed the play otherwise).
    for task in ("Check the installed version", "Check that the audit log is intact",
                 "Check that the configuration file holds no secret",
                 "Check the unit file with systemd-analyze",
                 "Check the unit's exposure score"):
        skipped = task.startswith("Check the unit") and not has_systemd_analyze
        expected = "skipping" if skipped else "ok"
        assert second.status(task) == expected, task
    assert second.status("Install vsphere-av into the virtualenv") == "skipping"
    assert second.status("Import and activate the signature bundle") == "skipping"
    assert second.status("Reconcile the per-host appliances") == "ok"
    assert second.status("Let the people in [access] run the vsphere-av CLI") == "ok"
    assert second.status("Remove the sudo rules") == "skipping"

    # Check mode agrees there is nothing to do (reconcile only plans: --dry-run).
    checked = _playbook(tmp_path, inventory, "--tags", "controller", "--check", env=env)
    assert checked.count("localhost", "changed") == 0, checked.output[-6000:]

    # The package really is installed in the role's virtualenv and runs from there.
    cli = venv / "bin" / "vsphere-av"
    version = subprocess.run([str(cli), "--version"], check=True, capture_output=True,
                             text=True, timeout=60, env=env)
    assert version.stdout.strip() == "vsphere-av, version 0.1.0"
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import vsphere_av; print(vsphere_av.__file__)"],
                           check=True, capture_output=True, text=True, timeout=60, env=env,
                           cwd=tmp_path)  # not the repository: "" on sys.path would find it
    assert where.stdout.strip().startswith(str(venv))

    # Configuration: 0600, no secret in it, and it loads to exactly what was asked for.
    cfg = prefix / "etc" / "vsphere-av" / "vsphere-av.toml"
    secrets = prefix / "etc" / "vsphere-av" / "secrets"
    state = prefix / "var" / "lib" / "vsphere-av"
    assert _mode(cfg) == 0o600
    text = cfg.read_text(encoding="utf-8")
    for secret in (VC_PASSWORD, GUEST_PASSWORD, WIN_PASSWORD):
        assert secret not in text
    assert "insecure" not in text
    assert _mode(secrets) == 0o700
    assert _mode(state) == 0o700
    for name in ("vcenter.password", "guest.password", "guest-1.password"):
        assert _mode(secrets / name) == 0o600, name
    settings = config.load(config_file=cfg, env={})
    assert settings.state_dir == state
    assert (settings.vcenter.server, settings.vcenter.port) == (sim.host, sim.port)
    assert settings.vcenter.password.reveal() == sim.password
    assert settings.vcenter.thumbprint == sim.thumbprint
    assert not settings.vcenter.insecure
    assert settings.guest.for_vm(vm_name="win-7")[1].reveal() == WIN_PASSWORD
    assert settings.guest.for_vm(vm_name="web-1")[1].reveal() == GUEST_PASSWORD
    assert settings.scan.action == "report"
    assert settings.scan.per_host_limit == 2
    assert "\n[access]\n" in text
    assert settings.access.enabled
    for role, entries in ACCESS.items():
        assert list(settings.access.members(role)) == entries, role

    # sudo rules: 0440 (root's: the test runs the role as root), visudo accepts them, and
    # sudo reads exactly one rule per person: the role's CLI as the service account, with a
    # password (no NOPASSWD), nothing else.
    sudoers = prefix / "etc" / "sudoers.d" / "vsphere-av"
    assert _mode(sudoers) == 0o440
    if os.geteuid() == 0:
        assert (sudoers.stat().st_uid, sudoers.stat().st_gid) == (0, 0)
    checked_rules = subprocess.run(["visudo", "-cf", str(sudoers)], capture_output=True,
                                   text=True, timeout=60, env=env, check=False)
    assert checked_rules.returncode == 0, checked_rules.stdout + checked_rules.stderr
    rules_text = sudoers.read_text(encoding="utf-8")
    assert "NOPASSWD" not in rules_text
    assert f"ALL=({user}) {cli}\n" in rules_text
    assert _sudo_rules(sudoers) == [_sudo_spec(e, runas=user, cli=cli) for e in SUDO_ENTRIES]

    # The hardened unit (written, not started: service management is off).
    unit = (prefix / "etc" / "systemd" / "system" / "vsphere-av.service").read_text()
    assert f"ExecStart={cli} --config {cfg} serve" in unit
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", f"ReadWritePaths={state}",
                 "PrivateTmp=yes", "ProtectHome=yes", "CapabilityBoundingSet=\n",
                 f"User={user}"):
        assert line in unit, line

    # Signatures: the bundle is the active version, imported once.
    listed = json.loads(subprocess.run(
        [str(cli), "--config", str(cfg), "signatures", "list", "--json"], check=True,
        capture_output=True, text=True, timeout=60, env=env).stdout)
    ours = [v for v in listed if "/bundles/signatures-" in v["source"]]
    assert len(ours) == 1
    assert ours[0]["active"]
    assert ours[0]["rules"] == 1

    # Appliances: one per host, deployed by the first run only.
    si = connect(sim)
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.HostSystem,
                                                      vim.VirtualMachine], True)
    try:
        hosts = [o for o in view.view if isinstance(o, vim.HostSystem)]
        appliances = [o.name for o in view.view if isinstance(o, vim.VirtualMachine)
                      and o.name.startswith("vsphere-av-appliance-")]
    finally:
        view.DestroyView()
    assert sorted(appliances) == sorted(f"vsphere-av-appliance-{h.name}" for h in hosts)

    audit = json.loads(subprocess.run(
        [str(cli), "--config", str(cfg), "audit", "verify", "--json"], check=True,
        capture_output=True, text=True, timeout=60, env=env).stdout)
    assert audit["ok"]
    assert audit["entries"] > 0

    # A new bundle, and [access] emptied: the bundle is copied and imported, the
    # configuration loses [access] and the sudo rules go; nothing else changes.
    _bundle(bundle, "two")
    host_vars["vsphere_av_controller_access"] = {}
    third = _playbook(tmp_path, inventory, "--tags", "controller", env=env)
    assert third.count("localhost", "changed") == 4, third.output[-6000:]
    assert third.status("Write the configuration file") == "changed"
    assert third.status("Remove the sudo rules") == "changed"
    assert third.status("Let the people in [access] run the vsphere-av CLI") == "skipping"
    assert not sudoers.exists()
    assert "[access]" not in cfg.read_text(encoding="utf-8")
    assert not config.load(config_file=cfg, env={}).access.enabled
    listed = json.loads(subprocess.run(
        [str(cli), "--config", str(cfg), "signatures", "list", "--json"], check=True,
        capture_output=True, text=True, timeout=60, env=env).stdout)
    ours = [v for v in listed if "/bundles/signatures-" in v["source"]]
    assert len(ours) == 2
    assert ours[-1]["active"]


BAD_ACCESS = [
    # "ALL" would be everyone in a sudoers file, an all-capitals word an alias.
    ({"auditors": ["%audit", "ALL"]}, "vsphere_av_controller_access.auditors must be a list"),
    ({"security_admins": ["ADMINS"]}, "vsphere_av_controller_access.security_admins must be"),
    ({"auditors": ["al ice"]}, "vsphere_av_controller_access.auditors must be a list"),
    ({"auditors": ["%"]}, "vsphere_av_controller_access.auditors must be a list"),
    ({"auditors": "alice"}, "vsphere_av_controller_access.auditors must be a list"),
    ({"auditors": [7]}, "vsphere_av_controller_access.auditors must be a list"),
    ({"admins": ["alice"]}, "must be a mapping with only the keys"),
    (["alice"], "must be a mapping with only the keys"),
]


@pytest.mark.parametrize(("access", "message"), BAD_ACCESS, ids=[str(a) for a, _ in BAD_ACCESS])
def test_controller_role_refuses_bad_access_before_changing_anything(
        tmp_path: Path, access: Any, message: str) -> None:
    prefix = tmp_path / "root"
    inventory = {"all": {"children": {
        "vcenter": {"hosts": {}},
        "vsphere_av_controllers": {"hosts": {"localhost": {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "ansible_become": False,
            "vsphere_av_controller_prefix": str(prefix),
            "vsphere_av_controller_access": access,
        }}},
    }}}
    run = _playbook(tmp_path, inventory, "--tags", "controller", env=_env(tmp_path),
                    expect_failure=True)
    assert run.count("localhost", "failed") == 1
    assert run.count("localhost", "changed") == 0
    assert message in run.output, run.output[-3000:]
    assert not prefix.exists()
