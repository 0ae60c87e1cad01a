"""vSphere tags on infected VMs, against the bundled simulator's Automation API (``/api``).

Real parts only: the simulator serves JSON-RPC ``/api`` (vcsim/vapi.go) over the same TLS
listener as ``/sdk``; the product tags through the vSphere Automation SDK; the checks below
read the tags back through the SDK on their own session, trusting the simulator's
certificate file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import requests
from com.vmware.cis.tagging_client import Category, Tag, TagAssociation
from com.vmware.cis_client import Session
from com.vmware.vapi.std_client import DynamicID
from conftest import plant, settings_for
from vmware.vapi.lib.connect import get_requests_connector
from vmware.vapi.security.session import create_session_security_context
from vmware.vapi.security.user_password import create_user_password_security_context
from vmware.vapi.stdlib.client.factories import StubConfigurationFactory

from vsphere_av import errors
from vsphere_av.app import App
from vsphere_av.config import Secret, TaggingSettings
from vsphere_av.store.audit import AuditLog
from vsphere_av.vsphere import inventory
from vsphere_av.vsphere.connection import TlsTrust
from vsphere_av.vsphere.tagging import Tagging

pytestmark = pytest.mark.vcsim(hosts=1, vms=2)

EICAR = (b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*")
VM0, VM1 = "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"
TOML = ('[tagging]\nenabled = true\n[scan]\naction = "report"\nfallback_action = ""\n'
        'linux_roots = ["/t"]\n')


class Reader:
    """An independent Automation API session that reads tags back (not the product's code)."""

    def __init__(self, sim) -> None:
        self.http = requests.Session()
        self.http.trust_env = False          # REQUESTS_CA_BUNDLE would replace verify
        self.http.verify = str(sim.cert_file)
        connector = get_requests_connector(session=self.http,
                                           url=f"https://{sim.host}:{sim.port}/api", pool_size=0)
        connector.set_security_context(
            create_user_password_security_context(sim.username, sim.password))
        self.stub = StubConfigurationFactory.new_std_configuration(connector)
        connector.set_security_context(create_session_security_context(
            Session(self.stub).create()))

    def tags_of(self, moref: str) -> set[str]:
        tags, categories = Tag(self.stub), Category(self.stub)
        out = set()
        for tid in TagAssociation(self.stub).list_attached_tags(
                DynamicID(type="VirtualMachine", id=moref)):
            tag = tags.get(tid)
            out.add(f"{categories.get(tag.category_id).name}/{tag.name}")
        return out

    def set_tag(self, moref: str, *, on: bool) -> None:
        """Attach or detach vsphere-av/infected by hand, as an administrator in vCenter would."""
        (category,) = self.categories_named("vsphere-av")
        tags = Tag(self.stub)
        (tag_id,) = [t for t in tags.list_tags_for_category(category.id)
                     if tags.get(t).name == "infected"]
        target = DynamicID(type="VirtualMachine", id=moref)
        if on:
            TagAssociation(self.stub).attach(tag_id=tag_id, object_id=target)
        else:
            TagAssociation(self.stub).detach(tag_id=tag_id, object_id=target)

    def categories_named(self, name: str) -> list:
        categories = Category(self.stub)
        return [c for c in (categories.get(i) for i in categories.list()) if c.name == name]

    def close(self) -> None:
        Session(self.stub).delete()
        self.http.close()


@pytest.fixture
def reader(sim):
    r = Reader(sim)
    yield r
    r.close()


def _tag_actions(state: Path) -> list[tuple[str, str]]:
    with AuditLog.open(state) as log:
        return [(e.action, e.details["vm"]) for e in log.entries() if e.action.startswith("tag.")]


def test_infected_vm_carries_the_tag_until_a_clean_scan(sim, reader, tmp_path):
    bad = plant(sim, VM0, "/t/eicar.com", EICAR)
    plant(sim, VM1, "/t/fine.txt", b"nothing here")
    state = tmp_path / "state"
    settings = settings_for(sim, state, toml=TOML)
    with App(settings) as app:
        report = app.scan(all_vms=True)
        assert {r.vm: r.status for r in report.results} == {VM0: "infected", VM1: "clean"}
        moref = {vm.name: vm.moref for vm in inventory.list_vms(app.connection)}
    assert reader.tags_of(moref[VM0]) == {"vsphere-av/infected"}
    assert reader.tags_of(moref[VM1]) == set()
    (category,) = reader.categories_named("vsphere-av")
    assert str(category.cardinality) == "SINGLE"
    assert _tag_actions(state) == [("tag.attached", VM0)]

    # Still infected (report only): the tag stays, nothing is written again.
    with App(settings) as app:
        app.scan(names=[VM0])
    assert reader.tags_of(moref[VM0]) == {"vsphere-av/infected"}
    assert _tag_actions(state) == [("tag.attached", VM0)]

    # Cleaned by hand, rescanned clean: the tag comes off; the category is reused.
    bad.unlink()
    with App(settings) as app:
        (result,) = app.scan(names=[VM0], full=True).results
        assert result.status == "clean"
    assert reader.tags_of(moref[VM0]) == set()
    assert _tag_actions(state) == [("tag.attached", VM0), ("tag.detached", VM0)]
    assert len(reader.categories_named("vsphere-av")) == 1


def test_tagging_is_off_unless_enabled(sim, reader, tmp_path):
    plant(sim, VM0, "/t/eicar.com", EICAR)
    settings = settings_for(sim, tmp_path / "state",
                            toml='[scan]\naction = "report"\nlinux_roots = ["/t"]\n')
    with App(settings) as app:
        (result,) = app.scan(names=[VM0]).results
        assert result.status == "infected"
        assert app.tagging is None
    assert reader.categories_named("vsphere-av") == []
    assert _tag_actions(tmp_path / "state") == []


def test_wrong_password_is_a_clear_error_and_never_changes_the_scan(sim, reader, tmp_path):
    settings = settings_for(sim, tmp_path / "state", toml=TOML)
    wrong = Tagging(vcenter=dataclasses.replace(settings.vcenter,
                                                password=Secret("not-the-password")),
                    trust=TlsTrust(ca_file=str(sim.cert_file)),
                    settings=TaggingSettings(enabled=True))
    with pytest.raises(errors.VsphereError, match="rejected the login for the Automation API"):
        wrong.tag_id()
    assert "not-the-password" not in repr(wrong)
    wrong.close()

    impostor = Tagging(vcenter=settings.vcenter, trust=TlsTrust(thumbprint=":".join(["AB"] * 32)),
                       settings=TaggingSettings(enabled=True))
    with pytest.raises(errors.TlsVerificationError, match="thumbprint"):
        impostor.tag_id()
    impostor.close()

    # In scans, tagging trouble is audited once (not once per VM or per scan) and the
    # scans' verdicts stand.
    plant(sim, VM0, "/t/eicar.com", EICAR)
    plant(sim, VM1, "/t/eicar.com", EICAR)
    with App(settings) as app:
        app._tagging = wrong        # the App's Automation API session, with a bad password
        results = app.scan(all_vms=True).results
        assert [r.status for r in results] == ["infected", "infected"]
        app.scan(names=[VM0])
        with pytest.raises(errors.VsphereError, match="tag resync"):
            app.resync_tags()
    assert [a for a, _ in _tag_actions(tmp_path / "state")] == ["tag.failed"]


def test_serve_resync_repairs_tags_changed_by_hand(sim, reader, tmp_path):
    plant(sim, VM0, "/t/eicar.com", EICAR)
    settings = settings_for(sim, tmp_path / "state", toml=TOML)
    with App(settings) as app:
        app.scan(all_vms=True)
        moref = {vm.name: vm.moref for vm in inventory.list_vms(app.connection)}
        assert reader.tags_of(moref[VM0]) == {"vsphere-av/infected"}
        assert app.resync_tags() == {"attached": 0, "detached": 0}     # nothing to repair

        reader.set_tag(moref[VM0], on=False)      # someone took it off the infected VM
        reader.set_tag(moref[VM1], on=True)       # and put it on a clean one
        assert app.resync_tags() == {"attached": 1, "detached": 1}
    assert reader.tags_of(moref[VM0]) == {"vsphere-av/infected"}
    assert reader.tags_of(moref[VM1]) == set()
    assert _tag_actions(tmp_path / "state") == [
        ("tag.attached", VM0), ("tag.attached", VM0), ("tag.detached", VM1)]
