"""The ``scan`` package's face: what it exports resolves, and a guest scan's imports stay light."""

from __future__ import annotations

import subprocess
import sys

import vsphere_av.scan
import vsphere_av.scan.sources


def test_every_exported_name_resolves() -> None:
    missing = [n for n in vsphere_av.scan.__all__ if not hasattr(vsphere_av.scan, n)]
    assert missing == []
    missing = [n for n in vsphere_av.scan.sources.__all__
               if getattr(vsphere_av.scan.sources, n, None) is None]
    assert missing == []


def test_guest_scans_do_not_load_the_disk_reader() -> None:
    # The Dissect libraries behind scan.sources.diskimage take about a second to import;
    # the app and a guest scan's modules (scan.sources.guest among them) never need them.
    code = ("import sys, vsphere_av.app, vsphere_av.scan.sources.guest\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('dissect')}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
    code = ("import sys\nfrom vsphere_av.scan.sources import DiskFiles\n"
            "print(DiskFiles.__module__, 'dissect.hypervisor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["vsphere_av.scan.sources.diskimage", "True"]
