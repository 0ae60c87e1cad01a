"""Managing deployed appliances over SSH: one real OpenSSH server and one engine service on
each appliance's own loopback address (as ``guest.ipAddress`` reports it on the simulator).

All "appliances" share this machine's file system, so they share one remote state
directory here; per-appliance file systems are covered in ``test_appliance_ssh.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from appliance_support import Sshd, appliance_settings, self_signed, start_sshd
from conftest import SimulatorFactory

from vsphere_av import config
from vsphere_av.app import App
from vsphere_av.engine import Engine
from vsphere_av.engine.remote import EngineService
from vsphere_av.fleet.health import read_health
from vsphere_av.fleet.manager import ApplianceManager, open_manager
from vsphere_av.fleet.ssh import ApplianceSsh
from vsphere_av.store.audit import AuditOnUse

TOKEN = "manage-token-0123456789abcdef"


@dataclass
class Fleet:
    manager: ApplianceManager
    app: App
    sshds: dict[str, Sshd]          # host name -> its appliance's sshd
    remote: Path
    local_engine: Engine
    services: dict[str, EngineService]   # appliance address -> its engine service
    appliance_engine: Engine
    engine_port: int


@pytest.fixture
def fleet(vcsim_factory: SimulatorFactory, tmp_path: Path) -> Iterator[Fleet]:
    sim = vcsim_factory(hosts=2, vms=2)
    remote = tmp_path / "appliance-state"
    keys = tmp_path / "keys"
    settings, port = appliance_settings(sim, tmp_path, addresses="127.0.0.91-127.0.0.99",
                                        token=TOKEN, toml=f'remote_state_dir = "{remote}"\n')
    app = App(settings, actor="tester")
    manager = open_manager(settings, connection=app.connection, audit=app.audit, actor="tester")
    assert manager.reconcile().ok
    sshds: dict[str, Sshd] = {}
    services: dict[str, EngineService] = {}
    appliance_engine = Engine.open(config.Settings(state_dir=remote), use_cache=False,
                                   audit=AuditOnUse(remote), actor="tester")
    try:
        for a in manager.appliances():
            sshds[a.host] = start_sshd(keys / a.host, a.address)   # its own host key
            svc = EngineService(engine=appliance_engine, token=TOKEN, listen=(a.address, port))
            svc.start()
            services[a.address] = svc
        first = next(iter(sshds.values()))
        for s in sshds.values():    # the fleet's one controller key is authorized everywhere
            (s.directory / "authorized_keys").write_text(
                first.client_key.with_suffix(".pub").read_text())
        by_address = {s.host: s for s in sshds.values()}

        def ssh_open(appliance: Any) -> ApplianceSsh:
            # Each test sshd has its own port; a real fleet uses appliances.ssh_port for all.
            s = by_address[appliance.address]
            return ApplianceSsh(host=s.host, port=s.port, user=s.user, key_file=first.client_key,
                                state_dir=settings.state_dir, audit=app.audit, actor="tester",
                                appliance=appliance.vm)

        manager = ApplianceManager(state_dir=settings.state_dir, settings=manager.settings,
                                   adapter=manager.adapter, audit=app.audit, actor="tester",
                                   ssh_open=ssh_open)
        yield Fleet(manager=manager, app=app, sshds=sshds, remote=remote,
                    local_engine=app.engine, services=services,
                    appliance_engine=appliance_engine, engine_port=port)
    finally:
        for svc in services.values():
            svc.shutdown()
        for s in sshds.values():
            s.stop()
        appliance_engine.close()
        app.close()


def test_push_signatures_and_health_across_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "r.yar").write_text('rule Fleet { strings: $a = "fleet-marker-xyz" '
                                  'condition: $a }\n')
    store = fleet.local_engine.store
    version = store.import_bundle(bundle).info.version
    assert version >= 2
    pushed = fleet.manager.push_signatures(version_dir=store.root / f"v{version:04d}")
    assert [c.ok for c in pushed] == [True, True], [c.reason for c in pushed]
    assert {c.signature_version for c in pushed} == {version}
    state = json.loads((fleet.remote / "signatures/state.json").read_text())
    assert state["active"] == version
    health = fleet.manager.check_health(expected_version=version)
    assert [(c.ok, c.signature_version) for c in health] == [(True, version), (True, version)]
    assert read_health(fleet.manager.state_dir) == {}


def test_changed_host_key_is_refused_and_its_vms_unprotected(fleet: Fleet) -> None:
    assert all(c.ok for c in fleet.manager.check_health())     # keys pinned at first contact
    host_name, sshd = sorted(fleet.sshds.items())[0]
    sshd.regenerate_host_key()
    results = {c.host: c for c in fleet.manager.check_health()}
    bad = results[host_name]
    assert not bad.ok
    assert "SSH host key of appliance" in bad.reason
    assert "changed" in bad.reason
    assert all(c.ok for h, c in results.items() if h != host_name)
    health = read_health(fleet.manager.state_dir)
    assert list(health.values()) == [f"appliance unhealthy: {bad.reason}"]
    actions = [e.action for e in fleet.app.audit.entries()]
    assert "appliance.ssh.host_key_mismatch" in actions
    rows = {r["name"]: r for r in fleet.app.status()}
    on_bad_host = [r for r in rows.values() if r["host"] == host_name
                   and not r["name"].startswith("vsphere-av-appliance-")]
    for row in on_bad_host:
        assert row["state"] == "unprotected"
        assert row["reason"].startswith("appliance unhealthy: SSH host key of appliance")


def test_restart_engines(fleet: Fleet, tmp_path: Path) -> None:
    marker = tmp_path / "restarts"
    fleet.manager.settings = dataclasses.replace(fleet.manager.settings,
                                                 restart_command=f"echo x >> {marker}")
    results = fleet.manager.restart_engines()
    assert [c.ok for c in results] == [True, True]
    assert marker.read_text() == "x\nx\n"


def test_serve_keeps_the_fleet_on_the_active_signature_version(fleet: Fleet,
                                                               tmp_path: Path) -> None:
    """What serve's appliance loop does each round: a new active version reaches every
    appliance without anyone running push-signatures."""
    bundle = tmp_path / "bundle2"
    bundle.mkdir()
    (bundle / "r.yar").write_text('rule Sweep { strings: $a = "sweep-marker-xyz" '
                                  'condition: $a }\n')
    store = fleet.local_engine.store
    version = store.import_bundle(bundle).info.version
    store.activate(version)
    before = fleet.manager.check_health(expected_version=version)
    assert not any(c.ok for c in before)                 # behind: unhealthy, VMs unprotected
    checks = fleet.manager.keep_signatures_current(
        version=version, version_dir=store.root / f"v{version:04d}")
    assert [(c.ok, c.signature_version) for c in checks] == [(True, version), (True, version)]
    assert json.loads((fleet.remote / "signatures/state.json").read_text())["active"] == version
    assert read_health(fleet.manager.state_dir) == {}


def test_health_of_engines_serving_tls(fleet: Fleet, tmp_path: Path) -> None:
    """Engines that serve TLS (as they must off loopback) are checked over TLS, verified
    against appliances.engine_ca_file: the route scans take."""
    certs = {}
    for address in list(fleet.services):
        fleet.services[address].shutdown()
        cert, key, _ = self_signed(tmp_path, address)
        certs[address] = cert
        svc = EngineService(engine=fleet.appliance_engine, token=TOKEN,
                            listen=(address, fleet.engine_port), tls_cert=str(cert),
                            tls_key=str(key))
        svc.start()
        fleet.services[address] = svc
    bundle = tmp_path / "engines-ca.pem"
    bundle.write_bytes(b"".join(c.read_bytes() for c in certs.values()))
    plain = fleet.manager.settings
    fleet.manager.settings = dataclasses.replace(plain, engine_ca_file=str(bundle))
    checks = fleet.manager.check_health()
    assert [(c.ok, c.reason) for c in checks] == [(True, ""), (True, "")]
    assert read_health(fleet.manager.state_dir) == {}

    # A CA file that does not vouch for one appliance's certificate: that one is unhealthy.
    trusted, untrusted = sorted(certs)
    partial = tmp_path / "partial-ca.pem"
    partial.write_bytes(certs[trusted].read_bytes())
    fleet.manager.settings = dataclasses.replace(plain, engine_ca_file=str(partial))
    results = {c.address: c for c in fleet.manager.check_health()}
    assert results[trusted].ok
    assert not results[untrusted].ok
    assert "SSLError" in results[untrusted].reason
    assert list(read_health(fleet.manager.state_dir).values()) == [
        f"appliance unhealthy: {results[untrusted].reason}"]

    # Plain HTTP against a TLS engine is no answer either.
    fleet.manager.settings = plain
    assert not any(c.ok for c in fleet.manager.check_health())
