"""The engine service: the scan engine behind an authenticated HTTP API (the appliance side).

Called by ``cli`` (``vsphere-av engine serve --listen ADDR``) on each appliance (and by
``fleet.manager.start_local_engines`` in one process, for the simulator). Calls
``vsphere_av.engine`` (one pinned signature version per request) and, for ``/v1/scan-url``,
the ESXi host the transfer URL names. Its client, the controller side, is ``client.py``.

Why the standard library's ``ThreadingHTTPServer``: the API is four routes, request bodies must
be streamed straight into the engine (``rfile`` gives exactly that), and an appliance image
should carry as few dependencies as possible. One thread per request; concurrent scans are
capped by a semaphore (``--max-concurrent``), beyond which the service answers 503 with
``Retry-After`` so the controller's per-host queue keeps the order.

Routes (JSON in and out; every route but ``GET /health`` needs ``Authorization: Bearer T``,
compared in constant time):

    GET  /health          no token: {"status": "ok"}; with the token: + signature_version,
                          uptime_seconds, active_scans, max_concurrent, load (0..1),
                          loadavg, scans_total, pulls_total, sessions_total (engine
                          sessions opened: one per scan call, however many files it scans)
    POST /v1/scan         body = the file (Content-Length or chunked); query: path, name,
                          owner -> FileOutcome JSON + signature_version
    POST /v1/scan-url     {"url", "path", "thumbprint", "owner", "size"}: the appliance pulls a
                          single-use guest transfer URL itself (https only, ``/guestFile``
                          only, the ESXi certificate pinned by SHA-256 thumbprint) and scans it.
                          The controller replaced ``*`` with the host's address; the appliance
                          holds no vCenter or guest credentials.
    POST <route>          JSON in, JSON out: ``routes`` added by whoever starts the service
                          (``cli/engine.py`` adds the disk-scan routes ``/v1/disk/...`` of
                          ``scan.sources.disk_service``); they take no scan slot of their own.

Listening beyond loopback without TLS is refused unless explicitly allowed (the bearer token
would cross the network in clear).
"""

from __future__ import annotations

import contextlib
import hmac
import http.server
import ipaddress
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from vsphere_av.errors import ConfigError, EngineError

MAX_JSON_BODY = 64 * 1024
READ_CHUNK = 1024 * 1024
MIN_TOKEN_LENGTH = 16
TOKEN_ENV = "VSPHERE_AV_ENGINE_TOKEN"
GUEST_FILE_PATH = "/guestFile"

# An added route of the service: the request's JSON object -> the answer's (EngineError: 400).
JsonRoute = Callable[[dict[str, Any]], dict[str, Any]]


def load_token(*, token_file: str | None = None, env: dict[str, str] | None = None) -> str:
    """The bearer token from ``token_file`` or ``$VSPHERE_AV_ENGINE_TOKEN``; ConfigError if weak."""
    env = dict(os.environ) if env is None else env
    if token_file:
        try:
            token = Path(token_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from exc
    else:
        token = env.get(TOKEN_ENV, "").strip()
        if not token:
            raise ConfigError(f"engine token missing: use --token-file or {TOKEN_ENV}")
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(f"engine token must be at least {MIN_TOKEN_LENGTH} characters, "
                          "without spaces")
    return token


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); ConfigError when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen must be HOST:PORT, got {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class _Stats:
    started: float
    active: int = 0
    total: int = 0
    pulls: int = 0      # scans whose bytes the service pulled itself (/v1/scan-url)
    sessions: int = 0   # engine sessions opened (one per scan call, however many files)


class _Body:
    """Iterates a request body in chunks: Content-Length or chunked, never past its end."""

    def __init__(self, rfile: Any, *, length: int | None, chunked: bool) -> None:
        self._rfile = rfile
        self._left = length
        self._chunked = chunked
        self.complete = False

    def __iter__(self) -> Iterator[bytes]:
        if self._chunked:
            yield from self._chunks()
            return
        yield from self._exactly(self._left or 0)
        self.complete = True

    def _exactly(self, left: int) -> Iterator[bytes]:
        """``left`` bytes of the body, in pieces of at most READ_CHUNK."""
        while left > 0:
            data = self._rfile.read(min(READ_CHUNK, left))
            if not data:
                raise EngineError("request body ended early")
            left -= len(data)
            yield data

    def _chunks(self) -> Iterator[bytes]:
        while True:
            line = self._rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise EngineError("malformed chunked body") from exc
            if size == 0:
                while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.complete = True
                return
            yield from self._exactly(size)
            self._rfile.readline(8)


class EngineService:
    """The HTTP service around one :class:`vsphere_av.engine.Engine`."""

    def __init__(self, *, engine: Any, token: str, listen: tuple[str, int],
                 max_concurrent: int = 4, tls_cert: str = "", tls_key: str = "",
                 allow_plaintext: bool = False, clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[..., Iterable[bytes]] | None = None) -> None:
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"engine token must be at least {MIN_TOKEN_LENGTH} characters")
        if not _is_loopback(listen[0]) and not tls_cert and not allow_plaintext:
            raise ConfigError(f"refusing to listen on {listen[0]} without TLS "
                              "(give --tls-cert/--tls-key, or --allow-plaintext)")
        if max_concurrent < 1:
            raise ConfigError("--max-concurrent must be at least 1")
        self.engine = engine
        self._token = token.encode()
        self._clock = clock
        self._stats = _Stats(started=clock())
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self.max_concurrent = max_concurrent
        self._fetch = fetch or fetch_transfer_url
        self.routes: dict[str, JsonRoute] = {}     # added routes: path -> handler
        service = self

        class Handler(_Handler):
            owner = service

        self.httpd = http.server.ThreadingHTTPServer(listen, Handler)
        self.httpd.daemon_threads = True
        if tls_cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(tls_cert, tls_key or None)
            except (OSError, ssl.SSLError) as exc:
                self.httpd.server_close()
                raise ConfigError(f"cannot load TLS certificate {tls_cert}: {exc}") from exc
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls_cert else "http"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (port 0 resolved)."""
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """Base URL clients use."""
        host, port = self.address
        return f"{self.scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`."""
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> threading.Thread:
        """Serve in a background thread (tests, embedded use)."""
        thread = threading.Thread(target=self.serve_forever, name="engine-service", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- used by the handler --------------------------------------------------------------
    def authorised(self, header: str | None) -> bool:
        """Constant-time check of an ``Authorization: Bearer`` header."""
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[7:].strip().encode(), self._token)

    def health(self, *, detailed: bool) -> dict[str, Any]:
        """Health document; details only for authenticated callers."""
        try:
            version = int(self.engine.active_version())
            status = "ok"
        except Exception:
            version, status = 0, "degraded"
        out: dict[str, Any] = {"status": status}
        if detailed:
            with self._lock:
                active, total = self._stats.active, self._stats.total
            out.update(signature_version=version,
                       uptime_seconds=round(self._clock() - self._stats.started, 3),
                       active_scans=active, max_concurrent=self.max_concurrent,
                       load=round(active / self.max_concurrent, 3),
                       loadavg=list(os.getloadavg()), scans_total=total,
                       pulls_total=self._stats.pulls, sessions_total=self._stats.sessions)
        return out

    @contextlib.contextmanager
    def slot(self) -> Iterator[bool]:
        """A scan slot, or False at once when all are busy."""
        got = self._slots.acquire(blocking=False)
        if got:
            with self._lock:
                self._stats.active += 1
        try:
            yield got
        finally:
            if got:
                with self._lock:
                    self._stats.active -= 1
                    self._stats.total += 1
                self._slots.release()

    @contextlib.contextmanager
    def scanning(self) -> Iterator[ServiceSession]:
        """One engine session (the active signatures, loaded once; the verdict cache flushed
        when it ends) for several streams: yields a :class:`ServiceSession`, called as
        ``scan(chunks, *, path, name, owner, size_hint)`` -> FileOutcome JSON +
        signature_version, or in two halves (``receive``, then ``scan_received``) so that
        one thread reads the next file while another matches this one."""
        with self._lock:
            self._stats.sessions += 1
        with self.engine.session() as session:
            yield ServiceSession(session)

    def scan(self, chunks: Iterable[bytes], *, path: str, name: str | None, owner: str,
             size_hint: int | None) -> dict[str, Any]:
        """Scan one stream with the active signatures; FileOutcome JSON + signature_version."""
        with self.scanning() as scan:
            return scan(chunks, path=path, name=name, owner=owner, size_hint=size_hint)

    def fetch(self, url: str, *, thumbprint: str) -> Iterable[bytes]:
        """Open a guest transfer URL (see :func:`fetch_transfer_url`)."""
        with self._lock:
            self._stats.pulls += 1
        return self._fetch(url, thumbprint=thumbprint)


class ServiceSession:
    """One engine session of the service (:meth:`EngineService.scanning`): outcomes as the
    wire carries them (FileOutcome JSON + signature_version)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def __call__(self, chunks: Iterable[bytes], *, path: str, name: str | None, owner: str,
                 size_hint: int | None) -> dict[str, Any]:
        return self._json(self._session.scan_stream(chunks, path=path, name=name,
                                                    owner=owner, size_hint=size_hint))

    def receive(self, chunks: Iterable[bytes], *, size_hint: int | None = None) -> Any:
        """A file's bytes taken in (hashed, held) to be matched later (``Session.receive``)."""
        return self._session.receive(chunks, size_hint=size_hint)

    def scan_received(self, received: Any, *, path: str, name: str | None,
                      owner: str) -> dict[str, Any]:
        """The verdict on a file from :meth:`receive` (``Session.scan_received``)."""
        return self._json(self._session.scan_received(received, path=path, name=name,
                                                      owner=owner))

    def _json(self, outcome: Any) -> dict[str, Any]:
        return {**outcome.as_dict(), "signature_version": self._session.version}


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: EngineService
    protocol_version = "HTTP/1.1"
    server_version = "vsphere-av-engine"
    sys_version = ""
    timeout = 120   # seconds of socket silence before a connection is dropped (slow clients)
    # TCP_NODELAY: an answer's headers and body are two writes, and Nagle would hold the
    # body until the client's delayed ACK (40 ms per call: a disk scan makes one per file).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the access log would carry guest paths; the controller logs what it needs

    def _send(self, status: int, document: dict[str, Any], *, close: bool = False,
              headers: dict[str, str] | None = None) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str, **kw: Any) -> None:
        self._send(status, {"error": message}, **kw)

    def _authorised(self) -> bool:
        if self.owner.authorised(self.headers.get("Authorization")):
            return True
        # Unread body: close instead of draining an unauthenticated upload.
        self._error(401, "missing or wrong bearer token", close=True,
                    headers={"WWW-Authenticate": 'Bearer realm="vsphere-av-engine"'})
        return False

    def do_GET(self) -> None:
        """GET /health."""
        if urlsplit(self.path).path != "/health":
            self._error(404, "no such route", close=True)
            return
        detailed = self.owner.authorised(self.headers.get("Authorization"))
        self._send(200, self.owner.health(detailed=detailed))

    def do_POST(self) -> None:
        """POST /v1/scan, /v1/scan-url and the added routes."""
        parts = urlsplit(self.path)
        if parts.path in self.owner.routes:
            self._json_route(self.owner.routes[parts.path])
            return
        if parts.path not in ("/v1/scan", "/v1/scan-url"):
            self._error(404, "no such route", close=True)
            return
        if not self._authorised():
            return
        with self.owner.slot() as got:
            if not got:
                self._error(503, "all scan slots busy", close=True, headers={"Retry-After": "1"})
                return
            try:
                if parts.path == "/v1/scan":
                    self._scan_body(parse_qs(parts.query))
                else:
                    self._scan_url()
            except EngineError as exc:
                self._error(400, str(exc), close=True)

    def _body(self) -> _Body:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        raw = self.headers.get("Content-Length")
        if not chunked and (raw is None or not raw.isdigit()):
            raise EngineError("Content-Length or chunked body required")
        return _Body(self.rfile, length=None if chunked else int(raw or 0), chunked=chunked)

    def _scan_body(self, query: dict[str, list[str]]) -> None:
        path = (query.get("path") or [""])[0]
        if not path:
            raise EngineError("query parameter path is required")
        body = self._body()
        length = self.headers.get("Content-Length")
        names = query.get("name")
        result = self.owner.scan(iter(body), path=path, name=names[0] if names else None,
                                 owner=(query.get("owner") or [""])[0],
                                 size_hint=int(length) if length and length.isdigit() else None)
        # A body the engine stopped reading (too large) leaves bytes on the socket: close.
        self._send(200, result, close=not body.complete)

    def _json_body(self) -> dict[str, Any]:
        raw = self.headers.get("Content-Length", "")
        if not raw.isdigit() or int(raw) > MAX_JSON_BODY:
            raise EngineError(f"JSON body required (at most {MAX_JSON_BODY} bytes)")
        try:
            request = json.loads(self.rfile.read(int(raw)))
        except ValueError as exc:
            raise EngineError("body is not JSON") from exc
        if not isinstance(request, dict):
            raise EngineError("body must be a JSON object")
        return request

    def _json_route(self, route: JsonRoute) -> None:
        """An added route: authenticated JSON in, JSON out; EngineError is HTTP 400."""
        if not self._authorised():
            return
        try:
            self._send(200, route(self._json_body()))
        except EngineError as exc:
            self._error(400, str(exc), close=True)
        except (KeyError, TypeError, ValueError) as exc:
            self._error(400, f"malformed request: {exc!r}", close=True)

    def _scan_url(self) -> None:
        request = self._json_body()
        url, path = request.get("url"), request.get("path")
        thumbprint = request.get("thumbprint") or ""
        size = request.get("size")
        if not isinstance(url, str) or not isinstance(path, str) or not path:
            raise EngineError("url and path are required strings")
        if not isinstance(thumbprint, str) or (size is not None and not isinstance(size, int)):
            raise EngineError("thumbprint must be a string and size an integer")
        check_transfer_url(url)
        try:
            chunks = self.owner.fetch(url, thumbprint=thumbprint)
        except EngineError as exc:
            self._send(200, {"path": path, "status": "error", "sha256": "", "size": 0,
                             "reason": str(exc), "cached": False, "detections": [],
                             "signature_version": None})
            return
        result = self.owner.scan(chunks, path=path, name=None,
                                 owner=str(request.get("owner") or ""), size_hint=size)
        self._send(200, result)


def check_transfer_url(url: str) -> None:
    """Only https guest transfer URLs whose host the controller filled in; EngineError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise EngineError("transfer URL must be https")
    if not parts.hostname or parts.hostname == "*":
        raise EngineError("transfer URL host must be the ESXi host's address, not '*'")
    if parts.path != GUEST_FILE_PATH:
        raise EngineError(f"transfer URL path must be {GUEST_FILE_PATH}")
    if parts.username or parts.password:
        raise EngineError("transfer URL must not carry credentials")


def fetch_transfer_url(url: str, *, thumbprint: str, timeout: float = 60.0) -> Iterator[bytes]:
    """Stream a guest transfer URL, pinning the ESXi certificate's SHA-256 thumbprint."""
    import requests
    from requests.adapters import HTTPAdapter

    if not thumbprint:
        raise EngineError("a SHA-256 thumbprint of the ESXi certificate is required")
    pin = thumbprint.replace(":", "").lower()
    if len(pin) != 64 or any(c not in "0123456789abcdef" for c in pin):
        raise EngineError("thumbprint must be a SHA-256 fingerprint")

    class _Pinned(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["assert_fingerprint"] = pin
            kwargs["cert_reqs"] = "CERT_NONE"   # trust comes from the pinned fingerprint
            super().init_poolmanager(*args, **kwargs)

    http_session = requests.Session()
    http_session.trust_env = False     # straight to the ESXi host: no proxy from the env
    http_session.mount("https://", _Pinned())
    try:
        response = http_session.get(url, stream=True, verify=False, timeout=timeout,
                                    headers={"Connection": "close"})
    except requests.RequestException as exc:
        http_session.close()
        raise EngineError(f"cannot fetch transfer URL: {type(exc).__name__}") from exc
    if response.status_code != 200:
        response.close()
        http_session.close()
        raise EngineError(f"transfer URL answered HTTP {response.status_code}")

    def chunks() -> Iterator[bytes]:
        try:
            yield from response.iter_content(READ_CHUNK)
        except requests.RequestException as exc:
            raise OSError(f"transfer interrupted: {type(exc).__name__}") from exc
        finally:
            response.close()
            http_session.close()

    return chunks()
