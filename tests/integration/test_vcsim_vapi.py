"""Integration tests for the simulator's vSphere Automation API adapter (vcsim/vapi.go).

Drives ``POST /api`` (JSON-RPC 2.0) of build/vcsim with the real vSphere Automation SDK
(``create_vsphere_client``, the tagging and session stubs) over TLS verified against the
simulator's certificate file, and with raw requests for the protocol edges; checks that
``/rest`` and ``/api`` share one tag store. One simulator process for the module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from com.vmware.cis.tagging_client import CategoryModel
from com.vmware.cis_client import Session
from com.vmware.vapi.std import errors_client as vapi_errors
from com.vmware.vapi.std_client import DynamicID
from conftest import all_vms, connect
from pyVmomi import vim
from vmware.vapi.lib.connect import get_requests_connector
from vmware.vapi.security.user_password import create_user_password_security_context
from vmware.vapi.stdlib.client.factories import StubConfigurationFactory
from vmware.vapi.vsphere.client import VsphereClient, create_vsphere_client

from vsphere_av import errors
from vsphere_av.lab import simulator


@pytest.fixture(scope="module")
def vsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[simulator.Simulator]:
    """A private simulator (1 host, 2 VMs) for the module: tags are process-wide state."""
    try:
        sim = simulator.start(guest_root=Path(tmp_path_factory.mktemp("vapi-guests")),
                              hosts=1, vms=2)
    except errors.SimulatorMissing as exc:
        pytest.fail(str(exc))
    try:
        yield sim
    finally:
        sim.stop()


def http_session(sim: simulator.Simulator) -> requests.Session:
    """A requests session that trusts exactly the simulator's certificate.

    trust_env is off: otherwise REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE from the environment
    replace ``session.verify`` for every request the SDK makes.
    """
    s = requests.Session()
    s.trust_env = False
    s.verify = str(sim.cert_file)
    return s


@contextlib.contextmanager
def client_for(sim: simulator.Simulator, *, password: str | None = None,
               session_id: str | None = None) -> Iterator[VsphereClient]:
    """An SDK client logged in (or bound to ``session_id``); logged out and closed after."""
    s = http_session(sim)
    try:
        if session_id is not None:
            client = create_vsphere_client(server=f"{sim.host}:{sim.port}",
                                           session_id=session_id, session=s)
        else:
            client = create_vsphere_client(
                server=f"{sim.host}:{sim.port}", username=sim.username,
                password=sim.password if password is None else password, session=s)
        try:
            yield client
        finally:
            with contextlib.suppress(vapi_errors.Error):
                client.session_svc.delete()
    finally:
        s.close()


@pytest.fixture
def client(vsim: simulator.Simulator) -> Iterator[VsphereClient]:
    """A logged-in SDK client for one test."""
    with client_for(vsim) as c:
        yield c


@pytest.fixture(scope="module")
def vm_morefs(vsim: simulator.Simulator) -> list[str]:
    """The simulator's VM morefs, read through pyVmomi."""
    si = connect(vsim)
    return sorted(vm._moId for vm in all_vms(si))


@pytest.fixture(scope="module")
def host_moref(vsim: simulator.Simulator) -> str:
    """One host's moref, read through pyVmomi."""
    content = connect(vsim).RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
    try:
        return str(view.view[0]._moId)
    finally:
        view.DestroyView()


def new_category(client: VsphereClient, name: str, *, single: bool = True,
                 types: set[str] | None = None) -> str:
    """Create a category through /api and return its id."""
    card = CategoryModel.Cardinality.SINGLE if single else CategoryModel.Cardinality.MULTIPLE
    return str(client.tagging.Category.create(client.tagging.Category.CreateSpec(
        name=name, description=f"{name} category", cardinality=card,
        associable_types=types or set())))


def new_tag(client: VsphereClient, category_id: str, name: str) -> str:
    """Create a tag through /api and return its id."""
    return str(client.tagging.Tag.create(client.tagging.Tag.CreateSpec(
        name=name, description=f"{name} tag", category_id=category_id)))


def rpc(sim: simulator.Simulator, body: Any) -> dict[str, Any]:
    """POST one raw JSON-RPC body to /api; the HTTP status must be 200."""
    with http_session(sim) as s:
        resp = s.post(f"https://{sim.host}:{sim.port}/api", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def invoke(service: str, op: str, fields: dict[str, Any], security: dict[str, Any] | None,
           *, rpc_id: str = "7") -> dict[str, Any]:
    """A JSON-RPC invoke body in the SDK's typed form."""
    ctx: dict[str, Any] = {"appCtx": {}}
    if security is not None:
        ctx["securityCtx"] = security
    return {"jsonrpc": "2.0", "method": "invoke", "id": rpc_id, "params": {
        "serviceId": service, "operationId": op,
        "input": {"STRUCTURE": {"operation-input": fields}}, "ctx": ctx}}


def test_login_returns_a_session_the_sdk_can_use(vsim: simulator.Simulator) -> None:
    with client_for(vsim) as c:
        sid = c.get_session_id()
        assert isinstance(sid, str)
        assert len(sid) >= 16
        info = c.session_svc.get()
        assert info.user == vsim.username
        assert info.created_time <= info.last_accessed_time
        # A second client bound to the same session id works without logging in.
        with client_for(vsim, session_id=sid) as again:
            assert again.session_svc.get().user == vsim.username


def sdk_login(sim: simulator.Simulator, s: requests.Session, *, password: str) -> str:
    """Log in with the SDK's session service directly; the session id.

    Failing logins go through here, not create_vsphere_client: a VsphereClient whose
    constructor raised keeps a __del__ whose __getattr__ recurses without end when the
    garbage collector runs it later, which can abort the whole test process ("Cannot
    recover from stack overflow").
    """
    connector = get_requests_connector(session=s, url=f"https://{sim.host}:{sim.port}/api",
                                       pool_size=0)
    connector.set_security_context(
        create_user_password_security_context(sim.username, password))
    return str(Session(StubConfigurationFactory.new_std_configuration(connector)).create())


def test_wrong_password_raises_unauthenticated(vsim: simulator.Simulator) -> None:
    with http_session(vsim) as s, pytest.raises(vapi_errors.Unauthenticated) as info:
        sdk_login(vsim, s, password=vsim.password + "x")
    assert info.value.error_type == vapi_errors.Error.Type.UNAUTHENTICATED
    assert vsim.password not in str(info.value)
    with http_session(vsim) as s:
        assert len(sdk_login(vsim, s, password=vsim.password)) >= 16


def test_tls_is_verified(vsim: simulator.Simulator) -> None:
    s = requests.Session()
    s.trust_env = False  # verify=True: the system CAs, which do not know the simulator
    with pytest.raises(requests.exceptions.SSLError), s:
        sdk_login(vsim, s, password=vsim.password)


def test_category_and_tag_create_list_get(client: VsphereClient) -> None:
    cat = new_category(client, "av-state", types={"VirtualMachine"})
    assert cat in client.tagging.Category.list()
    model = client.tagging.Category.get(cat)
    assert (model.id, model.name, model.description) == (cat, "av-state", "av-state category")
    assert model.cardinality == CategoryModel.Cardinality.SINGLE
    assert model.associable_types == {"VirtualMachine"}
    assert model.used_by == set()

    tag = new_tag(client, cat, "infected")
    assert tag.startswith("urn:vmomi:InventoryServiceTag:")
    assert tag in client.tagging.Tag.list()
    assert client.tagging.Tag.list_tags_for_category(cat) == [tag]
    t = client.tagging.Tag.get(tag)
    assert (t.id, t.name, t.category_id, t.description) == (tag, "infected", cat, "infected tag")

    with pytest.raises(vapi_errors.AlreadyExists):
        new_category(client, "av-state")
    with pytest.raises(vapi_errors.AlreadyExists):
        new_tag(client, cat, "infected")
    other = new_category(client, "av-other", single=False)
    assert client.tagging.Category.get(other).cardinality == CategoryModel.Cardinality.MULTIPLE
    # The same tag name in another category is fine, as on vCenter.
    assert new_tag(client, other, "infected") != tag
    with pytest.raises(vapi_errors.NotFound):
        new_tag(client, "urn:vmomi:InventoryServiceCategory:nope:GLOBAL", "x")
    with pytest.raises(vapi_errors.InvalidArgument):
        new_tag(client, cat, "")


def test_unknown_ids_raise_not_found(client: VsphereClient) -> None:
    bogus = "urn:vmomi:InventoryServiceTag:00000000-0000-0000-0000-000000000000:GLOBAL"
    with pytest.raises(vapi_errors.NotFound) as info:
        client.tagging.Tag.get(bogus)
    assert bogus in info.value.messages[0].default_message
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.Tag.delete(bogus)
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.Category.get("no/such/category")
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.Tag.list_tags_for_category("urn:vmomi:InventoryServiceCategory:x:GLOBAL")
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.TagAssociation.attach(
            tag_id=bogus, object_id=DynamicID(type="VirtualMachine", id="vm-1"))
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.TagAssociation.list_attached_objects(bogus)


def test_attach_list_detach_on_a_real_vm(client: VsphereClient, vm_morefs: list[str],
                                        host_moref: str) -> None:
    vm0, vm1 = vm_morefs[:2]
    assoc = client.tagging.TagAssociation
    cat = new_category(client, "scan-result", types={"VirtualMachine"})
    infected, clean = new_tag(client, cat, "infected"), new_tag(client, cat, "clean")
    target = DynamicID(type="VirtualMachine", id=vm0)

    assert assoc.list_attached_tags(target) == []
    assoc.attach(tag_id=infected, object_id=target)
    assoc.attach(tag_id=infected, object_id=target)  # again: no change, no error
    assert assoc.list_attached_tags(target) == [infected]
    assert assoc.list_attached_tags(DynamicID(type="VirtualMachine", id=vm1)) == []
    objects = assoc.list_attached_objects(infected)
    assert [(o.type, o.id) for o in objects] == [("VirtualMachine", vm0)]
    assert isinstance(objects[0], DynamicID)

    # SINGLE cardinality: a second tag of the category on the same VM is refused.
    with pytest.raises(vapi_errors.InvalidArgument) as info:
        assoc.attach(tag_id=clean, object_id=target)
    assert "cardinality" in info.value.messages[0].default_message
    # The category only takes VMs; a host is refused; a VM that does not exist is not found.
    with pytest.raises(vapi_errors.InvalidArgument):
        assoc.attach(tag_id=clean, object_id=DynamicID(type="HostSystem", id=host_moref))
    with pytest.raises(vapi_errors.NotFound):
        assoc.attach(tag_id=clean, object_id=DynamicID(type="VirtualMachine", id="vm-99999"))

    assoc.detach(tag_id=infected, object_id=target)
    assert assoc.list_attached_tags(target) == []
    assert assoc.list_attached_objects(infected) == []
    assoc.attach(tag_id=clean, object_id=target)  # after the detach the other tag fits
    assert assoc.list_attached_tags(target) == [clean]

    # Deleting the category deletes its tags and their associations.
    client.tagging.Category.delete(cat)
    assert assoc.list_attached_tags(target) == []
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.Tag.get(clean)
    with pytest.raises(vapi_errors.NotFound):
        client.tagging.Category.delete(cat)


def test_calls_without_a_valid_session_raise_unauthenticated(
        vsim: simulator.Simulator, client: VsphereClient) -> None:
    with client_for(vsim, session_id="not-a-session") as stale, \
            pytest.raises(vapi_errors.Unauthenticated):
        stale.tagging.Tag.list()
    # No security context at all (raw JSON-RPC).
    reply = rpc(vsim, invoke("com.vmware.cis.tagging.tag", "list", {}, None))
    assert list(reply["result"]["error"]["ERROR"]) == ["com.vmware.vapi.std.errors.unauthenticated"]
    assert reply["id"] == "7"
    # A session that was logged out no longer works.
    with client_for(vsim) as c:
        c.session_svc.delete()
        with pytest.raises(vapi_errors.Unauthenticated):
            c.tagging.Category.list()
    assert client.tagging.Category.list() is not None  # other sessions are unaffected


def test_rest_and_api_share_the_tag_store(vsim: simulator.Simulator, client: VsphereClient,
                                          vm_morefs: list[str]) -> None:
    base = f"https://{vsim.host}:{vsim.port}/rest/com/vmware/cis"
    with http_session(vsim) as s:
        wrong = s.post(f"{base}/session", auth=(vsim.username, "wrong"), timeout=10)
        assert wrong.status_code == 401  # the /rest login checks the password too
        resp = s.post(f"{base}/session", auth=(vsim.username, vsim.password), timeout=10)
        resp.raise_for_status()
        s.headers["vmware-api-session-id"] = resp.json()["value"]
        cat = s.post(f"{base}/tagging/category", timeout=10, json={"create_spec": {
            "name": "from-rest", "description": "", "cardinality": "MULTIPLE",
            "associable_types": []}}).json()["value"]
        tag = s.post(f"{base}/tagging/tag", timeout=10, json={"create_spec": {
            "name": "rest-tag", "description": "made over /rest", "category_id": cat}}
        ).json()["value"]

        assert tag in client.tagging.Tag.list()
        got = client.tagging.Tag.get(tag)
        assert (got.name, got.category_id, got.description) == ("rest-tag", cat, "made over /rest")
        assert client.tagging.Category.get(cat).cardinality == CategoryModel.Cardinality.MULTIPLE

        # And back: attached through /api, seen through /rest.
        client.tagging.TagAssociation.attach(
            tag_id=tag, object_id=DynamicID(type="VirtualMachine", id=vm_morefs[0]))
        seen = s.post(f"{base}/tagging/tag-association?~action=list-attached-tags", timeout=10,
                      json={"object_id": {"type": "VirtualMachine", "id": vm_morefs[0]}})
        assert tag in seen.json()["value"]
        s.delete(f"{base}/session", timeout=10).raise_for_status()


def test_unsupported_and_malformed_requests(vsim: simulator.Simulator,
                                            client: VsphereClient) -> None:
    with pytest.raises(vapi_errors.OperationNotFound):
        client.tagging.Tag.update(
            "urn:vmomi:InventoryServiceTag:x:GLOBAL", client.tagging.Tag.UpdateSpec(name="n"))
    sid = client.get_session_id()
    session = {"schemeId": "com.vmware.vapi.std.security.session_id", "sessionId": sid}
    reply = rpc(vsim, invoke("com.vmware.vcenter.vm", "list", {}, session, rpc_id="x1"))
    assert reply["id"] == "x1"
    assert list(reply["result"]["error"]["ERROR"]) == [
        "com.vmware.vapi.std.errors.operation_not_found"]
    # A DynamicID that is not a structure, and input nested too deep: invalid_argument.
    reply = rpc(vsim, invoke("com.vmware.cis.tagging.tag_association", "list_attached_tags",
                             {"object_id": "vm-1"}, session))
    assert list(reply["result"]["error"]["ERROR"]) == [
        "com.vmware.vapi.std.errors.invalid_argument"]
    deep: Any = "x"
    for _ in range(40):
        deep = {"OPTIONAL": deep}
    reply = rpc(vsim, invoke("com.vmware.cis.tagging.tag", "get", {"tag_id": deep}, session))
    assert list(reply["result"]["error"]["ERROR"]) == [
        "com.vmware.vapi.std.errors.invalid_argument"]
    # Protocol errors are JSON-RPC error objects (still HTTP 200).
    with http_session(vsim) as s:
        bad = s.post(f"https://{vsim.host}:{vsim.port}/api", data=b"{not json", timeout=10,
                     headers={"Content-Type": "application/json"})
        assert bad.status_code == 200
        assert bad.json()["error"]["code"] == -32700
        assert s.get(f"https://{vsim.host}:{vsim.port}/api", timeout=10).status_code == 405
    reply = rpc(vsim, {"jsonrpc": "2.0", "method": "frob", "id": "3", "params": {}})
    assert reply["error"]["code"] == -32601
    # The simulator still serves after all of that.
    assert isinstance(client.tagging.Category.list(), list)
