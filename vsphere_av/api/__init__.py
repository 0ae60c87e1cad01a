"""The console: REST API, web dashboard, Prometheus metrics and reports (issue 14).

Called by ``app.start_controller`` (``vsphere-av serve`` hands it :class:`ApiServer`; with
``[api] listen`` it builds one and runs :meth:`ApiServer.serve` in its own thread, threads
starting only in ``app``), by ``cli`` (``api token ...`` through ``api.tokens``,
``report`` through ``api.report``) and by tests. Calls ``api.server`` (the ASGI
application) and uvicorn.

Nothing listens beyond loopback unless ``[api] tls_cert`` and ``tls_key`` are set: tokens
would cross the network in clear (the rule of ``engine serve``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from vsphere_av.config import Settings
from vsphere_av.errors import ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[V6]:PORT`` -> (host, port); ConfigError when malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"api.listen {value!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class ApiServer:
    """The console bound to ``[api] listen``; :meth:`serve` blocks until :meth:`stop`.

    The socket is bound in the constructor, so a port in use fails ``serve`` at start-up
    and ``url`` names the real port when ``listen`` asks for port 0.
    """

    def __init__(self, *, settings: Settings, tokens: Any = None) -> None:
        import uvicorn

        from vsphere_av.api.server import BodyLimit, create_app
        from vsphere_av.api.tokens import TokenStore

        section = settings.api
        host, port = parse_listen(section.listen)
        tls = bool(section.tls_cert or section.tls_key)
        if tls and not (section.tls_cert and section.tls_key):
            raise ConfigError("api: tls_cert and tls_key go together")
        if not is_loopback(host) and not tls:
            raise ConfigError(f"api: refusing to listen on {host} without TLS "
                              "(set [api] tls_cert and tls_key, or listen on 127.0.0.1)")
        self.tokens = tokens or TokenStore(state_dir=settings.state_dir)
        self._own_tokens = tokens is None
        self.app = create_app(settings=settings, tokens=self.tokens, loopback=is_loopback(host),
                              tls=tls)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise ConfigError(f"api: cannot listen on {section.listen}: {exc.strerror}") from exc
        bound = self.socket.getsockname()
        shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        self.url = f"{'https' if tls else 'http'}://{shown}:{bound[1]}"
        config = uvicorn.Config(
            BodyLimit(self.app, limit=section.max_body), log_level="warning",
            access_log=False, lifespan="off", timeout_graceful_shutdown=3,
            ssl_certfile=section.tls_cert or None, ssl_keyfile=section.tls_key or None)
        self.server = uvicorn.Server(config)

    def serve(self) -> None:
        """Serve until :meth:`stop` (the body of the ``api`` thread in ``app``)."""
        log.info("console and API at %s", self.url)
        self.server.run(sockets=[self.socket])

    def stop(self) -> None:
        """Ask the server to finish: event streams end, open requests complete."""
        self.app.state.closing = True
        self.server.should_exit = True

    def close(self) -> None:
        """Release the socket and the token store (after the serving thread ended)."""
        self.socket.close()
        if self._own_tokens:
            self.tokens.close()
