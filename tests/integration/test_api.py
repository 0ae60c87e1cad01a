"""The console's REST API (issue 14): tokens, roles, every endpoint's success and refusal.

Real parts: the bundled simulator serves vCenter and the guests (EICAR planted, scanned and
quarantined by the real engine through ``App``), the state store, audit log and token
store are real SQLite files, and the API is the real FastAPI application, driven through
Starlette's TestClient (in process) or a real uvicorn on 127.0.0.1 (event stream, metrics).
The CLI's ``--json`` outputs are read from the real command to compare shapes.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient

from vsphere_av import config, errors
from vsphere_av.api import ApiServer
from vsphere_av.api.server import BodyLimit, create_app
from vsphere_av.api.tokens import TokenStore
from vsphere_av.app import App, access
from vsphere_av.lab import simulator
from vsphere_av.store.audit import AuditLog

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
VM0, VM1 = "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"
ROLES = ("security_admin", "infrastructure_admin", "auditor")


def env_for(sim: simulator.Simulator, state: Path) -> dict[str, str]:
    return {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
            "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
            "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password}


class Console:
    """A scanned fleet, a token per role (and a revoked one), a TestClient on the API."""

    def __init__(self, sim: simulator.Simulator, state: Path) -> None:
        self.sim = sim
        self.state = state
        self.env = env_for(sim, state)
        self.settings = config.load(env=self.env)
        self.store = TokenStore(state_dir=state)
        self.tokens = {role: self.store.create(name=f"{role}-bot", role=role, actor="tester")
                       for role in ROLES}
        self.store.create(name="old", role="security_admin", actor="tester")
        self.revoked = self.store.create(name="gone", role="security_admin", actor="tester")
        self.store.revoke("gone", actor="tester")
        self.client = TestClient(BodyLimit(create_app(settings=self.settings, tokens=self.store,
                                                      loopback=True),
                                           limit=self.settings.api.max_body))

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def cli_json(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "vsphere_av", *args, "--json"],
                             env={**os.environ, **self.env}, capture_output=True, text=True,
                             timeout=120, check=False)
        assert out.returncode in (0, 1), out.stderr
        return json.loads(out.stdout)

    def snapshot(self) -> dict[str, Any]:
        """What a refused request must not change."""
        with App(self.settings) as app:
            items = app.quarantine_list()
            detections = app.detections()
        with AuditLog.open(self.state) as log:
            entries = [e.action for e in log.entries() if e.action != "access.denied"]
        from vsphere_av.engine.signatures import SignatureStore
        return {"items": items, "detections": detections, "audit": entries,
                "active": SignatureStore(state_dir=self.state).active_version(),
                "guest": sorted(str(p.relative_to(self.sim.guest_root))
                                for p in self.sim.guest_root.rglob("*") if p.is_file())}


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if not simulator.binary_path().exists():
        pytest.fail("build/vcsim missing: run make vcsim")
    sim = simulator.start(guest_root=tmp_path_factory.mktemp("guests"))
    try:
        for i in range(3):
            target = sim.guest_root / VM0 / "home" / "bob" / f"dropper{i}.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(EICAR)
        state = tmp_path_factory.mktemp("api") / "state"
        console = Console(sim, state)
        with App(console.settings) as app:
            report = app.scan(all_vms=True)
        assert sum(len(r.found) for r in report.results) == 3
        yield console
        console.store.close()
    finally:
        sim.stop()


def item_ids(console: Console) -> list[str]:
    with App(console.settings) as app:
        return [i["id"] for i in app.quarantine_list()]


# -- the refusal table: every route, without a token, with a bad one, with a role that may not


def sample_path(path: str) -> str:
    return (path.replace("{moref}", "vm-1").replace("{item_id}", "nosuchitem")
            .replace("{request_id}", "1").replace("{version}", "1"))


ROUTES = sorted(access.API_ROUTES)


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_refuses_a_missing_malformed_or_revoked_token(console, method, path):
    before = console.snapshot()
    url = sample_path(path)
    if path == "/metrics":            # loopback: no token needed (tested below off loopback)
        assert console.client.request(method, url).status_code == 200
        return
    for headers in ({}, {"Authorization": "Bearer vsav_wrong"},
                    {"Authorization": f"Basic {console.tokens['auditor']}"},
                    {"Authorization": f"Bearer {console.revoked}"}):
        response = console.client.request(method, url, headers=headers,
                                          follow_redirects=False)
        if method == "GET" and not path.startswith("/api/"):
            assert response.status_code in (303, 401), (path, headers)   # pages: to /login
            if response.status_code == 303:
                assert response.headers["location"] == "/login"
            continue
        assert response.status_code == 401, (path, headers, response.text)
        assert "error" in response.json()
        assert response.headers["www-authenticate"] == "Bearer"
    assert console.snapshot() == before


@pytest.mark.parametrize(("method", "path", "role"),
                         [(m, p, r) for m, p in ROUTES for r in ROLES
                          if not access.may_run(access.API_ROUTES[(m, p)],
                                                {"security_admin": access.SECURITY,
                                                 "infrastructure_admin": access.INFRASTRUCTURE,
                                                 "auditor": access.AUDITOR}[r])])
def test_a_role_that_may_not_is_refused_403_and_audited(console, method, path, role):
    before = console.snapshot()
    response = console.client.request(method, sample_path(path), headers=console.auth(role),
                                      json={} if method == "POST" else None)
    assert response.status_code == 403, response.text
    assert "not allowed to role" in response.json()["error"]
    assert console.snapshot() == before
    with AuditLog.open(console.state) as log:
        last = list(log.entries())[-1]
    assert (last.action, last.actor) == ("access.denied", f"api:{role}-bot")
    assert last.details["command"] == access.API_ROUTES[(method, path)]


def test_the_map_names_exactly_the_routes_served(console):
    app = create_app(settings=console.settings, tokens=console.store, loopback=True)
    served = {(m, r.path) for r in app.routes for m in getattr(r, "methods", None) or ()
              if m != "HEAD"}
    served.discard(("GET", "/api/v1/openapi.json"))
    assert served - access.PUBLIC_ROUTES == set(access.API_ROUTES)
    assert set(access.API_ROUTES.values()) <= set(access.COMMANDS)


# -- bad input: 4xx with a JSON error, nothing changes ---------------------------------------

BAD = [
    ("POST", "/api/v1/scans", {"content": b"{not json", "headers": {
        "Content-Type": "application/json"}}, 400),
    ("POST", "/api/v1/scans", {"json": {"vms": [VM1], "fast": True}}, 422),
    ("POST", "/api/v1/scans", {"json": {"vms": [VM1], "full": "yes"}}, 422),
    ("POST", "/api/v1/scans", {"json": {"vms": []}}, 422),
    ("POST", "/api/v1/scans", {"json": {"vms": VM1}}, 422),
    ("POST", "/api/v1/scans", {"json": [VM1]}, 422),
    ("POST", "/api/v1/scans", {"json": {"vms": ["no-such-vm"]}}, 404),
    ("POST", "/api/v1/scans", {"content": b'{"vms": ["' + b"x" * 70000 + b'"]}',
                               "headers": {"Content-Type": "application/json"}}, 413),
    ("GET", "/api/v1/scans/999999", {}, 404),
    ("GET", "/api/v1/scans/abc", {}, 422),
    ("GET", "/api/v1/vms/vm-99999", {}, 404),
    ("POST", "/api/v1/quarantine/nosuchitem/restore", {}, 404),
    ("POST", "/api/v1/quarantine/ITEM/restore", {"json": {"force": True, "x": 1}}, 422),
    ("POST", "/api/v1/quarantine/ITEM/restore", {"json": {"force": "yes"}}, 422),
    ("DELETE", "/api/v1/quarantine/nosuchitem", {}, 404),
    ("POST", "/api/v1/signatures/99/activate", {}, 404),
    ("POST", "/api/v1/signatures/abc/activate", {}, 422),
    ("GET", "/api/v1/audit?after=-1", {}, 422),
    ("GET", "/api/v1/audit?limit=0", {}, 422),
    ("GET", "/api/v1/report?format=doc", {}, 422),
    ("GET", "/api/v1/report?since=yesterday", {}, 400),
    ("GET", "/api/v1/report?since=2999-01-01", {}, 400),
    ("GET", "/api/v1/nothing", {}, 404),
    ("PUT", "/api/v1/vms", {}, 405),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), BAD)
def test_bad_input_is_a_4xx_json_error_and_changes_nothing(console, method, path, kwargs,
                                                           status):
    before = console.snapshot()
    path = path.replace("ITEM", item_ids(console)[-1])
    headers = {**console.auth("security_admin"), **kwargs.pop("headers", {})}
    response = console.client.request(method, path, headers=headers, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]
    assert console.snapshot() == before


# -- successes: the CLI's shapes, changes audited with the token's name ----------------------

def test_reads_have_the_shapes_of_the_cli_json(console):
    auditor = console.auth("auditor")
    api = {name: console.client.get(f"/api/v1/{name}", headers=auditor).json()
           for name in ("detections", "quarantine", "signatures", "vms")}
    assert api["detections"] == console.cli_json("detections")
    assert api["quarantine"] == console.cli_json("quarantine", "list")
    assert api["signatures"] == console.cli_json("signatures", "list")
    cli_status = console.cli_json("status")
    assert set(api["vms"]) == set(cli_status) == {"vms", "hosts"}
    assert [(v["moref"], v["state"]) for v in api["vms"]["vms"]] == \
        [(v["moref"], v["state"]) for v in cli_status["vms"]]
    assert set(api["vms"]["vms"][0]) == set(cli_status["vms"][0])
    states = {v["name"]: v["state"] for v in api["vms"]["vms"]}
    assert states[VM0] == "infected"
    assert {v["last_scan_via"] for v in api["vms"]["vms"]} == {"guest"}


def test_one_vm_with_its_timeline_detections_and_scans(console):
    vms = console.client.get("/api/v1/vms", headers=console.auth("auditor")).json()["vms"]
    moref = next(v["moref"] for v in vms if v["name"] == VM0)
    doc = console.client.get(f"/api/v1/vms/{moref}", headers=console.auth("auditor")).json()
    assert doc["name"] == VM0
    assert doc["state"] == "infected"
    assert doc["timeline"] == []
    assert doc["exposures"] == []
    assert len(doc["detections"]) == 3
    assert (doc["scans"][0]["status"], doc["scans"][0]["via"]) == ("infected", "guest")
    assert doc["last_scan_via"] == "guest"


def test_a_vm_page_shows_its_instant_on_exposure(console):
    """The exposure the controller records at power-on (written through its job store)."""
    from vsphere_av.store.jobs import JobStore

    vms = console.client.get("/api/v1/vms", headers=console.auth("auditor")).json()["vms"]
    moref = next(v["moref"] for v in vms if v["name"] == VM1)
    now = time.time()
    with JobStore.open(console.state) as jobs:
        jobs.open_exposure(vm=moref, vm_name=VM1, trigger="poweron", started=now, seen=now)
        jobs.mark_exposure(moref, isolated=now + 0.015)
    doc = console.client.get(f"/api/v1/vms/{moref}", headers=console.auth("auditor")).json()
    assert [row["what"] for row in doc["timeline"]] == [
        "started running (poweron)", "network isolated (every vNIC disconnected)"]
    assert doc["timeline"][1]["seconds"] == 0.015
    (exposure,) = doc["exposures"]
    assert exposure["trigger"] == "poweron"
    assert round(exposure["window"], 3) == 0.015
    console.client.cookies.set("vsav_token", console.tokens["auditor"])
    try:
        page = console.client.get(f"/vms/{moref}")
    finally:
        console.client.cookies.clear()
    assert page.status_code == 200
    assert "network isolated (every vNIC disconnected)" in page.text
    assert "<th>via</th>" in page.text
    assert "<td>guest</td>" in page.text


def test_restore_and_purge_as_a_security_admin_are_audited_with_the_token_name(console):
    first, second = item_ids(console)[:2]
    with App(console.settings) as app:
        row = next(i for i in app.quarantine_list() if i["id"] == first)
    target = console.sim.guest_root / VM0 / row["path"].lstrip("/")
    assert not target.exists()
    refused = console.client.post(f"/api/v1/quarantine/{first}/restore",
                                  headers=console.auth("auditor"))
    assert refused.status_code == 403
    assert not target.exists()
    response = console.client.post(f"/api/v1/quarantine/{first}/restore",
                                   headers=console.auth("security_admin"))
    assert response.status_code == 200, response.text
    assert response.json()["restored"]
    assert target.read_bytes() == EICAR
    again = console.client.post(f"/api/v1/quarantine/{first}/restore",
                                headers=console.auth("security_admin"))
    assert again.status_code == 409
    assert "exists" in again.json()["error"]
    forced = console.client.post(f"/api/v1/quarantine/{first}/restore", json={"force": True},
                                 headers=console.auth("security_admin"))
    assert forced.status_code == 200
    purged = console.client.delete(f"/api/v1/quarantine/{second}",
                                   headers=console.auth("security_admin"))
    assert purged.status_code == 200
    assert purged.json()["id"] == second
    assert second not in item_ids(console)
    with AuditLog.open(console.state) as log:
        mine = [(e.action, e.details.get("result")) for e in log.entries()
                if e.actor == "api:security_admin-bot"]
    assert mine == [("quarantine.restore", "restored"), ("quarantine.restore", "failed"),
                    ("quarantine.restore", "restored"), ("quarantine.purge", None)]


def test_scans_are_queued_for_the_controller_with_job_ids(console):
    response = console.client.post("/api/v1/scans", json={"vms": [VM1, VM1], "full": True},
                                   headers=console.auth("security_admin"))
    assert response.status_code == 202, response.text
    body = response.json()
    (job,) = body["jobs"]
    assert job["vm"] == VM1
    assert body["full"] is True
    assert body["controller_running"] is False
    status = console.client.get(f"/api/v1/scans/{job['id']}",
                                headers=console.auth("auditor")).json()
    assert status["state"] == "queued"
    assert status["moref"] == job["moref"]
    assert status["full"] is True
    assert status["scan"] is None
    with AuditLog.open(console.state) as log:
        last = list(log.entries())[-1]
    assert (last.action, last.actor) == ("api.scan.request", "api:security_admin-bot")
    assert last.details["job_ids"] == [job["id"]]


def test_audit_pages_verify_and_signature_activation(console):
    auditor = console.auth("auditor")
    everything = console.client.get("/api/v1/audit", headers=auditor).json()
    head = everything["head"]["seq"]
    assert everything["entries"][-1]["seq"] == head
    later = console.client.get(f"/api/v1/audit?after={head - 2}", headers=auditor).json()
    assert [e["seq"] for e in later["entries"]] == [head - 1, head]
    verify = console.client.get("/api/v1/audit/verify", headers=auditor).json()
    assert verify == {"ok": True, "entries": verify["entries"], "first_bad_entry": None,
                      "message": verify["message"]}
    assert verify["entries"] >= head
    response = console.client.post("/api/v1/signatures/1/activate",
                                   headers=console.auth("security_admin"))
    assert response.status_code == 200
    assert response.json()["active"] is True
    with AuditLog.open(console.state) as log:
        last = list(log.entries())[-1]
    assert (last.action, last.actor, last.details["version"]) == (
        "api.signatures.activate", "api:security_admin-bot", 1)


def test_an_activation_through_the_api_is_audited_by_the_signature_store_too(console):
    """Issue 15: the store records its own signatures.activate through the audit log the API
    hands it (the engine imports no store), just before the API's entry."""
    response = console.client.post("/api/v1/signatures/1/activate",
                                   headers=console.auth("security_admin"))
    assert response.status_code == 200
    with AuditLog.open(console.state) as log:
        *_, by_store, by_api = list(log.entries())
    assert (by_store.action, by_store.details["version"]) == ("signatures.activate", 1)
    assert not by_store.actor.startswith("api:")   # the API process's own actor
    assert by_api.action == "api.signatures.activate"

def test_appliances_openapi_and_report(console):
    auditor = console.auth("auditor")
    assert console.client.get("/api/v1/appliances", headers=auditor).json() == {
        "appliances": [], "down": {}, "enabled": False}
    schema = console.client.get("/api/v1/openapi.json").json()
    assert {"/api/v1/vms", "/api/v1/scans", "/api/v1/events"} <= set(schema["paths"])
    report = console.client.get("/api/v1/report", headers=auditor).json()
    assert report["totals"]["detections"] == 3
    assert report["audit"]["intact"] is True
    csv_text = console.client.get("/api/v1/report?format=csv", headers=auditor).text
    assert csv_text.splitlines()[0].startswith("vm,moref,host,state")
    assert any(line.startswith(f"{VM0},") for line in csv_text.splitlines())
    pdf = console.client.get("/api/v1/report?format=pdf&since=2020-01-01", headers=auditor)
    assert pdf.status_code == 200
    assert pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF-")


def test_metrics_need_a_token_off_loopback(console):
    remote = TestClient(create_app(settings=console.settings, tokens=console.store,
                                   loopback=False))
    assert remote.get("/metrics").status_code == 401
    ok = remote.get("/metrics", headers=console.auth("auditor"))
    assert ok.status_code == 200
    assert 'vsphere_av_detections_total{action="quarantined"} 3.0' in ok.text


def test_dashboard_changes_with_the_cookie_need_the_csrf_header(console):
    client = TestClient(create_app(settings=console.settings, tokens=console.store,
                                   loopback=True))
    login = client.post("/login", json={"token": console.tokens["security_admin"]})
    assert login.status_code == 200
    assert "httponly" in login.headers["set-cookie"].lower()
    assert "samesite=strict" in login.headers["set-cookie"].lower()
    item = item_ids(console)[0]
    before = console.snapshot()
    refused = client.delete(f"/api/v1/quarantine/{item}")
    assert refused.status_code == 403
    assert "X-Requested-With" in refused.json()["error"]
    assert console.snapshot() == before
    page = client.get("/quarantine")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert client.post("/login", json={"token": "vsav_nope"}).status_code == 401


# -- a real server: the event stream and /metrics over HTTP on 127.0.0.1 ---------------------

@pytest.fixture
def served(console: Console) -> Iterator[ApiServer]:
    settings = config.parse({"api": {"listen": "127.0.0.1:0"}}, env=console.env)
    server = ApiServer(settings=settings, tokens=console.store)
    thread = threading.Thread(target=server.serve, name="api-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.stop()
        thread.join(10)
        assert not thread.is_alive()
        server.close()


def test_events_stream_new_audit_entries_until_the_token_is_revoked(console, served):
    headers = {"Authorization": "Bearer " + console.store.create(
        name="stream-reader", role="auditor", actor="tester")}
    with httpx.Client(base_url=served.url, timeout=10) as client, \
            client.stream("GET", "/api/v1/events", headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines).startswith("retry:")
        changed = client.post("/api/v1/signatures/1/activate",
                              headers=console.auth("security_admin"))
        assert changed.status_code == 200
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        for line in lines:
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if seen[-1]["action"] == "api.signatures.activate":
                    break
            assert time.monotonic() < deadline
        assert seen[-1]["actor"] == "api:security_admin-bot"
        console.store.revoke("stream-reader", actor="tester")
        ended = time.monotonic()
        rest = list(lines)                  # the server ends the stream at its next poll
        assert time.monotonic() - ended < 5
        assert all(not line.startswith("data: ") or "api.token.revoke" in line
                   for line in rest)
    again = httpx.get(f"{served.url}/api/v1/events", headers=headers, timeout=10)
    assert again.status_code == 401


def test_metrics_over_loopback_need_no_token(console, served):
    response = httpx.get(f"{served.url}/metrics", timeout=10)
    assert response.status_code == 200
    text = response.text
    assert "vsphere_av_scans_started_total" in text
    assert 'vsphere_av_read_bytes_total{path="guest"}' in text      # the fleet's guest scans
    assert 'vsphere_av_read_bytes_total{path="disk"} 0.0' in text
    assert 'path="all"' not in text
    assert "vsphere_av_exposure_window_seconds_bucket" in text
    assert "vsphere_av_signature_age_seconds" in text
    assert 'vsphere_av_scans_finished_total{result="infected"} 1.0' in text


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files), made with cryptography."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "console.pem", directory / "console.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


def test_tls_serves_https_with_a_secure_cookie(console, tmp_path):
    cert, key = self_signed(tmp_path)
    settings = config.parse({"api": {"listen": "127.0.0.1:0", "tls_cert": str(cert),
                                     "tls_key": str(key)}}, env=console.env)
    server = ApiServer(settings=settings, tokens=console.store)
    assert server.url.startswith("https://127.0.0.1:")
    thread = threading.Thread(target=server.serve, name="api-tls-test", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=server.url, verify=trust, timeout=10) as client:
            vms = client.get("/api/v1/vms", headers=console.auth("auditor"))
            assert vms.status_code == 200
            login = client.post("/login", json={"token": console.tokens["auditor"]})
            assert "secure" in login.headers["set-cookie"].lower()
        with pytest.raises(httpx.ConnectError):      # not trusted: no plain fallback
            httpx.get(f"{server.url}/health", timeout=5)
    finally:
        server.stop()
        thread.join(10)
        server.close()
    half = config.parse({"api": {"listen": "127.0.0.1:0", "tls_cert": str(cert)}},
                        env=console.env)
    with pytest.raises(errors.ConfigError, match="go together"):
        ApiServer(settings=half, tokens=console.store)


def test_beyond_loopback_only_with_tls(console):
    for listen in ("0.0.0.0:0", "192.0.2.1:8480"):
        settings = config.parse({"api": {"listen": listen}}, env=console.env)
        with pytest.raises(errors.ConfigError, match="without TLS"):
            ApiServer(settings=settings, tokens=console.store)
    with pytest.raises(errors.ConfigError, match="HOST:PORT"):
        config.parse({"api": {"listen": "8480"}}, env=console.env)
    with pytest.raises(errors.ConfigError, match="unknown setting"):
        config.parse({"api": {"listen": "127.0.0.1:0", "tls": True}}, env=console.env)
