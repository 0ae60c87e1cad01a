"""``appliances upgrade`` against the bundled simulator: host by host, deploy the new image
beside the old appliance, check it healthy, move the work, remove the old one.

Real parts: the simulator (ImportVApp + NFC upload of each OVA's VMDK, built here as in
``test_appliance_ova.py``), one real OpenSSH server and one engine service per appliance
address (127.0.0.N, as ``guest.ipAddress`` reports it on the simulator, the way the other
appliance tests run them), real YARA, real state and audit files. The pool is
127.0.0.91-94: the first two appliances take .91 and .92; an upgrade's new appliance takes
the first free address, so host H0's replacement gets .93 and, once the old .91 is gone,
H1's replacement gets .91 again (its pinned SSH host key is forgotten with the old VM).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from appliance_support import EICAR, Sshd, free_port, start_sshd
from click.testing import CliRunner
from conftest import SimulatorFactory, env_for, plant, settings_for
from test_appliance_ova import build_ova

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.cli import main
from vsphere_av.engine import Engine
from vsphere_av.engine.remote import EngineClient, EngineService
from vsphere_av.fleet.image import IMAGE_KEY, file_sha256
from vsphere_av.fleet.manager import ApplianceManager, open_manager
from vsphere_av.store.audit import AuditOnUse
from vsphere_av.vsphere import inventory

TOKEN = "upgrade-token-0123456789abcdef"
ADDRESSES = ["127.0.0.91", "127.0.0.92", "127.0.0.93", "127.0.0.94"]


@dataclass
class Site:
    sim: Any
    tmp: Path
    toml: Path
    port: int                       # engine port, the same on every address
    ssh_port: int
    ova_v1: Path
    ova_v2: Path
    engine: Engine                  # what every "appliance" engine serves from
    sshds: dict[str, Sshd] = field(default_factory=dict)
    services: dict[str, EngineService] = field(default_factory=dict)

    def settings(self, ova: Path, *, extra: str = "") -> config.Settings:
        self.toml.write_text(self._body(ova, extra), encoding="utf-8")
        return settings_for(self.sim, self.tmp / "state", toml=self._body(ova, extra))

    def _body(self, ova: Path, extra: str) -> str:
        first = next(iter(self.sshds.values()))
        return (f'[appliances]\nenabled = true\nova = "{ova}"\n'
                f'addresses = ["127.0.0.91-127.0.0.94"]\nengine_port = {self.port}\n'
                f'engine_token_file = "{self.tmp / "engine.token"}"\n'
                f'ssh_user = "{first.user}"\nssh_port = {self.ssh_port}\n'
                f'ssh_key_file = "{first.client_key}"\n'
                f'remote_state_dir = "{self.tmp / "appliance-state"}"\n{extra}')

    def serve(self, address: str) -> EngineService:
        """Start the engine service of the appliance at ``address`` (its boot, here)."""
        svc = EngineService(engine=self.engine, token=TOKEN, listen=(address, self.port))
        svc.start()
        self.services[address] = svc
        return svc

    def scans(self, address: str) -> int:
        return int(EngineClient(self.services[address].url, token=TOKEN).health()["scans_total"])


@pytest.fixture
def site(vcsim_factory: SimulatorFactory, tmp_path: Path) -> Iterator[Site]:
    sim = vcsim_factory(hosts=2, vms=2)
    (tmp_path / "engine.token").write_text(TOKEN)
    ova_v1, _ = build_ova(tmp_path / "v1")
    ova_v2, _ = build_ova(tmp_path / "v2", disk_text=b"version two of the appliance\n")
    port = free_port(ADDRESSES[0])
    ssh_port = next(p for p in iter(lambda: free_port(ADDRESSES[0]), 0) if p != port)
    engine = Engine.open(config.Settings(state_dir=tmp_path / "appliance-state"),
                         use_cache=False, audit=AuditOnUse(tmp_path / "appliance-state"),
                         actor="tester")
    s = Site(sim=sim, tmp=tmp_path, toml=tmp_path / "config.toml", port=port,
             ssh_port=ssh_port, ova_v1=ova_v1, ova_v2=ova_v2, engine=engine)
    try:
        for address in ADDRESSES:     # every address an appliance may get answers SSH
            s.sshds[address] = start_sshd(tmp_path / "keys" / address, address, ssh_port)
        first = next(iter(s.sshds.values()))
        for sshd in s.sshds.values():    # the controller's one key is authorized everywhere
            (sshd.directory / "authorized_keys").write_text(
                first.client_key.with_suffix(".pub").read_text())
        yield s
    finally:
        for svc in s.services.values():
            svc.shutdown()
        for sshd in s.sshds.values():
            sshd.stop()
        engine.close()


def _manager(app: App) -> ApplianceManager:
    return open_manager(app.settings, connection=app.connection, audit=app.audit,
                        actor="tester")


def _deploy_v1(site: Site) -> dict[str, Any]:
    """Reconcile on image v1 and start the two appliances' engines: host name -> appliance."""
    with App(site.settings(site.ova_v1), actor="tester") as app:
        manager = _manager(app)
        assert manager.reconcile().ok
        apps = {a.host: a for a in manager.appliances()}
    assert sorted(a.address for a in apps.values()) == ADDRESSES[:2]
    for a in apps.values():
        site.serve(a.address)
    return apps


def test_upgrade_replaces_each_host_and_moves_its_scans(site: Site) -> None:
    old = _deploy_v1(site)
    v2 = "sha256:" + file_sha256(site.ova_v2)
    settings = site.settings(site.ova_v2)
    seen: list[tuple[str, str, list[str]]] = []   # (host, address scans go to, reconcile plan)

    with App(settings, actor="tester") as app:
        manager = _manager(app)
        dry = manager.upgrade(dry_run=True)
        assert [(s.kind, s.host, s.new_vm) for s in dry.steps] == [
            ("replace", "DC0_C0_H0", f"vsphere-av-appliance-DC0_C0_H0-{v2[7:15]}"),
            ("replace", "DC0_C0_H1", f"vsphere-av-appliance-DC0_C0_H1-{v2[7:15]}")]
        assert {a.vm_id for a in manager.appliances()} == {a.vm_id for a in old.values()}
        assert all(c.ok for c in manager.check_health())    # SSH host keys pinned (serve)

        def booting(_seconds: float) -> None:
            """Called while the new appliance is not healthy yet: the old one still serves
            its host, reconcile leaves both alone; then the new one's engine comes up."""
            standby = next(a for a in manager.appliances() if a.standby)
            engine = manager.engine_for_host(standby.host_id)
            plan = [f"{a.kind} {a.vm}" for a in manager.reconcile(dry_run=True).actions]
            seen.append((standby.host, engine.client.base_url, plan))
            if standby.address not in site.services:
                site.serve(standby.address)
                # The address .91 goes to H1's new appliance later, with another host key
                # than the H0 appliance pinned there: only forgetting that pin lets it in.
                site.sshds["127.0.0.91"].regenerate_host_key()

        result = manager.upgrade(sleep=booting)
    assert result.ok, [o.reason for o in result.outcomes]
    assert [(o.step.host, o.status) for o in result.outcomes] == [
        ("DC0_C0_H0", "replaced"), ("DC0_C0_H1", "replaced")]
    # H0's new appliance (.93) had to boot: meanwhile its host's scans went to the old .91.
    assert seen[0][0] == "DC0_C0_H0"
    assert seen[0][1].endswith(f"127.0.0.91:{site.port}")
    assert all(plan == [] for _, _, plan in seen)
    assert all(o.move_seconds is not None and o.move_seconds < 30 for o in result.outcomes)

    with App(settings, actor="tester") as app:
        manager = _manager(app)
        apps = {a.host: a for a in manager.appliances()}
        assert set(apps) == {"DC0_C0_H0", "DC0_C0_H1"}
        assert {a.vm_id for a in apps.values()}.isdisjoint(a.vm_id for a in old.values())
        assert apps["DC0_C0_H0"].address == "127.0.0.93"
        assert apps["DC0_C0_H1"].address == "127.0.0.91"     # freed by H0's old appliance
        assert not any(a.standby for a in apps.values())
        observed = manager.adapter.observe()
        assert {a.extra_config[IMAGE_KEY] for a in observed.appliances} == {v2}
        assert len(observed.appliances) == 2
        assert manager.reconcile().actions == ()             # pinned, hardened, running
        again = manager.upgrade()
        assert [(o.step.kind, o.step.reason) for o in again.outcomes] == [
            ("skip", "already on the image")] * 2
        assert all(c.ok for c in manager.check_health()), manager.check_health()

        # The work moved: a scan of a VM on H0 goes to H0's new appliance.
        vms = {v.name: v for v in inventory.list_vms(app.connection)}
        vm = next(v for v in vms.values() if v.host and v.host.name == "DC0_C0_H0"
                  and not v.name.startswith("vsphere-av-appliance-"))
        plant(site.sim, vm.name, "/tmp/eicar.com", EICAR)
        before = site.scans("127.0.0.93")
        found = app.scan_one(vm, full=True)
        assert found.status == "infected", found.reason
        assert site.scans("127.0.0.93") - before == found.scanned

        actions = [e.action for e in app.audit.entries()]
        assert actions.count("appliance.upgrade.replaced") == 2
        for step in ("started", "deployed", "healthy", "finished"):
            assert f"appliance.upgrade.{step}" in actions
        forgotten = [e for e in app.audit.entries()
                     if e.action == "appliance.ssh.host_key_forgotten"]
        assert [e.details["address"] for e in forgotten] == ["127.0.0.91", "127.0.0.92"]
        replaced = [e for e in app.audit.entries() if e.action == "appliance.upgrade.replaced"]
        assert [e.details["old_vm_id"] for e in replaced] == [
            old["DC0_C0_H0"].vm_id, old["DC0_C0_H1"].vm_id]
        assert all(e.details["image"] == v2 for e in replaced)
        assert app.audit.verify().ok


def _cli(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_a_new_appliance_that_never_gets_healthy_is_removed_and_the_old_one_kept(
        site: Site) -> None:
    old = _deploy_v1(site)
    site.settings(site.ova_v2, extra="upgrade_timeout = 2\n")   # nothing serves on .93
    env = env_for(site.sim, site.tmp / "state", VSPHERE_AV_CONFIG=str(site.toml))

    dry = _cli(env, "appliances", "upgrade", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.output)
    assert planned["dry_run"] is True
    assert [h["kind"] for h in planned["hosts"]] == ["replace", "replace"]

    result = _cli(env, "appliances", "upgrade", "--json")
    assert result.exit_code == 2, result.output
    document = json.loads(result.output)
    assert document["ok"] is False
    h0, h1 = document["hosts"]
    assert h0["status"] == "failed"
    assert h0["reason"].startswith("new appliance not healthy within 2 s: ")
    assert h1["status"] == "not attempted"
    assert h1["reason"] == "stopped after the failure on DC0_C0_H0"

    with App(site.settings(site.ova_v2), actor="tester") as app:
        manager = _manager(app)
        apps = manager.appliances()
        assert {a.vm_id for a in apps} == {a.vm_id for a in old.values()}   # both kept
        assert all(a.powered_on and not a.standby for a in apps)
        assert manager.down_hosts() == {}
        failed = [e for e in app.audit.entries() if e.action == "appliance.upgrade.failed"]
        assert len(failed) == 1
        assert failed[0].details["kept"] == old["DC0_C0_H0"].vm
        assert failed[0].details["new_vm_id"] == h0["new_vm_id"]
        assert not [e for e in app.audit.entries() if e.action == "appliance.upgrade.replaced"]
        # The old appliance never stopped serving: its host's scans still go to it.
        engine = manager.engine_for_host(old["DC0_C0_H0"].host_id)
        assert engine.client.base_url.endswith(f"127.0.0.91:{site.port}")

    people = _cli(env, "appliances", "upgrade", "--dry-run")
    assert people.exit_code == 0
    assert "DC0_C0_H0" in people.output
    assert "replace" in people.output


def test_upgrade_refuses_the_template_source(site: Site) -> None:
    settings = site.settings(site.ova_v1, extra='source = "template"\ntemplate = "x"\n')
    env = env_for(site.sim, site.tmp / "state", VSPHERE_AV_CONFIG=str(site.toml))
    result = _cli(env, "appliances", "upgrade", "--dry-run")
    assert result.exit_code == 2
    assert "appliances upgrade needs an image" in result.output
    assert settings.appliances.source == "template"
