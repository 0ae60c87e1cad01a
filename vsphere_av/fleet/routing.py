"""Engine routing: which appliance scans which host's VMs, read once per reconcile.

Called by ``fleet.manager`` (``ApplianceManager.engine_for_host``, which ``app``'s scan path
asks for every scan; ``reconcile`` and ``upgrade`` mark the fleet changed). Calls the
adapter's ``addresses()`` (one vCenter read of every appliance) only when the routes are
stale, and the file system for the mark.

The routes (host moref -> the serving appliance's address) are read on first use and again
only after the fleet changed: every reconcile round and every upgrade step rewrites
``<state_dir>/appliances/routes.stamp`` (in any process: ``serve``'s loop, ``appliances
reconcile``, ``appliances upgrade``), and a differing stamp makes the next scan read them
again. Between two reads an appliance may stop, so nothing is trusted blindly:

  * a host without a serving appliance in the routes is read again before its scan is
    refused with ``appliance down`` (a new appliance is used as soon as it runs);
  * a route whose engine does not answer when a scan starts is read again once: no
    appliance running there any more -> ``ApplianceError("appliance down")`` (the job waits
    for the reconcile loop, exactly as with a fresh read); another address -> that one; the
    same one -> the engine's own error.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vsphere_av.errors import ApplianceError, EngineError
from vsphere_av.fleet.health import version_reason
from vsphere_av.fleet.plan import APPLIANCE_DOWN
from vsphere_av.models import ApplianceAddress

ROUTES_STAMP = Path("appliances") / "routes.stamp"


def serving_addresses(appliances: Iterable[ApplianceAddress]) -> dict[str, str]:
    """Host moref -> address of the appliance that scans its VMs: a running one with an
    address, the serving one before an upgrade's standby (used only when nothing else runs)."""
    out: dict[str, str] = {}
    running = [a for a in appliances if a.powered_on and a.address]
    for app in sorted(running, key=lambda a: a.standby):
        out.setdefault(app.host_id, app.address)
    return out


def mark_fleet_changed(state_dir: Path | str) -> None:
    """Make every process's routes stale (replaced atomically: a new inode each time)."""
    path = Path(state_dir) / ROUTES_STAMP
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".routes.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text("the appliance fleet changed: engine routes are read again\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def _stamp(state_dir: Path) -> tuple[int, int]:
    try:
        st = os.stat(state_dir / ROUTES_STAMP)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_ino)


class EngineRoutes:
    """The routes of one controller's fleet, shared by its scan threads.

    ``read`` returns every appliance (the adapter's ``addresses``); ``connect(address)`` a
    ``RemoteEngine`` for the engine service there. :attr:`reads` counts the reads.
    """

    def __init__(self, *, state_dir: Path | str, read: Callable[[], Sequence[ApplianceAddress]],
                 connect: Callable[[str], Any]) -> None:
        self._state_dir = Path(state_dir)
        self._read = read
        self._connect = connect
        self._lock = threading.Lock()
        self._routes: Mapping[str, str] | None = None
        self._stamp: tuple[int, int] = (0, 0)
        self.reads = 0

    def __repr__(self) -> str:
        return f"EngineRoutes({str(self._state_dir)!r}, reads={self.reads})"

    def address(self, host_id: str, *, again: bool = False) -> str | None:
        """The serving appliance's address for ``host_id`` (None: none runs there).

        ``again``: read the routes anew whatever the stamp says.
        """
        with self._lock:
            stamp = _stamp(self._state_dir)
            fresh = again or self._routes is None or stamp != self._stamp
            if fresh:
                self._load(stamp)
            assert self._routes is not None
            found = self._routes.get(host_id)
            if found is None and not fresh:    # a host without an appliance: look again
                self._load(stamp)
                found = self._routes.get(host_id)
            return found

    def _load(self, stamp: tuple[int, int]) -> None:
        self._routes = serving_addresses(self._read())
        self._stamp = stamp
        self.reads += 1

    def engine_for_host(self, host_id: str) -> RoutedEngine | None:
        """The engine that scans ``host_id``'s VMs; None when no appliance runs there."""
        address = self.address(host_id)
        if address is None:
            return None
        return RoutedEngine(routes=self, host_id=host_id, address=address)

    def connect(self, address: str) -> Any:
        """A ``RemoteEngine`` for the engine service at ``address``."""
        return self._connect(address)


class RoutedEngine:
    """Same shape as ``engine.Engine`` for one host's appliance, as the routes name it; a
    route that does not answer when a session starts is read again once (module docstring)."""

    def __init__(self, *, routes: EngineRoutes, host_id: str, address: str) -> None:
        self.routes = routes
        self.host_id = host_id
        self.address = address
        self.engine = routes.connect(address)

    def __repr__(self) -> str:
        return f"RoutedEngine({self.host_id!r} -> {self.address!r})"

    @property
    def client(self) -> Any:
        """The ``EngineClient`` of the route taken now (as ``RemoteEngine.client``)."""
        return self.engine.client

    def active_version(self) -> int:
        """The appliance's active signature version."""
        return int(self.engine.active_version())

    @contextlib.contextmanager
    def session(self, *, version: int | None = None) -> Iterator[Any]:
        """A session of the host's appliance (``RemoteEngine.session``); with ``version``
        (the controller's active one), an appliance on another version is refused as
        unhealthy (ApplianceError), so a scan is never recorded under a version its files
        were not matched with: the job waits for the health loop's push."""
        with contextlib.ExitStack() as stack:
            try:
                session = stack.enter_context(self.engine.session())
            except EngineError:
                address = self.routes.address(self.host_id, again=True)
                if address is None:
                    raise ApplianceError(APPLIANCE_DOWN) from None
                if address == self.address:
                    raise
                self.address, self.engine = address, self.routes.connect(address)
                session = stack.enter_context(self.engine.session())
            if version is not None and session.version != version:
                raise ApplianceError(version_reason(session.version, expected=version))
            yield session
