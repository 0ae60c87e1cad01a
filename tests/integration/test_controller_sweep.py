"""Signature sweep (issue 5, point 4): a new signature version makes every VM stale for it.

The controller (in-process) notices the new active version, queues every running VM at
sweep priority under the same storm limits, and each one ends up scanned under the new
version; the VM carrying what only the new rules know is found.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import plant, settings_for
from controller_support import audit_entries, cli_env, running_controller, wait_for

import vsphere_av.engine
from vsphere_av.lab import simulator

VMS = [f"DC0_C0_RP0_VM{i}" for i in range(3)]
MARKER_RULE = 'rule Sweep_Test_Marker { strings: $a = "SWEEP-TEST-MARKER-7f3a" condition: $a }\n'
pytestmark = pytest.mark.vcsim(hosts=1, vms=3)


def test_new_signature_version_sweeps_every_running_vm(sim: simulator.Simulator,
                                                       tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name in VMS:
        plant(sim, name, "/etc/hostname", name.encode())
    plant(sim, VMS[1], "/usr/local/bin/helper", b"...SWEEP-TEST-MARKER-7f3a...")
    bundle = tmp_path / "bundle"
    shutil.copytree(Path(vsphere_av.engine.__file__).parent / "builtin", bundle)
    (bundle / "marker.yar").write_text(MARKER_RULE)

    with running_controller(settings_for(sim, state), events=False) as rt:
        c = rt.controller
        # Running at start and never scanned: background rescans under version 1.
        wait_for(lambda: c.stats.scans >= 3 and c.scheduler.idle(), timeout=60,
                 what="start-up rescans")
        first = rt.app.engine.active_version()
        assert {s.state for s in rt.app.store.vm_states(current_version=first)} == {
            "protected"}
        done = subprocess.run([sys.executable, "-m", "vsphere_av", "signatures", "import",
                               str(bundle)], env=cli_env(sim, state), capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        second = rt.app.engine.active_version()
        assert second > first
        wait_for(lambda: c.stats.scans >= 6 and c.scheduler.idle(), timeout=60,
                 what="sweep finished")
        states = {s.name: s for s in rt.app.store.vm_states(current_version=second)}
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
