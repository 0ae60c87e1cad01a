"""Shared fixtures for integration tests: the bundled vSphere simulator (``build/vcsim``).

Called by pytest for every test under ``tests/integration``; calls ``vsphere_av.simulator``
(which runs the binary) and pyVmomi (tests may use it directly to drive the simulator).

- ``vcsim``: one simulator for the whole session with the default inventory (1 datacenter,
  1 cluster, 3 hosts, 2 VMs: DC0_C0_RP0_VM0 and DC0_C0_RP0_VM1). Read-only use: a test that
  changes inventory (power, snapshots, clones, guest files it leaves behind) uses the factory.
- ``vcsim_factory(**kwargs)``: a fresh simulator process with its own temporary guest root;
  keyword arguments are those of ``vsphere_av.simulator.start``; stopped at teardown.
- ``connect(sim)``: a pyVmomi ServiceInstance trusting exactly that simulator's certificate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from vsphere_av import errors, simulator

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
