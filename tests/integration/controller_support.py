"""Helpers for the controller's integration tests (``test_controller_*.py``).

Real parts only: the bundled simulator (``build/vcsim``), the real engine with its built-in
EICAR bundle, real SQLite state, the real controller threads (in-process through
``app.start_controller``, or ``vsphere-av serve`` as a subprocess). pyVmomi is used only to
set the scene as an administrator would (power, snapshots) and to read NIC state back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import all_vms, env_for, wait_task
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from vsphere_av import config
from vsphere_av.api import ApiServer
from vsphere_av.app import ControllerRuntime, start_controller
from vsphere_av.lab import simulator
from vsphere_av.store.audit import AuditLog

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def cli_env(sim: simulator.Simulator, state: Path, **extra: str) -> dict[str, str]:
    """Environment for a ``vsphere-av`` subprocess on the simulator (no config file)."""
    env = {**os.environ, **env_for(sim, state, **extra)}
    env.pop("VSPHERE_AV_CONFIG", None)
    return env


@contextmanager
def running_controller(settings: config.Settings, *, events: bool = True,
                       grace: float = 10) -> Iterator[ControllerRuntime]:
    """``app.start_controller`` once its inventory (and event tail) is ready; stopped after.

    With ``[api] listen`` the console runs beside it, as ``vsphere-av serve`` runs it."""
    rt = start_controller(settings, console=ApiServer)
    try:
        assert rt.controller.inventory_ready.wait(20)
        if events:
            assert rt.controller.events_ready.wait(20)
        yield rt
    finally:
        rt.stop(grace=grace)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 30.0, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


class Admin:
    """A vCenter administrator's pyVmomi session on the simulator (scene setting only)."""

    def __init__(self, sim: simulator.Simulator) -> None:
        self.si = SmartConnect(host=sim.host, port=sim.port, user=sim.username,
                               pwd=sim.password, sslContext=sim.ssl_context())
        self.vms = {vm.name: vm for vm in all_vms(self.si)}

    def close(self) -> None:
        """Log out and drop sockets."""
        try:
            Disconnect(self.si)
        finally:
            self.si._stub.DropConnections()

    def nics(self, name: str) -> list[tuple[int, bool, bool]]:
        """(key, connected, startConnected) of every vNIC."""
        return sorted((d.key, bool(d.connectable.connected), bool(d.connectable.startConnected))
                      for d in self.vms[name].config.hardware.device
                      if isinstance(d, vim.vm.device.VirtualEthernetCard))

    def set_nics(self, name: str, *, connected: bool, start_connected: bool) -> None:
        """Set every vNIC's flags (to give a VM a distinctive state to restore)."""
        changes = []
        for d in self.vms[name].config.hardware.device:
            if isinstance(d, vim.vm.device.VirtualEthernetCard):
                d.connectable.connected = connected
                d.connectable.startConnected = start_connected
                changes.append(vim.vm.device.VirtualDeviceSpec(
                    operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=d))
        wait_task(self.vms[name].ReconfigVM_Task(vim.vm.ConfigSpec(deviceChange=changes)))

    def power_off(self, *names: str) -> None:
        """Power VMs off (and wait)."""
        for n in names:
            if self.vms[n].runtime.powerState != "poweredOff":
                wait_task(self.vms[n].PowerOffVM_Task())

    def host_of(self, name: str) -> str:
        """Moref of the VM's host."""
        return str(self.vms[name].runtime.host._moId)


@contextmanager
def admin(sim: simulator.Simulator) -> Iterator[Admin]:
    """An Admin session, closed afterwards."""
    a = Admin(sim)
    try:
        yield a
    finally:
        a.close()


def audit_entries(state: Path) -> list[tuple[str, dict[str, Any]]]:
    """(action, details) of every audit entry, in order."""
    with AuditLog.open(state) as log:
        return [(e.action, dict(e.details)) for e in log.entries()]


def max_concurrent_per_host(entries: list[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """From scan.start / scan.end audit entries: the most scans running at once per host."""
    running: dict[str, set[Any]] = {}
    peak: dict[str, int] = {}
    for action, d in entries:
        host = d.get("host_moref") or d.get("host", "")
        if action == "scan.start":
            running.setdefault(host, set()).add(d.get("scan_id"))
            peak[host] = max(peak.get(host, 0), len(running[host]))
        elif action == "scan.end":
            running.setdefault(host, set()).discard(d.get("scan_id"))
    return peak
