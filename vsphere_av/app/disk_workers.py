"""Local disk-scan worker processes: a VM's disks read and matched off the controller's GIL.

Called by ``app.App._scan_disks`` when no appliance serves the VM's host and
``scan.disk_workers`` > 0 (issue 12, point 8). A disk scan read in this process (Dissect
parsing, range reads, YARA) runs as a thread of it, so every VM scanned at once shares one
interpreter lock; here each VM's disk walk, reads and matching run in a worker process
instead, through the very mechanism an appliance uses: each worker is an engine service
(``engine.remote.EngineService``) with the disk-scan routes of
``scan.sources.disk_service`` (reading with ``vsphere.disks.GrantedFiles``), and the
controller talks to it with ``scan.sources.remote_disk.RemoteDiskGuest`` exactly as to a
host's appliance (it grants the ``/folder`` tickets; the job, its filters, size limit,
index and accounting stay here). The worker's engine is this state directory's: the same
signature store (read-only: no audit log, never activates) and the same verdict cache
(SQLite in WAL mode, shared by every scanning process).

The pool. :class:`DiskWorkers` keeps up to ``count`` workers and reuses them from one VM
scan to the next (a worker is started the first time a scan finds none idle, then stays).
A worker scans one VM at a time; a VM that finds every worker busy waits for one (the
scheduler's per-host and global caps already bound how many VMs scan at once).

Signature version. The controller pins the version a VM is scanned under: before each VM
the worker is told the controller's active version over its control pipe and opens one
engine session for it (the rules loaded once, in the worker); its service then scans
every file, and reports in ``/health``, under exactly that version until the VM is done.
So a ``signatures activate`` applies from the next VM on, as in this process (one version
per scan), and the version a scan is recorded under is the version its files were
matched with. A worker pinned to another version before is replaced by a fresh one (the
old rules leave memory with it). A version the worker cannot load fails that VM's scan.

Processes. ``multiprocessing`` "forkserver" with the worker's modules preloaded: the
controller has threads (scan workers, grant pollers, the console), and a plain ``fork`` of
a threaded process copies locks other threads hold (a child may deadlock on them), so no
worker is forked from this process. The fork server is a fresh interpreter (started once,
single-threaded) that imports Dissect, YARA, pyVmomi and the engine once; each worker is a
fork of it, so a worker costs no import time (the first one pays the server's start).
Each worker listens on 127.0.0.1 on a port of its own choosing, behind a random bearer
token of its own handed over the pipe (never on a command line, never logged). The control
pipe's other end only this process holds: when this process ends, however it ends
(``close``, a crash, ``kill -9``), the worker reads end-of-file and exits, so no worker
outlives its controller (the fork server also ends on its own parent's end). A worker
ignores SIGINT and SIGTERM (sent to the whole process group by a terminal's Ctrl-C or a
service manager): stopping is the controller's, whose running scans finish. A worker that
dies mid-scan makes that VM's scan an outage (``errors.ConnectionLost``, from
``RemoteDiskGuest``: the scan fails and is retried); the dead worker leaves the pool and
the next VM that needs one starts a fresh one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util
import secrets
import signal
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vsphere_av import errors

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0     # seconds a worker may take to open its engine and listen
PIN_TIMEOUT = 300.0       # seconds a worker may take to load and compile a version's rules
STOP_TIMEOUT = 10.0
# What the fork server imports once, so that a worker imports nothing of its own but the
# program's main script, which multiprocessing runs again in each child as ``__mp_main__``
# (``vsphere-av``: the CLI, ~0.02 s on top of these; "__main__" in the preload list would
# not spare it: CPython 3.11-3.13 never hand the fork server the main script's path).
PRELOAD = ["vsphere_av.app.disk_workers", "vsphere_av.engine", "vsphere_av.engine.remote",
           "vsphere_av.scan.sources.disk_service", "vsphere_av.scan.sources.disk",
           "vsphere_av.vsphere.disks"]

_server_lock = threading.Lock()
_server_users = 0           # pools that started a worker and are not closed
_open_pools: weakref.WeakSet[DiskWorkers] = weakref.WeakSet()


def _close_open_pools() -> None:
    """At exit, the pools nobody closed: their workers end before multiprocessing's own
    exit handler (registered before this one, so run after it) terminates and joins them,
    which would wait forever on a worker that ignores SIGTERM and still has its pipe."""
    for pool in list(_open_pools):
        pool.close()


atexit.register(_close_open_pools)


def _forkserver() -> Any:
    """The forkserver context (its preload set before its server first starts); the caller
    uses its server until :func:`_release_forkserver`."""
    global _server_users
    with _server_lock:
        context = multiprocessing.get_context("forkserver")
        if not _server_users:
            context.set_forkserver_preload(PRELOAD)
        _server_users += 1
        return context


def _release_forkserver() -> None:
    """The last pool closed: end the fork server and wait for it, so that it does not
    outlive ``App.close`` and its CPU time (and that of the workers it reaped) is accounted
    to this process, as a child's (multiprocessing's resource tracker, which it started,
    stays until this process ends, as it does for any use of multiprocessing). While any
    pool is open it stays: a worker's exit status comes through it."""
    global _server_users
    with _server_lock:
        _server_users -= 1
        if _server_users:
            return
        from multiprocessing import forkserver

        stop = getattr(forkserver._forkserver, "_stop", None)   # CPython 3.11-3.13
        if callable(stop):
            stop()


def _ensure_forkserver() -> None:
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except Exception as exc:    # the first worker's start will try again and say why
        log.warning("the disk workers' fork server did not start: %s", exc)


class _Pinned:
    """The worker's engine as its service sees it: one signature version, pinned by the
    controller before each VM (``engine.Engine``'s ``session`` / ``active_version`` shape)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._open = contextlib.ExitStack()
        self._session: Any = None

    def pin(self, version: int) -> int:
        """Scan under ``version`` from now on (its rules loaded now: a broken one fails here);
        a worker serves one version in its life (the pool replaces it for another)."""
        if self._session is None:
            self._session = self._open.enter_context(self._engine.session(version=version))
        elif self._session.version != version:
            raise errors.EngineError(f"pinned to signature version {self._session.version}, "
                                     f"not {version}")
        return int(self._session.version)

    def close(self) -> None:
        """End the session (its verdict-cache writes committed)."""
        self._session = None
        self._open.close()

    def flush(self) -> None:
        """Commit the verdict-cache writes of the VM just scanned."""
        if self._engine.cache is not None:
            self._engine.cache.flush()

    def active_version(self) -> int:
        """The pinned version (what ``/health`` reports and every scan uses)."""
        if self._session is None:
            raise errors.EngineError("no signature version pinned")
        return int(self._session.version)

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """The pinned session (for each batch of files the service scans)."""
        if self._session is None:
            raise errors.EngineError("no signature version pinned")
        yield self._session


def _serve(settings: Any, token: str, pipe: Any) -> None:
    """The worker process: an engine service with the disk routes; pins versions on request
    until the pipe closes."""
    from vsphere_av.engine import Engine
    from vsphere_av.engine.remote import EngineService
    from vsphere_av.scan.sources.disk_service import DiskService
    from vsphere_av.vsphere.disks import GrantedFiles

    # The terminal's Ctrl-C and a service manager's SIGTERM reach the whole process group:
    # they are the controller's to handle (its running scans finish), and the worker ends
    # when the controller does (end-of-file on the pipe).
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)
    try:
        engine = Engine.open(settings)      # no audit: the signature store read-only
        pinned = _Pinned(engine)
        service = EngineService(engine=pinned, token=token, listen=("127.0.0.1", 0))
    except Exception as exc:
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    service.routes.update(DiskService(scanning=service.scanning, reader=GrantedFiles).routes())
    service.start()
    pipe.send({"url": service.url})
    try:
        while True:
            request = pipe.recv()       # end-of-file when the controller ends
            try:
                if "pin" in request:
                    pipe.send({"pinned": pinned.pin(int(request["pin"]))})
                else:
                    pinned.flush()
                    pipe.send({"released": True})
            except errors.VsphereAvError as exc:
                pipe.send({"error": f"{type(exc).__name__}: {exc}"})
    except (EOFError, OSError):
        pass
    finally:
        service.shutdown()
        pinned.close()
        engine.close()


@dataclass
class _Worker:
    process: Any
    pipe: Any
    url: str
    token: str
    version: int = 0        # the signature version it is pinned to (0: none yet)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def ask(self, request: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """One request over the control pipe; ConnectionLost when the worker is gone."""
        try:
            self.pipe.send(request)
            if not self.pipe.poll(timeout):
                raise errors.ConnectionLost(f"disk-scan worker {self.pid} did not answer in "
                                            f"{timeout:.0f} s")
            answer: dict[str, Any] = self.pipe.recv()
        except (EOFError, OSError) as exc:
            raise errors.ConnectionLost(f"disk-scan worker {self.pid} ended (exit code "
                                        f"{self.process.exitcode})") from exc
        if "error" in answer:
            raise errors.EngineError(f"disk-scan worker {self.pid}: {answer['error']}")
        return answer

    def stop(self) -> None:
        """Close its pipe (it exits on end-of-file); kill it if it lingers."""
        self.pipe.close()
        self.process.join(STOP_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(STOP_TIMEOUT)


class DiskWorkers:
    """A pool of up to ``count`` local engine-service processes that read and scan VM disks,
    one VM each at a time (see module)."""

    def __init__(self, *, settings: Any, count: int) -> None:
        from vsphere_av.config import Settings

        if count < 1:
            raise ValueError("a disk-worker pool needs at least one worker")
        # What a worker needs: the state directory and the engine's limits. No vCenter or
        # guest credentials (like an appliance, it reads with the tickets it is granted).
        self._settings = Settings(state_dir=settings.state_dir, engine=settings.engine)
        self._count = count
        self._workers: list[_Worker] = []      # running: idle or busy
        self._idle: list[_Worker] = []
        self._starting = 0
        self._cond = threading.Condition()
        self._closed = False
        self._context: Any = None           # the fork server's, from the first start on
        self._warming: threading.Thread | None = None
        _open_pools.add(self)

    def __repr__(self) -> str:
        return f"<DiskWorkers {len(self._workers)}/{self._count}>"

    def warm(self) -> None:
        """Start the fork server now, in the background (its imports take about a second),
        so that the first worker a scan asks for is already a plain fork."""
        with self._cond:
            if self._closed or self._context is not None:
                return
            self._context = _forkserver()
            self._warming = threading.Thread(target=_ensure_forkserver, daemon=True,
                                             name="disk-workers-warm")
            self._warming.start()

    def pids(self) -> list[int]:
        """The running workers' process ids."""
        with self._cond:
            return [w.pid for w in self._workers]

    @contextlib.contextmanager
    def engine(self, *, version: int) -> Iterator[Any]:
        """A worker's engine (``engine.remote.RemoteEngine``) for one VM's disk scan under
        signature ``version``; waits while every worker is busy."""
        from vsphere_av.engine.remote import EngineClient, RemoteEngine

        worker = self._pinned(version)
        try:
            client = EngineClient(worker.url, token=worker.token)
            try:
                yield RemoteEngine(client)
            finally:
                client.close()
        finally:
            self._give_back(worker)

    def _pinned(self, version: int) -> _Worker:
        """A worker for this scan, pinned to ``version``. One pinned to another version
        before is replaced by a fresh one (so no worker holds the rules of versions no
        longer scanned with); one found dead at the pin (it died idle: no VM's outage) is
        replaced once."""
        lost = False
        while True:
            worker = self._take()
            if worker.version not in (0, version):
                log.info("disk-scan worker %s scanned with signature version %s, now %s: "
                         "replaced", worker.pid, worker.version, version)
                self._retire(worker)
                continue
            try:
                worker.ask({"pin": version}, timeout=PIN_TIMEOUT)
            except errors.ConnectionLost:
                self._give_back(worker)
                if lost:
                    raise
                lost = True
                continue
            except BaseException:
                self._give_back(worker)
                raise
            worker.version = version
            return worker

    def _retire(self, worker: _Worker) -> None:
        """Take a worker out of the pool and end it."""
        with self._cond:
            if worker in self._workers:
                self._workers.remove(worker)
            self._cond.notify_all()
        worker.stop()

    def _take(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise errors.EngineError("the disk-scan workers are closed")
                self._drop_dead()
                if self._idle:
                    return self._idle.pop()
                if len(self._workers) + self._starting < self._count:
                    self._starting += 1
                    break
                self._cond.wait()
        try:
            worker = self._start()
        except BaseException:
            with self._cond:
                self._starting -= 1
                self._cond.notify_all()
            raise
        with self._cond:
            self._starting -= 1
            closed = self._closed
            if not closed:
                self._workers.append(worker)
            self._cond.notify_all()
        if closed:
            worker.stop()
            raise errors.EngineError("the disk-scan workers are closed")
        return worker

    def _drop_dead(self) -> None:
        """Forget idle workers that ended (under the lock)."""
        for dead in [w for w in self._idle if not w.process.is_alive()]:
            self._forget(dead)

    def _forget(self, worker: _Worker) -> None:
        log.warning("disk-scan worker %s ended (exit code %s): the next scan starts another",
                    worker.pid, worker.process.exitcode)
        if worker in self._idle:
            self._idle.remove(worker)
        if worker in self._workers:
            self._workers.remove(worker)
        worker.pipe.close()

    def _give_back(self, worker: _Worker) -> None:
        """A VM's scan is over: the worker commits its cache writes and waits idle, or, gone
        (or no longer answering), leaves the pool."""
        healthy = worker.process.is_alive()
        if healthy:
            try:
                worker.ask({"release": True}, timeout=STOP_TIMEOUT)
            except errors.VsphereAvError as exc:
                log.warning("disk-scan worker %s: %s: stopped", worker.pid, exc)
                healthy = False
        with self._cond:
            if self._closed:
                return
            if healthy:
                self._idle.append(worker)
            else:
                self._forget(worker)
            self._cond.notify_all()
        if not healthy:
            worker.stop()

    def _start(self) -> _Worker:
        with self._cond:
            if self._context is None:
                self._context = _forkserver()
            context = self._context
        token = secrets.token_urlsafe(32)
        mine, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(self._settings, token, theirs),
                                  name="vsphere-av-disk-worker", daemon=True)
        process.start()
        theirs.close()          # only the worker holds its end: its EOF is our end
        try:
            if not mine.poll(START_TIMEOUT):
                raise errors.EngineError("a disk-scan worker did not start in "
                                         f"{START_TIMEOUT:.0f} s")
            hello = mine.recv()
        except (EOFError, OSError, errors.EngineError) as exc:
            mine.close()
            process.kill()
            process.join(STOP_TIMEOUT)
            if isinstance(exc, errors.EngineError):
                raise
            raise errors.EngineError(f"a disk-scan worker ended at start (exit code "
                                     f"{process.exitcode})") from exc
        if "error" in hello:
            mine.close()
            process.join(STOP_TIMEOUT)
            raise errors.EngineError(f"a disk-scan worker cannot start: {hello['error']}")
        log.info("disk-scan worker %s serves %s", process.pid, hello["url"])
        return _Worker(process=process, pipe=mine, url=str(hello["url"]), token=token)

    def close(self) -> None:
        """End every worker (each sees its pipe close) and wait for them; a scan still
        running in one fails as an outage."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            workers, self._workers, self._idle = self._workers, [], []
            used_server, self._context = self._context is not None, None
            self._cond.notify_all()
        for w in workers:
            w.pipe.close()
        for w in workers:
            w.stop()
        if self._warming is not None:       # a server it starts is the one stopped here
            self._warming.join(START_TIMEOUT)
        if used_server:
            _release_forkserver()
