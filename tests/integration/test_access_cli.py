"""Roles through the real CLI (a subprocess), as sudo runs it: SUDO_USER names the person.

The state directory belongs to the account running the tests, which therefore plays the
service account that admins reach with ``sudo -u``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vsphere_av.store.audit import AuditLog

CLI = [sys.executable, "-m", "vsphere_av"]


def _run(env: dict[str, str], person: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env={**env, "SUDO_USER": person}, text=True,
                          capture_output=True, timeout=120, check=False)


def test_security_admin_imports_auditor_reads_and_a_refusal_is_audited(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[access]\nsecurity_admins = ["alice"]\nauditors = ["%nogroup"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_AV_")}
    env |= {"VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_CONFIG": str(cfg)}
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "r.yar").write_text('rule Access { strings: $a = "access-xyz" condition: $a }\n')

    refused = _run(env, "nobody", "signatures", "import", str(bundle))
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("vsphere-av: error: signatures import needs a role in "
                                      "access.security_admins; nobody holds auditors")
    assert _run(env, "nobody", "signatures", "list").returncode == 0

    done = _run(env, "alice", "signatures", "import", str(bundle))
    assert done.returncode == 0, done.stderr

    with AuditLog.open(state) as log:
        entries = [(e.actor, e.action, dict(e.details)) for e in log.entries()]
    denied = [e for e in entries if e[1] == "access.denied"]
    assert denied == [("nobody", "access.denied", {
        "command": "signatures import",
        "reason": "signatures import needs a role in access.security_admins; nobody holds "
                  "auditors"})]
    imports = [(actor, d["version"]) for actor, action, d in entries
               if action == "signatures.import"]
    # The first command on a new state directory installs the built-in bundle (version 1).
    assert imports == [("nobody", 1), ("alice", 2)]
