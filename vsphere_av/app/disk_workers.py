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
index and accounting stay here). The worker's engine is this state directory's (same
signatures, same verdict cache), opened read-only.

Processes: started lazily, one more each time a scan finds every running worker busy, up
to ``count`` (then the least busy one takes the scan); ``multiprocessing`` "spawn" (no fork
of a threaded controller). Each listens on 127.0.0.1 on a port of its own choosing, behind
a random bearer token handed over the spawn pipe (never on a command line, never logged).
Each holds one end of a pipe whose other end only this process holds: when this process
ends, however it ends (``close``, a crash, ``kill -9``), the worker reads end-of-file and
exits, so no worker outlives its controller. A worker found dead is started again.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vsphere_av import errors

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0     # seconds a worker may take to import, open its engine and listen
STOP_TIMEOUT = 10.0


def _serve(settings: Any, token: str, pipe: Any) -> None:
    """The worker process: an engine service with the disk routes until the pipe closes."""
    from vsphere_av.engine import Engine
    from vsphere_av.engine.remote import EngineService
    from vsphere_av.scan.sources.disk_service import DiskService
    from vsphere_av.vsphere.disks import GrantedFiles

    try:
        engine = Engine.open(settings)      # no audit: the signature store read-only
        service = EngineService(engine=engine, token=token, listen=("127.0.0.1", 0))
    except Exception as exc:
        pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    service.routes.update(DiskService(scanning=service.scanning, reader=GrantedFiles).routes())
    service.start()
    pipe.send({"url": service.url})
    try:
        pipe.recv()             # nothing is ever sent: end-of-file when the controller ends
    except (EOFError, OSError):
        pass
    finally:
        service.shutdown()
        engine.close()


@dataclass
class _Worker:
    process: Any
    pipe: Any
    url: str
    busy: int = 0


class DiskWorkers:
    """Up to ``count`` local engine-service processes that read and scan VM disks."""

    def __init__(self, *, settings: Any, count: int) -> None:
        self._settings = settings
        self._count = count
        self._token = secrets.token_urlsafe(32)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<DiskWorkers {len(self._workers)}/{self._count}>"

    def pids(self) -> list[int]:
        """The running workers' process ids."""
        with self._lock:
            return [int(w.process.pid) for w in self._workers]

    @contextlib.contextmanager
    def engine(self) -> Iterator[Any]:
        """A worker's engine (``engine.remote.RemoteEngine``) for one VM's disk scan."""
        from vsphere_av.engine.remote import EngineClient, RemoteEngine

        worker = self._take()
        try:
            yield RemoteEngine(EngineClient(worker.url, token=self._token))
        finally:
            with self._lock:
                worker.busy -= 1

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise errors.EngineError("the disk-scan workers are closed")
            for dead in [w for w in self._workers if not w.process.is_alive()]:
                log.warning("disk-scan worker %s ended (exit code %s): starting another",
                            dead.process.pid, dead.process.exitcode)
                self._workers.remove(dead)
                dead.pipe.close()
            idle = [w for w in self._workers if w.busy == 0]
            if idle or len(self._workers) >= self._count:
                worker = min(idle or self._workers, key=lambda w: w.busy)
            else:
                worker = self._start()
                self._workers.append(worker)
            worker.busy += 1
            return worker

    def _start(self) -> _Worker:
        context = multiprocessing.get_context("spawn")
        mine, theirs = context.Pipe()
        process = context.Process(target=_serve, args=(self._settings, self._token, theirs),
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
        return _Worker(process=process, pipe=mine, url=str(hello["url"]))

    def close(self) -> None:
        """End every worker (each sees its pipe close) and wait for them."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for w in workers:
            w.pipe.close()
        for w in workers:
            w.process.join(STOP_TIMEOUT)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(STOP_TIMEOUT)
