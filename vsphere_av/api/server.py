"""The console's HTTP side: the REST API under ``/api/v1``, ``/metrics`` and the dashboard.

Called by ``api.ApiServer`` (``vsphere-av serve`` with ``[api] listen``) and by tests (through
:func:`create_app` with Starlette's TestClient, or a real uvicorn on 127.0.0.1). Calls the
application face the CLI calls (``app.App``: status, detections, quarantine; ``app``'s
``controller_status`` and ``instant_on_timeline``), ``store.audit``, ``store.jobs``
(on-demand scan requests, as ``vsphere-av scan`` hands them to the controller), the
signature store, ``api.tokens``, ``api.metrics`` and ``api.report``.

Every route is named in ``access.API_ROUTES`` with the CLI command whose roles it needs; a
request carries a token (``Authorization: Bearer`` or, for the dashboard, the HttpOnly
``vsav_token`` cookie set by ``POST /login``) whose role must be allowed that command:
401 without a (live) token, 403 for a role that may not (audited as ``access.denied``).
Changes are audited with ``api:<token name>`` as actor. With the cookie, a change also needs
the ``X-Requested-With: vsphere-av`` header: a cross-site form cannot send it (CSRF).

Errors are JSON ``{"error": "..."}``: 400 malformed JSON, 422 unknown or mistyped fields, 413
a body over ``[api] max_body``, 404 an id that does not exist, 409 a guest file in the way;
nothing changes on any of them.
"""

# No "from __future__ import annotations": FastAPI reads the routes' annotations at
# definition time, and ``Who`` is local to create_app.
import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from vsphere_av import errors
from vsphere_av.api.tokens import TokenInfo, TokenStore
from vsphere_av.app import access
from vsphere_av.config import Settings
from vsphere_av.engine.signatures import SignatureStore
from vsphere_av.store.audit import AuditLog, AuditOnUse, current_actor

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "vsav_token"
CSRF_HEADER = "x-requested-with"
CSRF_VALUE = "vsphere-av"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
EVENTS_POLL = 0.5          # seconds between audit reads of an event stream
EVENTS_KEEPALIVE = 15.0    # a comment line this often keeps proxies from closing the stream
AUDIT_PAGE = 1000          # most entries one GET /api/v1/audit returns
CLUSTERS_TTL = 60.0        # seconds the overview reuses vCenter's host -> cluster map
# Dashboard pages: only our own script, styles and calls; never framed; no referrer.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY", "Cache-Control": "no-store"}

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]],
                    Callable[[MutableMapping[str, Any]], Awaitable[None]]], Awaitable[None]]


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# Product errors -> HTTP status (the first class in the MRO that is listed wins).
_STATUS: dict[type[errors.VsphereAvError], int] = {
    errors.NotFound: 404, errors.GuestFileNotFound: 404, errors.GuestFileExists: 409,
    errors.AccessDenied: 403, errors.ConfigError: 400, errors.SignatureError: 400,
    errors.TransientError: 503, errors.GuestUnavailable: 503, errors.ApplianceError: 503,
}


def status_for(exc: errors.VsphereAvError) -> int:
    """The HTTP status of a product error (502: vCenter or a guest failed us)."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 502


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token and how it came (bearer header or dashboard cookie)."""

    token: TokenInfo
    command: str
    via_cookie: bool

    @property
    def actor(self) -> str:
        """The audit actor for changes made through this token."""
        return f"api:{self.token.name}"


# -- request bodies: strict types, unknown fields refused ------------------------------------

class ScanRequest(BaseModel):
    """``POST /api/v1/scans``."""

    model_config = ConfigDict(extra="forbid")
    vms: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=255)]],
                   Field(min_length=1, max_length=1000)]
    full: StrictBool = False


class RestoreRequest(BaseModel):
    """``POST /api/v1/quarantine/{id}/restore`` (the body is optional)."""

    model_config = ConfigDict(extra="forbid")
    force: StrictBool = False


class LoginRequest(BaseModel):
    """``POST /login`` (the dashboard)."""

    model_config = ConfigDict(extra="forbid")
    token: Annotated[StrictStr, Field(min_length=1, max_length=256)]


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is 413 before any handler runs
    (checked on Content-Length and again while reading, for chunked bodies)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[MutableMapping[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(self.limit, send)
                return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await _too_large(self.limit, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send: Callable[[MutableMapping[str, Any]], Awaitable[None]]
                     ) -> None:
    body = json.dumps({"error": f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(*, settings: Settings, tokens: TokenStore, loopback: bool,
               tls: bool = False) -> FastAPI:
    """The ASGI application. ``loopback``: bound to loopback only (``/metrics`` needs no
    token then); ``tls``: served over HTTPS (the dashboard cookie is then ``Secure``)."""
    from vsphere_av.api import metrics as metrics_module
    from vsphere_av.api import report as report_module

    api = FastAPI(title="vsphere-av", version="1", openapi_url="/api/v1/openapi.json",
                  docs_url=None, redoc_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    api.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    api.state.closing = False     # set by ApiServer at shutdown: event streams end

    # -- errors as JSON ------------------------------------------------------------------

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        challenge = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=challenge)

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"},
                            status_code=500)

    @api.exception_handler(errors.VsphereAvError)
    async def _product_error(_request: Request, exc: errors.VsphereAvError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status_for(exc))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return JSONResponse({"error": "malformed JSON body"}, status_code=400)
        shown = [{"where": ".".join(str(x) for x in p.get("loc", ())), "problem": p.get("msg")}
                 for p in problems]
        first = shown[0] if shown else {"where": "", "problem": "invalid request"}
        return JSONResponse({"error": f"{first['where']}: {first['problem']}",
                             "problems": shown}, status_code=422)

    # -- authentication and roles --------------------------------------------------------

    def caller(request: Request) -> Caller:
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        command = access.API_ROUTES.get((request.method, path))
        if command is None:      # a route without a declared command is never served
            raise ApiError(403, f"{request.method} {path}: no role may call it")
        header = request.headers.get("authorization", "")
        via_cookie = False
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise ApiError(401, "authorization must be 'Bearer TOKEN'")
        else:
            value = request.cookies.get(COOKIE, "")
            via_cookie = bool(value)
        info = tokens.authenticate(value.strip()) if value else None
        if info is None:
            raise ApiError(401, "a valid API token is needed (vsphere-av api token create)")
        if not access.may_run(command, info.access_role):
            reason = f"{command} is not allowed to role {info.role}"
            with AuditLog.open(settings.state_dir) as audit:
                audit.append(actor=f"api:{info.name}", action="access.denied", details={
                    "command": command, "reason": reason, "route": f"{request.method} {path}"})
            raise ApiError(403, reason)
        if via_cookie and request.method not in SAFE_METHODS \
                and request.headers.get(CSRF_HEADER) != CSRF_VALUE:
            raise ApiError(403, f"a change from the dashboard needs the header "
                                f"X-Requested-With: {CSRF_VALUE}")
        return Caller(token=info, command=command, via_cookie=via_cookie)

    Who = Annotated[Caller, Depends(caller)]

    @contextmanager
    def application(who: Caller | None = None) -> Iterator[Any]:
        from vsphere_av.app import App

        app = App(settings, actor=who.actor if who else None)
        try:
            yield app
        finally:
            app.close()

    def changed(who: Caller, action: str, **details: Any) -> None:
        """Audit a change made through the API, the token's name as actor."""
        with AuditLog.open(settings.state_dir) as audit:
            audit.append(actor=who.actor, action=action,
                         details={**details, "role": who.token.role})

    # -- reading ---------------------------------------------------------------------------

    clusters_cache: dict[str, Any] = {"at": None, "map": {}}
    clusters_lock = threading.Lock()

    def host_clusters() -> dict[str, str]:
        """Host name -> cluster name from vCenter, at most once a minute (the overview);
        the last map (or none) while vCenter does not answer."""
        if not settings.vcenter.server:
            return {}
        with clusters_lock:
            at = clusters_cache["at"]
            if at is not None and time.monotonic() - at < CLUSTERS_TTL:
                return dict(clusters_cache["map"])
        from vsphere_av.vsphere import inventory

        try:
            with application() as app:
                mapping = inventory.host_clusters(app.connection)
        except errors.VsphereAvError as exc:
            log.warning("overview: clusters not read: %s", exc)
            mapping = dict(clusters_cache["map"])
        with clusters_lock:
            clusters_cache.update(at=time.monotonic(), map=mapping)
        return mapping

    def vms_document() -> dict[str, Any]:
        from vsphere_av.app import controller_status

        with application() as app:
            rows = app.status(refresh=False)
        ctl = controller_status(settings)
        isolated = set(ctl["isolated"])
        for row in rows:
            row["isolated"] = row["moref"] in isolated
        return {"vms": rows, "hosts": ctl["hosts"]}

    def vm_document(moref: str) -> dict[str, Any]:
        from vsphere_av.app import instant_on_timeline
        from vsphere_av.models import VmId
        from vsphere_av.store.jobs import JobStore

        doc = vms_document()
        row = next((r for r in doc["vms"] if r["moref"] == moref), None)
        if row is None:
            raise ApiError(404, f"no VM {moref!r} in the state store")
        with JobStore.open(settings.state_dir) as jobs:
            exposures = [exposure_row(e) for e in jobs.exposures(moref)]
        with application() as app:
            detections = [d for d in app.detections() if d["moref"] == moref]
            scans = app.store.scans(vm_moref=VmId(moref), limit=20)
        return {**row, "timeline": instant_on_timeline(settings, moref),
                "exposures": exposures, "detections": detections, "scans": scans}

    @api.get("/api/v1/vms")
    def list_vms(_who: Who) -> dict[str, Any]:
        """Every VM's protection state (``status --json``)."""
        return vms_document()

    @api.get("/api/v1/vms/{moref}")
    def get_vm(moref: str, _who: Who) -> dict[str, Any]:
        """One VM's state, its instant-on timeline, exposures, detections and scans."""
        return vm_document(moref)

    @api.get("/api/v1/detections")
    def list_detections(_who: Who) -> dict[str, Any]:
        """Every detection and what was done about it (``detections --json``)."""
        with application() as app:
            return {"detections": app.detections()}

    @api.get("/api/v1/quarantine")
    def list_quarantine(_who: Who) -> dict[str, Any]:
        """Quarantined files (``quarantine list --json``)."""
        with application() as app:
            return {"items": app.quarantine_list()}

    @api.post("/api/v1/quarantine/{item_id}/restore")
    def restore(item_id: str, who: Who, body: RestoreRequest | None = None) -> dict[str, Any]:
        """Put a quarantined file back in its guest (``quarantine restore --json``)."""
        with application(who) as app:
            known_item(app, item_id)
            return dict(app.quarantine_restore(item_id, force=bool(body and body.force)))

    @api.delete("/api/v1/quarantine/{item_id}")
    def purge(item_id: str, who: Who) -> dict[str, Any]:
        """Delete a quarantined file's bytes for good (``quarantine purge --json``)."""
        with application(who) as app:
            known_item(app, item_id)
            return dict(app.quarantine_purge(item_id))

    def known_item(app: Any, item_id: str) -> None:
        if not any(row["id"] == item_id for row in app.quarantine_list()):
            raise ApiError(404, f"no quarantine item {item_id!r}")

    @api.post("/api/v1/scans", status_code=202)
    def request_scans(body: ScanRequest, who: Who) -> dict[str, Any]:
        """Queue on-demand scans with the running controller; 202 with one job id per VM."""
        from vsphere_av.store.jobs import JobStore

        with application() as app:
            states = app.store.vm_states()
        by_key = {s.name: s for s in states} | {str(s.moref): s for s in states}
        missing = [name for name in body.vms if name not in by_key]
        if missing:
            raise ApiError(404, f"no VM named {', '.join(repr(m) for m in missing)} "
                                "in the state store")
        wanted = list(dict.fromkeys(str(by_key[name].moref) for name in body.vms))
        with JobStore.open(settings.state_dir) as jobs:
            running = jobs.controller_alive()
            ids = [(moref, jobs.add_request(vm=moref, full=body.full)) for moref in wanted]
        changed(who, "api.scan.request", vms=wanted, full=body.full,
                job_ids=[i for _, i in ids])
        return {"jobs": [{"id": i, "vm": by_key[m].name, "moref": m} for m, i in ids],
                "full": body.full, "controller_running": running}

    @api.get("/api/v1/scans/{request_id}")
    def get_scan(request_id: int, _who: Who) -> dict[str, Any]:
        """One scan job: queued, taken by the controller, or finished with its scan record."""
        from vsphere_av.models import VmId
        from vsphere_av.store.jobs import JobStore

        with JobStore.open(settings.state_dir) as jobs:
            request = jobs.request(request_id)
        if request is None:
            raise ApiError(404, f"no scan job {request_id}")
        vm, full, created, taken = request
        with application() as app:
            rows = app.store.scans(vm_moref=VmId(vm), limit=50)
        created_iso = iso(created)
        since = "" if taken is None else datetime.fromtimestamp(int(taken), UTC).isoformat(
            timespec="seconds")          # scan records keep whole seconds
        after = [r for r in rows if taken is not None and r["started"] >= since]
        scan = after[-1] if after else None          # the first scan since it was taken
        state = "queued" if taken is None else (
            "finished" if scan is not None and scan["finished"] else "running" if scan
            else "taken")
        return {"id": request_id, "moref": vm, "full": full, "created": created_iso,
                "taken": iso(taken) if taken is not None else None, "state": state,
                "scan": scan}

    @api.get("/api/v1/audit")
    def audit_entries(_who: Who, after: Annotated[int, Field(ge=0)] = 0,
                      limit: Annotated[int, Field(ge=1, le=AUDIT_PAGE)] = AUDIT_PAGE
                      ) -> dict[str, Any]:
        """Audit entries after sequence ``after`` (as ``audit export`` writes them)."""
        with AuditLog.open(settings.state_dir) as audit:
            entries = [e.as_dict() for e in audit.entries(after=after, limit=limit)]
            seq, digest = audit.head()
        return {"entries": entries, "head": {"seq": seq, "hash": digest}}

    @api.get("/api/v1/audit/verify")
    def audit_verify(_who: Who) -> dict[str, Any]:
        """The hash chain's check (``audit verify --json``)."""
        with AuditLog.open(settings.state_dir) as audit:
            result = audit.verify()
        return {"ok": result.ok, "entries": result.entries,
                "first_bad_entry": result.first_bad_seq, "message": result.message}

    @api.get("/api/v1/signatures")
    def list_signatures(_who: Who) -> list[dict[str, Any]]:
        """Every stored signature version (``signatures list --json``)."""
        return [i.as_dict() for i in signature_store().infos()]

    @api.post("/api/v1/signatures/{version}/activate")
    def activate(version: int, who: Who) -> dict[str, Any]:
        """Make a stored version the active one."""
        store = signature_store()
        if version not in store.versions():
            raise ApiError(404, f"no signature version {version}")
        info = store.activate(version)
        changed(who, "api.signatures.activate", version=version)
        return info.as_dict()

    def signature_store() -> SignatureStore:
        """The store; it records its changes (activations, the built-in bundle's import)
        in the audit log under the API process's own actor."""
        from vsphere_av.engine import Engine

        store: SignatureStore = Engine.open(
            settings, use_cache=False, audit=AuditOnUse(settings.state_dir),
            actor=current_actor(state_dir=settings.state_dir)).store
        return store

    @api.get("/api/v1/appliances")
    def list_appliances(_who: Who) -> dict[str, Any]:
        """Every appliance and the hosts whose appliance is down (``appliances list --json``)."""
        return appliances_document()

    def appliances_document() -> dict[str, Any]:
        from vsphere_av.fleet.health import read_health
        from vsphere_av.fleet.manager import open_manager

        if not settings.appliances.enabled:
            return {"appliances": [], "down": read_health(settings.state_dir), "enabled": False}
        with application() as app:
            manager = open_manager(settings, connection=app.connection, audit=app.audit,
                                   actor=app.actor)
            down = manager.down_hosts()
            rows = [{"host": a.host, "host_id": a.host_id, "vm": a.vm, "vm_id": a.vm_id,
                     "address": a.address or None, "powered_on": a.powered_on,
                     "down": down.get(a.host_id)} for a in manager.appliances()]
        return {"appliances": rows, "down": down, "enabled": True}

    @api.get("/api/v1/events")
    async def events(request: Request, who: Who,
                     after: Annotated[int | None, Field(ge=0)] = None) -> StreamingResponse:
        """New audit entries as Server-Sent Events (``id`` = the entry's sequence number)."""
        import anyio.to_thread

        def head() -> int:
            with AuditLog.open(settings.state_dir) as audit:
                return audit.head()[0]

        last_id = request.headers.get("last-event-id", "")
        start = int(last_id) if last_id.isdigit() else after
        if start is None:
            start = await anyio.to_thread.run_sync(head)

        def read(since: int) -> list[dict[str, Any]]:
            with AuditLog.open(settings.state_dir) as audit:
                return [e.as_dict() for e in audit.entries(after=since, limit=500)]

        async def stream() -> AsyncIterator[str]:
            seen = start
            quiet = 0.0
            yield f"retry: 2000\n: audit entries after {seen}\n\n"
            # A token revoked while its stream is open ends the stream at the next poll.
            while not api.state.closing and not await request.is_disconnected() \
                    and await anyio.to_thread.run_sync(tokens.live, who.token.name):
                entries = await anyio.to_thread.run_sync(read, seen)
                for entry in entries:
                    seen = entry["seq"]
                    yield f"id: {seen}\nevent: audit\ndata: {json.dumps(entry)}\n\n"
                if entries:
                    quiet = 0.0
                    continue
                await asyncio.sleep(EVENTS_POLL)
                quiet += EVENTS_POLL
                if quiet >= EVENTS_KEEPALIVE:
                    quiet = 0.0
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @api.get("/api/v1/report")
    def get_report(_who: Who, since: str = "", fmt: Annotated[str, Field(
            alias="format", pattern="^(json|html|csv|pdf)$")] = "json") -> Response:
        """The report of ``vsphere-av report`` (JSON by default; html, csv or pdf)."""
        start = report_module.parse_since(since)
        document = report_module.build(settings=settings, since=start)
        if fmt == "json":
            return JSONResponse(document)
        body, media = report_module.render(document, fmt=fmt)
        return Response(body, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="vsphere-av-report.{fmt}"'})

    @api.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus text format; a token is needed unless the API is bound to loopback."""
        if not loopback:
            caller(request)
        body, media = metrics_module.render(settings=settings)
        return Response(body, media_type=media)

    # -- the dashboard -------------------------------------------------------------------

    class _LoginFirst(Exception):
        """A dashboard page asked for without a valid session: the login page instead."""

    @api.exception_handler(_LoginFirst)
    async def _login_first(_request: Request, _exc: _LoginFirst) -> RedirectResponse:
        return RedirectResponse("/login", status_code=303)

    def viewer(request: Request) -> Caller:
        """The dashboard's caller; without one the page redirects to the login page."""
        try:
            return caller(request)
        except ApiError as exc:
            if exc.status == 401:
                raise _LoginFirst() from exc
            raise

    Viewer = Annotated[Caller, Depends(viewer)]

    def page(request: Request, name: str, who: Caller, **context: Any) -> HTMLResponse:
        response = templates.TemplateResponse(request, name, {
            "who": who, "may": lambda command: access.may_run(command, who.token.access_role),
            **context})
        response.headers.update(PAGE_HEADERS)
        return response

    @api.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> HTMLResponse:
        """The dashboard's login form (a token, kept in an HttpOnly cookie)."""
        response = templates.TemplateResponse(request, "login.html", {"who": None})
        response.headers.update(PAGE_HEADERS)
        return response

    @api.post("/login")
    def login(body: LoginRequest) -> JSONResponse:
        """Check a token and keep it in the session cookie."""
        info = tokens.authenticate(body.token.strip())
        if info is None:
            raise ApiError(401, "unknown or revoked token")
        response = JSONResponse({"name": info.name, "role": info.role})
        response.set_cookie(COOKIE, body.token.strip(), httponly=True, samesite="strict",
                            secure=tls, path="/")
        return response

    @api.post("/logout")
    def logout() -> JSONResponse:
        """Forget the session cookie."""
        response = JSONResponse({"ok": True})
        response.delete_cookie(COOKIE, path="/")
        return response

    @api.get("/", response_class=HTMLResponse)
    def overview(request: Request, who: Viewer) -> Response:
        """Fleet overview: counts by state per host, live through the event stream."""
        doc = vms_document()
        clusters = host_clusters()
        return page(request, "overview.html", who,
                    overview=fleet_counts(doc["vms"], clusters=clusters), clusters=clusters,
                    vms=doc["vms"], hosts=doc["hosts"])

    @api.get("/vms/{moref}", response_class=HTMLResponse)
    def vm_page(request: Request, moref: str, who: Viewer) -> Response:
        """One VM: its state, exposure timeline, detections and scans."""
        return page(request, "vm.html", who, vm=vm_document(moref))

    @api.get("/detections", response_class=HTMLResponse)
    def detections_page(request: Request, who: Viewer) -> Response:
        """Every detection."""
        with application() as app:
            rows = app.detections()
        return page(request, "detections.html", who, detections=rows)

    @api.get("/quarantine", response_class=HTMLResponse)
    def quarantine_page(request: Request, who: Viewer) -> Response:
        """The quarantine, with restore and purge for those allowed."""
        with application() as app:
            rows = app.quarantine_list()
        return page(request, "quarantine.html", who, items=rows)

    @api.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, who: Viewer) -> Response:
        """The audit log's last entries and its verification result."""
        with AuditLog.open(settings.state_dir) as audit:
            result = audit.verify()
            seq, _ = audit.head()
            entries = [e.as_dict() for e in audit.entries(after=max(0, seq - 200))]
        return page(request, "audit.html", who, verify=result, entries=list(reversed(entries)))

    @api.get("/signatures", response_class=HTMLResponse)
    def signatures_page(request: Request, who: Viewer) -> Response:
        """Signature versions."""
        return page(request, "signatures.html", who,
                    versions=[i.as_dict() for i in signature_store().infos()])

    @api.get("/appliances", response_class=HTMLResponse)
    def appliances_page(request: Request, who: Viewer) -> Response:
        """Appliance health."""
        return page(request, "appliances.html", who, doc=appliances_document())

    @api.get("/health", response_class=PlainTextResponse)
    def health() -> str:
        """Liveness for load balancers (no data, no token)."""
        return "ok\n"

    return api


def fleet_counts(rows: list[dict[str, Any]], *, clusters: dict[str, str]) -> dict[str, Any]:
    """VM counts by protection state: in total, per cluster and per host of each cluster
    (the overview's table; ``clusters``: host name -> cluster name, "" standalone)."""
    states = ("protected", "stale", "infected", "unprotected", "unreachable")
    total = dict.fromkeys(states, 0)
    by_cluster: dict[str, dict[str, Any]] = {}
    for row in rows:
        state = row["state"] if row["state"] in total else "unprotected"
        total[state] += 1
        host = row["host"] or "(no host)"
        cluster = by_cluster.setdefault(clusters.get(host, "") or "(no cluster)",
                                        {"total": dict.fromkeys(states, 0), "hosts": {}})
        cluster["total"][state] += 1
        cluster["hosts"].setdefault(host, dict.fromkeys(states, 0))[state] += 1
    for cluster in by_cluster.values():
        cluster["hosts"] = dict(sorted(cluster["hosts"].items()))
    return {"states": states, "total": total, "clusters": dict(sorted(by_cluster.items()))}


def exposure_row(e: Any) -> dict[str, Any]:
    """One exposure as JSON (times ISO, window in seconds)."""
    return {"id": e.exposure_id, "moref": e.vm, "vm": e.vm_name, "trigger": e.trigger,
            "started": iso(e.started), "isolated": iso(e.isolated), "clean": iso(e.clean),
            "closed": iso(e.closed), "outcome": e.outcome, "window": e.window}


def iso(t: float | None) -> str | None:
    """A UNIX time as ISO 8601 UTC (milliseconds), None stays None."""
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(
        timespec="milliseconds")
