"""Waiting for vSphere tasks: the one place that polls ``task.info``.

Called by the adapter modules (isolation, appliances, lab); calls only ``Connection.call``.
Polls quickly first (containment is measured in milliseconds) and backs off to 100 ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyVmomi import vmodl

from vsphere_av import errors
from vsphere_av.vsphere.connection import Connection

TASK_TIMEOUT = 120.0


def wait_task(conn: Connection, task: Any, what: str, *, timeout: float = TASK_TIMEOUT,
              fault_error: Callable[[Any, str], errors.VsphereAvError] | None = None) -> Any:
    """Wait for ``task`` to finish; return its result or raise the translated fault.

    ``fault_error(fault, what)`` translates a failed task's fault when the caller knows
    better than the generic rule (snapshots: why it could not be taken).
    """
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        info = conn.call(what, lambda _c: task.info)
        if info.state == "success":
            return info.result
        if info.state == "error":
            fault = info.error
            if fault_error is not None:
                raise fault_error(fault, what)
            if isinstance(fault, vmodl.fault.ManagedObjectNotFound):
                raise errors.NotFound(f"{what}: object no longer exists")
            raise errors.VsphereError(f"{what}: {type(fault).__name__}"
                                      f" ({getattr(fault, 'msg', '') or 'task failed'})")
        if time.monotonic() > deadline:
            raise errors.TransientError(f"{what}: task did not finish in {timeout:.0f}s")
        time.sleep(pause)
        pause = min(0.1, pause * 2)
