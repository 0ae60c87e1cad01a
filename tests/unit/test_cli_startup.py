"""`vsphere-av --help` stays quick: importing the CLI loads no application, engine or YARA."""

from __future__ import annotations

import json
import subprocess
import sys

LISTING = ("import json, sys, vsphere_av.cli; "
           "print(json.dumps(sorted(sys.modules)))")
HEAVY = ("vsphere_av.app", "vsphere_av.engine", "vsphere_av.controller")   # and yara


def test_importing_the_cli_loads_no_application() -> None:
    loaded = json.loads(subprocess.run([sys.executable, "-c", LISTING], check=True,
                                       capture_output=True, text=True).stdout)
    assert "vsphere_av.cli.scan" in loaded
    assert [m for m in loaded if m == "yara" or m.startswith(HEAVY)] == []
