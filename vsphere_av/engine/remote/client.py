"""The engine service's client: scans sent to one appliance (the controller side).

Called by ``fleet.manager`` (scan routing and health checks: :class:`RemoteEngine` for a
host's appliance, :class:`EngineClient` for ``/health``), ``lab.demo`` and, through
:class:`RemoteSession`, the scan path (``scan.job``), which sees a remote engine in the shape
of ``engine.Engine``. Calls the service's routes (see ``server.py``) with ``requests``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from vsphere_av.errors import EngineError
from vsphere_av.models import TransferChunks


class EngineClient:
    """Talks to one engine service (the controller side); raises EngineError on failures."""

    def __init__(self, base_url: str, *, token: str, timeout: float = 120.0,
                 ca_file: str = "") -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self._token = token
        self._ca_file = ca_file
        self._timeout = timeout
        self._http = requests.Session()
        self._http.trust_env = False       # straight to the appliance: no proxy from the env
        self._verify: str | bool = ca_file or True

    def __repr__(self) -> str:
        return f"EngineClient({self.base_url!r})"

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def clone(self) -> EngineClient:
        """A client of the same service with connections of its own (for another thread)."""
        return EngineClient(self.base_url, token=self._token, timeout=self._timeout,
                            ca_file=self._ca_file)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _request(self, method: str, route: str, **kw: Any) -> dict[str, Any]:
        import requests

        kw.setdefault("timeout", self._timeout)
        try:
            response = self._http.request(method, self.base_url + route,
                                          headers=self._headers(), verify=self._verify, **kw)
        except requests.RequestException as exc:
            raise EngineError(f"engine service {self.base_url} unreachable: "
                              f"{type(exc).__name__}") from exc
        try:
            document = response.json()
        except ValueError:
            document = {}
        if response.status_code != 200:
            message = document.get("error") if isinstance(document, dict) else None
            raise EngineError(f"engine service {self.base_url} answered HTTP "
                              f"{response.status_code}: {message or response.reason}")
        if not isinstance(document, dict):
            raise EngineError(f"engine service {self.base_url} sent a malformed answer")
        return document

    def health(self) -> dict[str, Any]:
        """The detailed health document (signature version, load, uptime)."""
        return self._request("GET", "/health")

    def call(self, route: str, document: dict[str, Any], *,
             timeout: float | None = None) -> dict[str, Any]:
        """POST a JSON object to one of the service's added routes; its JSON answer."""
        kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        return self._request("POST", route, json=document, **kw)

    def scan_stream(self, chunks: Iterable[bytes], *, path: str, name: str | None = None,
                    owner: str = "", size_hint: int | None = None) -> Any:
        """Stream a file to the service; returns an ``engine.FileOutcome``."""
        params = {"path": path, "owner": owner, **({"name": name} if name else {})}
        document = self._request("POST", "/v1/scan", params=params, data=iter(chunks))
        return outcome_from_json(document)

    def scan_url(self, url: str, *, path: str, thumbprint: str, owner: str = "",
                 size_hint: int | None = None) -> Any:
        """Have the appliance pull a guest transfer URL and scan it; an ``engine.FileOutcome``."""
        document = self._request("POST", "/v1/scan-url", json={
            "url": url, "path": path, "thumbprint": thumbprint, "owner": owner,
            "size": size_hint})
        return outcome_from_json(document)


def outcome_from_json(document: dict[str, Any]) -> Any:
    """An ``engine.FileOutcome`` from the service's JSON (signature_version dropped)."""
    from vsphere_av.engine import Detection, FileOutcome

    try:
        return FileOutcome(
            path=str(document["path"]), status=document["status"],
            sha256=str(document["sha256"]), size=int(document["size"]),
            detections=tuple(Detection(threat=d["threat"], source=d["source"], rule=d["rule"],
                                       member=d.get("member", ""))
                             for d in document.get("detections", [])),
            reason=str(document.get("reason", "")), cached=bool(document.get("cached")))
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"malformed scan result from the engine service: {exc}") from exc


class RemoteSession:
    """Shape of ``engine.Session`` for the scan path: ``version``, ``scan_stream``, ``scan_url``."""

    def __init__(self, client: EngineClient, version: int) -> None:
        self.client = client
        self.version = version

    def scan_stream(self, chunks: Iterable[bytes], *, path: str, name: str | None = None,
                    owner: str = "", size_hint: int | None = None) -> Any:
        """Scan through the appliance: it pulls a transfer URL itself, or gets the stream."""
        if isinstance(chunks, TransferChunks) and chunks.thumbprint:
            return self.client.scan_url(chunks.url, path=path, thumbprint=chunks.thumbprint,
                                        owner=owner, size_hint=chunks.size)
        return self.client.scan_stream(chunks, path=path, name=name, owner=owner,
                                       size_hint=size_hint)

    def lookup(self, sha256: str, *, path: str, **_: Any) -> None:
        """No controller-side verdict cache for remote scans (the appliance keeps its own)."""
        return None

    def scan_url(self, url: str, *, path: str, thumbprint: str, owner: str = "",
                 size_hint: int | None = None) -> Any:
        """Let the appliance pull the guest transfer URL itself."""
        return self.client.scan_url(url, path=path, thumbprint=thumbprint, owner=owner,
                                    size_hint=size_hint)


class RemoteEngine:
    """Same shape as ``engine.Engine`` (``session()``, ``active_version()``) for one appliance."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def active_version(self) -> int:
        """The appliance's active signature version."""
        version = self.client.health().get("signature_version")
        if not isinstance(version, int) or version <= 0:
            raise EngineError(f"{self.client.base_url}: no active signature version")
        return version

    @contextlib.contextmanager
    def session(self, *, version: int | None = None) -> Iterator[RemoteSession]:
        """A session bound to the appliance's active version at the time of the call; with
        ``version``, EngineError when that is another one (``engine.Engine.session`` pins
        ``version``; a service cannot be made to)."""
        try:
            active = self.active_version()
            if version is not None and active != version:
                raise EngineError(f"{self.client.base_url}: scans with signature version "
                                  f"{active}, not {version}")
            yield RemoteSession(self.client, active)
        finally:
            self.client.close()   # pooled connections only; the client opens new ones later
