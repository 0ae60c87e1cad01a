"""One authenticated vCenter session, with TLS trust decided here and re-login on session loss.

Called by ``app`` (and later the controller's watch loops) through :func:`connect`; the
adapter modules (``inventory``, ``guest``, ...) run every SOAP call through
:meth:`Connection.call`, which logs in again once when vCenter says the session is gone
(``NotAuthenticated``) and translates every other fault into ``vsphere_av.errors``: vCenter
not answering, or the session lost again right after logging in, is ``ConnectionLost``.
Calls pyVmomi and the ``ssl`` module.

TLS trust, in this order of preference:
  * ``ca_file``: the server certificate must chain to it and match the host name;
  * ``thumbprint``: the SHA-256 fingerprint of the server's certificate must equal the pinned
    one. It is checked here first, on a separate TLS handshake, to give a clear error naming
    expected and actual fingerprints, and then again by pyVmomi on every connection it opens;
  * ``insecure``: no verification, only when asked for explicitly.
With none of the three the connection is refused: there is no silent fallback.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from pyVim import connect as pyvim_connect
from pyVmomi import vim, vmodl
from pyVmomi.Security import ThumbprintMismatchException

from vsphere_av import errors
from vsphere_av.config import VcenterSettings
from vsphere_av.vsphere.faults import is_not_authenticated, translate

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 30.0


def format_thumbprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as upper-case colon-separated hex."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def fetch_certificate(host: str, port: int, *, timeout: float = CONNECT_TIMEOUT) -> bytes:
    """The DER certificate the server presents (no verification: only used for pinning)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except OSError as exc:
        raise errors.ConnectionLost(f"cannot reach {host}:{port}: {exc}") from exc
    if not der:
        raise errors.TlsVerificationError(f"{host}:{port} presented no certificate")
    return der


def check_thumbprint(host: str, port: int, expected: str) -> None:
    """Raise TlsVerificationError unless the server's certificate has the pinned SHA-256."""
    got = format_thumbprint(fetch_certificate(host, port))
    if got != expected.upper():
        raise errors.TlsVerificationError(
            f"certificate of {host}:{port} does not match the pinned thumbprint: "
            f"expected {expected.upper()}, got {got}"
        )


@dataclass(frozen=True)
class TlsTrust:
    """How to verify a TLS peer: CA bundle, pinned SHA-256 thumbprint, or nothing (insecure)."""

    ca_file: str = ""
    thumbprint: str = ""
    insecure: bool = False

    def ssl_context(self) -> ssl.SSLContext:
        """An SSL context for this trust (pinning is checked separately)."""
        if self.ca_file:
            return ssl.create_default_context(cafile=self.ca_file)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def describe(self) -> str:
        """One word for logs: ca | thumbprint | insecure."""
        return "ca" if self.ca_file else "thumbprint" if self.thumbprint else "insecure"


def trust_from(settings: VcenterSettings) -> TlsTrust:
    """The TLS trust configured for vCenter; ConfigError when none is configured."""
    if settings.ca_file:
        return TlsTrust(ca_file=settings.ca_file)
    if settings.thumbprint:
        return TlsTrust(thumbprint=settings.thumbprint)
    if settings.insecure:
        return TlsTrust(insecure=True)
    raise errors.ConfigError(
        "no way to verify vCenter's certificate: set VSPHERE_AV_CA_FILE or VSPHERE_AV_THUMBPRINT "
        "(or pass --insecure to skip verification)"
    )


class Connection:
    """A logged-in vCenter session; thread-safe; re-logs in once when the session is lost."""

    def __init__(self, *, settings: VcenterSettings, trust: TlsTrust) -> None:
        self._settings = settings
        self.trust = trust
        self._lock = threading.Lock()
        self._generation = 0
        self._si: Any = None
        self.relogins = 0
        self._login()

    def __repr__(self) -> str:
        return (f"Connection(server={self._settings.server!r}, port={self._settings.port}, "
                f"user={self._settings.user!r}, trust={self.trust.describe()!r})")

    @property
    def server(self) -> str:
        """Host name or address of vCenter."""
        return self._settings.server

    @property
    def port(self) -> int:
        """HTTPS port of vCenter."""
        return self._settings.port

    def _login(self) -> None:
        s = self._settings
        if self.trust.thumbprint:
            check_thumbprint(s.server, s.port, self.trust.thumbprint)
        try:
            self._si = pyvim_connect.SmartConnect(
                host=s.server, port=s.port, user=s.user, pwd=s.password.reveal(),
                sslContext=self.trust.ssl_context(),
                thumbprint=self.trust.thumbprint or None,
                httpConnectionTimeout=CONNECT_TIMEOUT,
            )
        except ssl.SSLCertVerificationError as exc:
            raise errors.TlsVerificationError(
                f"certificate of {s.server}:{s.port} did not verify against {s.ca_file}: "
                f"{exc.verify_message}") from exc
        except vim.fault.InvalidLogin as exc:
            raise errors.VsphereError(
                f"vCenter {s.server}:{s.port} rejected the login for user {s.user!r}") from exc
        except (vmodl.MethodFault, OSError, ThumbprintMismatchException) as exc:
            raise translate(exc, what=f"connect to {s.server}:{s.port}") from exc
        self._content = self._si.RetrieveContent()
        self._singletons: dict[str, Any] = {}

    def relogin(self, generation: int) -> None:
        """Log in again unless another thread already did since ``generation``."""
        with self._lock:
            if generation != self._generation:
                return
            log.info("vCenter session lost; logging in again")
            try:
                self._content.sessionManager.Login(self._settings.user,
                                                   self._settings.password.reveal())
            except vim.fault.InvalidLogin as exc:
                raise errors.VsphereError("vCenter rejected the login on re-login") from exc
            except Exception:
                # The stub itself may be unusable (connection reset): start over.
                self._login()
            self._generation += 1
            self.relogins += 1

    def call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run ``fn(content)``; re-login once on session loss; translate faults into errors."""
        for attempt in (1, 2):
            generation = self._generation
            try:
                return fn(self._content)
            except errors.VsphereAvError:
                raise
            except Exception as exc:
                if is_not_authenticated(exc) and attempt == 1:
                    self.relogin(generation)
                    continue
                if isinstance(exc, vmodl.MethodFault | OSError | http.client.HTTPException
                              | ThumbprintMismatchException):
                    raise translate(exc, what=what) from exc
                raise
        raise errors.ConnectionLost(f"{what}: vCenter session lost twice in a row")

    def singleton(self, name: str, fetch: Callable[[Any], Any]) -> Any:
        """A service object such as the guest file manager, fetched once per login.

        Reading ``content.guestOperationsManager.fileManager`` is a property round trip;
        doing it once instead of once per guest call saves a third of the SOAP traffic.
        """
        cached = self._singletons.get(name)
        if cached is None:
            cached = self.call(f"read {name}", fetch)
            self._singletons[name] = cached
        return cached

    @property
    def stub(self) -> Any:
        """The SOAP stub, for building managed object references inside the adapter."""
        return self._si._stub

    def ref(self, kind: str, moref: str) -> Any:
        """A managed object reference (``kind`` such as "VirtualMachine") bound to this session."""
        return getattr(vim, kind)(moref, self._si._stub)

    def current_time(self) -> datetime:
        """vCenter's clock (``ServiceInstance.CurrentTime``), time zone aware.

        Event times are vCenter's: a starting point for reading events comes from here, never
        from the local clock (the two may differ by minutes).
        """
        moment = self.call("read vCenter time", lambda _c: self._si.CurrentTime())
        if not isinstance(moment, datetime):
            raise errors.VsphereError(f"read vCenter time: unexpected answer {moment!r}")
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)

    def session_key(self) -> str:
        """Key of the current vCenter session (what an administrator would terminate)."""
        return str(self.call("read session", lambda c: c.sessionManager.currentSession.key))

    def close(self) -> None:
        """Log out; never raises."""
        try:
            if self._si is not None:
                pyvim_connect.Disconnect(self._si)
        except Exception as exc:  # logging out of a dead session is not an error
            log.debug("logout failed: %s", exc)
        self._si = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(settings: VcenterSettings) -> Connection:
    """Log in to vCenter with the configured TLS trust."""
    if not settings.server:
        raise errors.ConfigError(
            "no vCenter server configured: set VSPHERE_AV_SERVER or vcenter.server")
    if not settings.user:
        raise errors.ConfigError("no vCenter user configured: set VSPHERE_AV_USER or vcenter.user")
    return Connection(settings=settings, trust=trust_from(settings))
