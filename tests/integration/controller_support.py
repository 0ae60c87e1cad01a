"""Helpers for the controller's integration tests (``test_controller_*.py``).

Real parts only: the bundled simulator (``build/vcsim``), the real engine with its built-in
EICAR bundle, real SQLite state, the real controller threads (in-process through
``app.start_controller``, or ``vsphere-av serve`` as a subprocess). pyVmomi is used only to
set the scene as an administrator would (power, snapshots) and to read NIC state back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from vsphere_av import config, simulator
from vsphere_av.store.audit import AuditLog

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def env_for(sim: simulator.Simulator, state: Path, **extra: str) -> dict[str, str]:
    """Environment that points vsphere-av at the simulator (thumbprint pinned)."""
    return {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
            "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
            "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password, **extra}


def settings_for(sim: simulator.Simulator, state: Path, *, toml: str = "") -> config.Settings:
    """Settings for the simulator, with an optional TOML body."""
    cfg = None
    if toml:
        cfg = state.parent / f"{state.name}.toml"
        cfg.write_text(toml)
    return config.load(config_file=cfg, env=env_for(sim, state))


def plant(sim: simulator.Simulator, vm: str, path: str, data: bytes) -> Path:
    """Put a file into a VM's guest file system."""
    target = sim.guest_root / vm / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target


def wait_task(task: Any, timeout: float = 30.0) -> None:
    """Wait for a vim task to succeed."""
    deadline = time.monotonic() + timeout
    while task.info.state not in ("success", "error"):
        if time.monotonic() > deadline:
            raise AssertionError("task did not finish")
        time.sleep(0.02)
    assert task.info.state == "success", task.info.error


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
        content = self.si.RetrieveContent()
        view = content.viewManager.CreateContainerView(content.rootFolder,
                                                       [vim.VirtualMachine], True)
        try:
            self.vms = {vm.name: vm for vm in view.view}
        finally:
            view.DestroyView()

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
