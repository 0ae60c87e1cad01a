"""The engine service over real HTTP on loopback with the real YARA engine (no simulator needed)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from appliance_support import EICAR, FileServer, iter_bytes, self_signed

from vsphere_av import config
from vsphere_av.engine import Engine
from vsphere_av.engine.remote import (
    EngineClient,
    EngineService,
    RemoteEngine,
    load_token,
    parse_listen,
)
from vsphere_av.errors import ConfigError, EngineError
from vsphere_av.store.audit import AuditOnUse

TOKEN = "t0ken-for-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    settings = config.Settings(state_dir=tmp_path_factory.mktemp("engine-state"))
    settings = config.Settings(state_dir=settings.state_dir,
                               engine=config.EngineSettings(max_file_size=4096))
    eng = Engine.open(settings, audit=AuditOnUse(settings.state_dir), actor="tester")
    yield eng
    eng.close()


@pytest.fixture
def service(engine: Engine) -> Iterator[EngineService]:
    svc = EngineService(engine=engine, token=TOKEN, listen=("127.0.0.1", 0), max_concurrent=2)
    svc.start()
    yield svc
    svc.shutdown()


@pytest.fixture
def client(service: EngineService) -> Iterator[EngineClient]:
    c = EngineClient(service.url, token=TOKEN, timeout=10)
    yield c
    c.close()


def test_health_without_token_says_only_ok(service: EngineService) -> None:
    answer = requests.get(service.url + "/health", timeout=5)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


def test_health_with_token_has_version_load_uptime(client: EngineClient, engine: Engine) -> None:
    health = client.health()
    assert health["status"] == "ok"
    assert health["signature_version"] == engine.active_version() >= 1
    assert health["uptime_seconds"] >= 0
    assert health["active_scans"] == 0
    assert health["load"] == 0
    assert health["max_concurrent"] == 2
    assert len(health["loadavg"]) == 3


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}",
                                    f"Bearer {TOKEN}x"])
def test_scan_needs_the_token(service: EngineService, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    answer = requests.post(service.url + "/v1/scan", params={"path": "/x"}, data=EICAR,
                           headers=headers, timeout=5)
    assert answer.status_code == 401
    assert answer.json() == {"error": "missing or wrong bearer token"}
    url_answer = requests.post(service.url + "/v1/scan-url", json={"url": "https://h/guestFile"},
                               headers=headers, timeout=5)
    assert url_answer.status_code == 401


def test_unknown_route_is_404(service: EngineService) -> None:
    assert requests.get(service.url + "/v1/scan", timeout=5).status_code == 404
    assert requests.post(service.url + "/admin", timeout=5).status_code == 404


def test_scan_streamed_body_detects_eicar_and_passes_clean(client: EngineClient) -> None:
    infected = client.scan_stream(iter_bytes(EICAR), path="/tmp/eicar.com", owner="root")
    assert infected.status == "infected"
    assert {d.threat for d in infected.detections} == {"EICAR-Test-File"}
    assert infected.size == len(EICAR)
    clean = client.scan_stream([b"hello ", b"world\n"], path="/etc/motd")
    assert clean.status == "clean"
    assert clean.path == "/etc/motd"
    assert client.health()["scans_total"] == 2


def test_scan_with_content_length(service: EngineService) -> None:
    answer = requests.post(service.url + "/v1/scan", params={"path": "C:\\e.com"}, data=EICAR,
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert answer.status_code == 200
    document = answer.json()
    assert document["status"] == "infected"
    assert document["signature_version"] >= 1


def test_oversized_body_is_skipped_and_connection_closed(service: EngineService) -> None:
    host, port = service.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    body = b"A" * 10_000   # max_file_size is 4096 in this module
    conn.request("POST", "/v1/scan?path=/big", body=body,
                 headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    document = json.loads(response.read())
    assert document["status"] == "skipped"
    assert document["reason"] == "larger than max file size"
    assert response.getheader("Connection") == "close"
    conn.close()


def test_missing_path_or_length_is_400(service: EngineService) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answer = requests.post(service.url + "/v1/scan", data=b"x", headers=auth, timeout=5)
    assert answer.status_code == 400
    assert "path" in answer.json()["error"]


def test_all_slots_busy_answers_503(engine: Engine) -> None:
    svc = EngineService(engine=engine, token=TOKEN, listen=("127.0.0.1", 0), max_concurrent=1)
    svc.start()
    release, started = threading.Event(), threading.Event()

    def slow() -> Iterator[bytes]:
        yield b"first"
        started.set()
        release.wait(10)
        yield b"last"

    slow_client = EngineClient(svc.url, token=TOKEN, timeout=10)
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(
        outcome=slow_client.scan_stream(slow(), path="/slow")))
    worker.start()
    try:
        assert started.wait(5)
        deadline = threading.Event()
        for _ in range(50):   # the server counts the slot once it has read the headers
            if EngineClient(svc.url, token=TOKEN).health()["active_scans"] == 1:
                break
            deadline.wait(0.05)
        with pytest.raises(EngineError, match="HTTP 503: all scan slots busy"):
            EngineClient(svc.url, token=TOKEN, timeout=5).scan_stream([b"x"], path="/other")
    finally:
        release.set()
        worker.join(10)
        svc.shutdown()
    assert result["outcome"].status == "clean"  # type: ignore[attr-defined]


def test_scan_url_pulls_with_pinned_thumbprint(client: EngineClient, tmp_path: Path) -> None:
    files = FileServer(tmp_path, {"eicar": EICAR, "clean": b"nothing here"})
    try:
        hit = client.scan_url(files.url("eicar"), path="/root/eicar", thumbprint=files.thumbprint)
        assert hit.status == "infected"
        assert hit.path == "/root/eicar"
        clean = client.scan_url(files.url("clean"), path="/c", thumbprint=files.thumbprint.lower())
        assert clean.status == "clean"
        _, _, other = self_signed(tmp_path, "127.0.0.2")
        wrong = client.scan_url(files.url("eicar"), path="/root/eicar", thumbprint=other)
        assert wrong.status == "error"
        assert "cannot fetch transfer URL" in wrong.reason
        gone = client.scan_url(files.url("missing"), path="/m", thumbprint=files.thumbprint)
        assert gone.status == "error"
        assert gone.reason == "transfer URL answered HTTP 404"
        assert files.hits == ["eicar", "clean", "missing"]   # the wrong pin never got a body
    finally:
        files.close()


@pytest.mark.parametrize(("url", "message"), [
    ("http://127.0.0.1:1/guestFile?id=x", "must be https"),
    ("https://*:443/guestFile?id=x", "not '\\*'"),
    ("https://127.0.0.1:1/etc/passwd", "path must be /guestFile"),
    ("https://u:p@127.0.0.1:1/guestFile", "must not carry credentials"),
])
def test_scan_url_refuses_other_urls(client: EngineClient, url: str, message: str) -> None:
    with pytest.raises(EngineError, match=message):
        client.scan_url(url, path="/x", thumbprint="AA:" * 31 + "AA")


def test_scan_url_needs_a_thumbprint(client: EngineClient) -> None:
    outcome = client.scan_url("https://127.0.0.1:1/guestFile?id=x", path="/x", thumbprint="")
    assert outcome.status == "error"
    assert "thumbprint" in outcome.reason


def test_remote_engine_has_the_session_shape(client: EngineClient, engine: Engine) -> None:
    remote = RemoteEngine(client)
    with remote.session() as session:
        assert session.version == engine.active_version()
        assert session.scan_stream([EICAR], path="/e").status == "infected"


def test_unreachable_service_is_an_engine_error(service: EngineService) -> None:
    dead = EngineClient("http://127.0.0.1:1", token=TOKEN, timeout=2)
    with pytest.raises(EngineError, match="unreachable"):
        dead.health()


def test_refuses_non_loopback_without_tls(engine: Engine) -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        EngineService(engine=engine, token=TOKEN, listen=("0.0.0.0", 0))


def test_tls_service(engine: Engine, tmp_path: Path) -> None:
    cert, key, _ = self_signed(tmp_path)
    svc = EngineService(engine=engine, token=TOKEN, listen=("127.0.0.1", 0),
                        tls_cert=str(cert), tls_key=str(key))
    svc.start()
    try:
        assert svc.url.startswith("https://")
        tls_client = EngineClient(svc.url, token=TOKEN, ca_file=str(cert))
        assert tls_client.scan_stream([EICAR], path="/e").status == "infected"
        with pytest.raises(EngineError, match="unreachable"):
            EngineClient(svc.url, token=TOKEN).health()   # not trusted without the CA
    finally:
        svc.shutdown()


@pytest.mark.parametrize(("env", "message"), [
    ({}, "engine token missing"),
    ({"VSPHERE_AV_ENGINE_TOKEN": "short"}, "at least 16"),
    ({"VSPHERE_AV_ENGINE_TOKEN": "has space 0123456789"}, "without spaces"),
])
def test_bad_tokens(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_token(env=env)


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert load_token(token_file=str(path), env={}) == TOKEN
    with pytest.raises(ConfigError, match="cannot read token file"):
        load_token(token_file=str(tmp_path / "nope"), env={})


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)), (":0", ("127.0.0.1", 0)),
    ("[::1]:9000", ("::1", 9000)),
])
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8443", "host:", "host:99999", "host:x"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_listen(value)
