"""Signature sweep (issue 5, point 4): a new signature version makes every VM stale for it.

The controller (in-process) notices the new active version, queues every running VM at
sweep priority under the same storm limits, and each one ends up scanned under the new
version; the VM carrying what only the new rules know is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from controller_support import audit_entries, env_for, plant, settings_for, wait_for

import vsphere_av.engine
from vsphere_av import simulator
from vsphere_av.app import start_controller

VMS = [f"DC0_C0_RP0_VM{i}" for i in range(3)]
MARKER_RULE = 'rule Sweep_Test_Marker { strings: $a = "SWEEP-TEST-MARKER-7f3a" condition: $a }\n'


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[simulator.Simulator]:
    if not simulator.binary_path().exists():
        pytest.skip("build/vcsim missing: run make vcsim")
    s = simulator.start(guest_root=tmp_path / "guests", hosts=1, vms=3)
    yield s
    s.stop()


def test_new_signature_version_sweeps_every_running_vm(sim: simulator.Simulator,
                                                       tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name in VMS:
        plant(sim, name, "/etc/hostname", name.encode())
    plant(sim, VMS[1], "/usr/local/bin/helper", b"...SWEEP-TEST-MARKER-7f3a...")
    bundle = tmp_path / "bundle"
    shutil.copytree(Path(vsphere_av.engine.__file__).parent / "builtin", bundle)
    (bundle / "marker.yar").write_text(MARKER_RULE)

    rt = start_controller(settings_for(sim, state))
    try:
        c = rt.controller
        assert c.inventory_ready.wait(20)
        # Running at start and never scanned: background rescans under version 1.
        wait_for(lambda: c.stats.scans >= 3 and c.scheduler.idle(), timeout=60,
                 what="start-up rescans")
        first = rt.app.engine.active_version()
        assert {s.state for s in rt.app.store.vm_states(current_version=first)} == {
            "protected"}
        env = {**os.environ, **env_for(sim, state)}
        env.pop("VSPHERE_AV_CONFIG", None)
        done = subprocess.run([sys.executable, "-m", "vsphere_av", "signatures", "import",
                               str(bundle)], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        second = rt.app.engine.active_version()
        assert second > first
        wait_for(lambda: c.stats.scans >= 6 and c.scheduler.idle(), timeout=60,
                 what="sweep finished")
        states = {s.name: s for s in rt.app.store.vm_states(current_version=second)}
    finally:
        rt.stop(grace=10)
    assert states[VMS[0]].state == "protected"
    assert states[VMS[2]].state == "protected"
    assert states[VMS[0]].signature_version == second
    assert states[VMS[1]].state == "infected"
    entries = audit_entries(state)
    (sweep,) = [d for act, d in entries if act == "signatures.sweep"]
    assert sweep["signature_version"] == second
    assert sweep["queued"] == 3
    after = entries[[act for act, _ in entries].index("signatures.sweep"):]
    ends = [d for act, d in after if act == "scan.end"]
    assert len(ends) == 3
    assert {d["signature_version"] for d in ends} == {second}
    found = [d for act, d in after if act == "detection"]
    assert {d["vm"] for d in found} == {VMS[1]}
