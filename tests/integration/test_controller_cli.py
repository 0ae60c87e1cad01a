"""CLI with a running controller (issue 5, point 6): status --json and scan hand-over.

The controller runs in-process (``app.start_controller``) against the bundled simulator;
``vsphere-av`` runs as a real subprocess with the same state directory.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import plant, settings_for
from controller_support import EICAR, admin, audit_entries, cli_env, running_controller, wait_for

from vsphere_av.app import ControllerRuntime
from vsphere_av.lab import simulator

CLEAN, DIRTY = "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"
pytestmark = pytest.mark.vcsim(hosts=2, vms=2)


@pytest.fixture
def controller(sim: simulator.Simulator, tmp_path: Path) -> Iterator[ControllerRuntime]:
    with admin(sim) as a:
        a.power_off(DIRTY)          # dormant: stale when it starts
    with running_controller(settings_for(sim, tmp_path / "state")) as rt:
        yield rt


def cli(sim: simulator.Simulator, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vsphere_av", *args],
                          env=cli_env(sim, state), text=True,
                          capture_output=True, timeout=120, check=False)


def test_scan_is_handed_to_the_running_controller(
        sim: simulator.Simulator, controller: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(sim, DIRTY, "/root/eicar.com", EICAR)
    plant(sim, CLEAN, "/etc/hostname", b"clean\n")
    # CLEAN was running when the controller started: it is queued for a background rescan;
    # wait until that is done so the hand-over is observable on its own.
    wait_for(lambda: controller.controller.scheduler.idle()
             and controller.controller.stats.scans >= 1, timeout=30, what="start-up rescan")
    before = controller.controller.stats.scans
    plant(sim, CLEAN, "/opt/new.bin", b"new file\n")
    done = cli(sim, state, "scan", CLEAN, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    (vm,) = doc["vms"]
    assert vm["status"] == "clean"
    assert "scanned by the running controller" in vm["reason"]
    assert controller.controller.stats.scans == before + 1
    queued = [d for act, d in audit_entries(state) if act == "job.queued"]
    assert queued[-1]["vm"] == CLEAN
    assert queued[-1]["priority"] == "on-demand"


def test_status_json_has_hosts_and_isolated(
        sim: simulator.Simulator, controller: ControllerRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant(sim, DIRTY, "/root/eicar.com", EICAR)
    with admin(sim) as a:
        moref = a.vms[DIRTY]._moId
        a.vms[DIRTY].PowerOnVM_Task()
    wait_for(lambda: any(e.outcome == "infected" for e in controller.jobs.exposures(moref)),
             timeout=30, what="detection")
    controller.controller.housekeep_once()
    done = cli(sim, state, "status", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    hosts = {h["name"]: h for h in doc["hosts"]}
    assert set(hosts) == {"DC0_C0_H0", "DC0_C0_H1"}
    for h in hosts.values():
        assert h["moref"].startswith("host-")
        assert h["queued"] == 0
        assert h["active_scans"] == 0
    isolated = {v["name"]: v["isolated"] for v in doc["vms"]}
    assert isolated == {DIRTY: True, CLEAN: False}


def test_serve_runs_the_console_with_api_listen(sim: simulator.Simulator,
                                                tmp_path: Path) -> None:
    # The CLI hands the console to the controller (app imports no api): `serve` with
    # [api] listen answers on that address until SIGTERM, and stops listening with it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state, log = tmp_path / "state", tmp_path / "serve.log"
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'[api]\nlisten = "127.0.0.1:{port}"\n')
    url = f"http://127.0.0.1:{port}/metrics"

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vsphere_av", "--config", str(cfg),
                                 "serve"], env=cli_env(sim, state),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(answers, timeout=60, what=f"the console at {url}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert not answers()
