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
from vsphere_av.store.quarantine import Quarantine
from vsphere_av.store.state import StateStore

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


def test_an_auditor_cannot_overwrite_the_state_with_audit_export(tmp_path: Path) -> None:
    """The attack of issue 11: an auditor with the sudo rule ran ``audit export -o`` over
    audit.sqlite, audit.head and state.sqlite. Every such path is refused and nothing moves."""
    state = tmp_path / "state"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[access]\nsecurity_admins = ["alice"]\nauditors = ["%nogroup"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_AV_")}
    env |= {"VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_CONFIG": str(cfg)}
    with StateStore.open(state) as store, AuditLog.open(state) as log:
        Quarantine.open(state, store=store)
        log.append(actor="alice", action="quarantine.purge", details={"id": "ab12"})
    (tmp_path / "link").symlink_to(state)
    (tmp_path / "dangling").symlink_to(state / "siem-cursor.json")   # not there (yet)
    (tmp_path / "other").mkdir()
    kept = tmp_path / "kept.txt"
    kept.write_text("the auditor's earlier notes\n")
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    assert {"audit.sqlite", "audit.head", "state.sqlite"} <= set(before)

    inside = f"is inside the state directory {state}: write it elsewhere"
    for target, error in [
        (state / "audit.sqlite", inside),
        (state / "audit.head", inside),
        (state / "state.sqlite", inside),
        (state / "siem-cursor.json", inside),             # new, but a forged cursor
        (tmp_path / "link" / "audit.head", inside),        # through a symbolic link
        (tmp_path / "other" / ".." / "state" / "state.sqlite", inside),
        (state / "quarantine" / "x.qbin", inside),
        (kept, "exists: give a new file (an export never overwrites one)"),
        (tmp_path / "dangling", "exists: give a new file (an export never overwrites one)"),
    ]:
        out = _run(env, "nobody", "audit", "export", "-o", str(target))
        assert out.returncode == 2, (target, out.stderr)
        assert out.stderr.strip() == f"vsphere-av: error: {target} {error}", out.stderr

    assert kept.read_text() == "the auditor's earlier notes\n"
    assert not (state / "siem-cursor.json").exists()
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    assert after == before
    assert _run(env, "nobody", "audit", "verify").returncode == 0
    done = _run(env, "nobody", "audit", "export", "-o", str(tmp_path / "export.jsonl"))
    assert done.returncode == 0, done.stderr
    assert '"quarantine.purge"' in (tmp_path / "export.jsonl").read_text()
    assert _run(env, "nobody", "audit", "head").returncode == 0          # auditors keep heads
