"""Shared fixtures for integration tests: the bundled vSphere simulator (``build/vcsim``).

Called by pytest for every test under ``tests/integration``; calls ``vsphere_av.lab.simulator``
(which runs the binary) and pyVmomi (tests may use it directly to drive the simulator).

- ``vcsim``: one simulator for the whole session with the default inventory (1 datacenter,
  1 cluster, 3 hosts, 2 VMs: DC0_C0_RP0_VM0 and DC0_C0_RP0_VM1). Read-only use: a test that
  changes inventory (power, snapshots, clones, guest files it leaves behind) uses the factory.
- ``vcsim_factory(**kwargs)``: a fresh simulator process with its own temporary guest root;
  keyword arguments are those of ``vsphere_av.lab.simulator.start``; stopped at teardown.
- ``sim``: a private simulator (from the factory) shaped by the test's ``vcsim`` marker, e.g.
  ``pytestmark = pytest.mark.vcsim(hosts=2, vms=4)``.
- ``connect(sim)``: a pyVmomi ServiceInstance trusting exactly that simulator's certificate;
  ``all_vms(si)`` / ``vm_named(si, name)`` find VMs through it.
- ``env_for(sim, state)`` / ``settings_for(sim, state, toml=...)``: the environment and the
  ``config.Settings`` that point vsphere-av at a simulator; ``plant(sim, vm, path, data)``
  puts a file into a VM's guest file system; ``wait_task(task)`` waits for a vim task.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from vsphere_av import config, errors
from vsphere_av.lab import simulator

SimulatorFactory = Callable[..., simulator.Simulator]


_open_sessions: list[vim.ServiceInstance] = []


def connect(sim: simulator.Simulator) -> vim.ServiceInstance:
    """Log in to the simulator with pyVmomi, trusting only its own certificate.

    The session is logged out and its sockets closed after the calling test.
    """
    si = SmartConnect(
        host=sim.host, port=sim.port, user=sim.username, pwd=sim.password,
        sslContext=sim.ssl_context(),
    )
    _open_sessions.append(si)
    return si


def all_vms(si: vim.ServiceInstance) -> list[vim.VirtualMachine]:
    """Every VM of the inventory (read through a container view, destroyed afterwards)."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return list(view.view)
    finally:
        view.DestroyView()


def vm_named(si: vim.ServiceInstance, name: str) -> vim.VirtualMachine:
    """The VM called ``name``; AssertionError when there is none."""
    for vm in all_vms(si):
        if vm.name == name:
            return vm
    raise AssertionError(f"no VM {name}")


def _close(si: vim.ServiceInstance) -> None:
    with contextlib.suppress(Exception):  # the simulator may be stopped already
        Disconnect(si)
    si._stub.DropConnections()


@pytest.fixture(autouse=True)
def _close_sessions() -> Iterator[None]:
    """Log out every session a test opened with connect() (unclosed sockets are errors)."""
    yield
    while _open_sessions:
        _close(_open_sessions.pop())


def _start(guest_root: Path, **kwargs: Any) -> simulator.Simulator:
    try:
        return simulator.start(guest_root=guest_root, **kwargs)
    except errors.SimulatorMissing as exc:  # the build is part of `make test`
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[simulator.Simulator]:
    """A running simulator with the default inventory, shared by the session (read-only)."""
    sim = _start(tmp_path_factory.mktemp("vcsim-guests"))
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def vcsim_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorFactory]:
    """Start private simulators (each with its own guest root); all stopped at teardown."""
    started: list[simulator.Simulator] = []

    def factory(**kwargs: Any) -> simulator.Simulator:
        guest_root = kwargs.pop("guest_root", None) or tmp_path_factory.mktemp("vcsim-guests")
        sim = _start(Path(guest_root), **kwargs)
        started.append(sim)
        return sim

    try:
        yield factory
    finally:
        for sim in started:
            sim.stop()


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``vcsim`` marker (``--strict-markers``)."""
    config.addinivalue_line(
        "markers", "vcsim(**kwargs): inventory of the private `sim` (simulator.start arguments)")


@pytest.fixture
def sim(request: pytest.FixtureRequest, vcsim_factory: SimulatorFactory) -> simulator.Simulator:
    """A private simulator started with the keyword arguments of the test's ``vcsim`` marker."""
    marker = request.node.get_closest_marker("vcsim")
    return vcsim_factory(**(marker.kwargs if marker else {}))


def env_for(sim: simulator.Simulator, state: Path, **extra: str) -> dict[str, str]:
    """Environment that points vsphere-av at the simulator (thumbprint pinned)."""
    return {"VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
            "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
            "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password, **extra}


def settings_for(sim: simulator.Simulator, state: Path, *, toml: str = "") -> config.Settings:
    """Settings for the simulator, with an optional TOML body (written next to ``state``)."""
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


def wait_task(task: Any, timeout: float = 30.0) -> Any:
    """Wait for a vim task to succeed; its result."""
    deadline = time.monotonic() + timeout
    while task.info.state not in ("success", "error"):
        if time.monotonic() > deadline:
            raise AssertionError("task did not finish")
        time.sleep(0.02)
    assert task.info.state == "success", task.info.error
    return task.info.result
