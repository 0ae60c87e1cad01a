"""A scan that did not read everything is not clean (issue 11, point 1).

Against the bundled simulator with real YARA and real SQLite, through the CLI where exit
codes and ``--json`` matter: files the scan could not check completely (over the size
limit, archives over a limit with ``alert_exceeds_max`` off, unreadable directories, names
a naive listing mangles) leave the VM ``unprotected`` with each path and its reason in
``scan --json``, ``status --json`` and the audit log, and exit 2; archives over a limit are
detections of their own by default; ``scan.skip_large`` skips big files on purpose.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vsphere_av.lab import simulator
from vsphere_av.store.audit import AuditLog

EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MiB = 1024 * 1024
VM = "DC0_C0_RP0_VM0"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[simulator.Simulator]:
    s = simulator.start(guest_root=tmp_path_factory.mktemp("guests"), hosts=1, vms=1)
    yield s
    s.stop()


def plant(sim: simulator.Simulator, path: str | bytes, data: bytes) -> Path:
    raw = path.encode() if isinstance(path, str) else path
    target = os.path.join(os.fsencode(sim.guest_root / VM), raw.lstrip(b"/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as fh:
        fh.write(data)
    return Path(os.fsdecode(target))


def zipped(members: dict[str, bytes], *, stored: bool = False) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def cli(sim: simulator.Simulator, state: Path, root: str, *args: str,
        toml: str = "") -> tuple[int, dict[str, Any], str]:
    """Run vsphere-av with the scan limited to one guest directory; (exit, JSON, stderr)."""
    cfg = state.parent / f"{state.name}-{root.strip('/').replace('/', '_')}.toml"
    cfg.write_text(f'[scan]\nlinux_roots = ["{root}"]\naction = "report"\n'
                   f'fallback_action = ""\n{toml}')
    env = {**os.environ, "VSPHERE_AV_SERVER": sim.url, "VSPHERE_AV_THUMBPRINT": sim.thumbprint,
           "VSPHERE_AV_STATE_DIR": str(state), "VSPHERE_AV_GUEST_USER": sim.guest_user,
           "VSPHERE_AV_GUEST_PASSWORD": sim.guest_password, "VSPHERE_AV_CONFIG": str(cfg)}
    run = subprocess.run([sys.executable, "-m", "vsphere_av", "--config", str(cfg), *args,
                          "--json"], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert "Traceback" not in run.stderr, run.stderr
    return run.returncode, json.loads(run.stdout or "{}"), run.stderr


def scan(sim: simulator.Simulator, state: Path, root: str,
         toml: str = "") -> tuple[int, dict[str, Any]]:
    code, doc, err = cli(sim, state, root, "scan", VM, "--full", toml=toml)
    assert doc, err
    (vm,) = doc["vms"]
    return code, vm


def status_row(sim: simulator.Simulator, state: Path, root: str) -> dict[str, Any]:
    code, doc, err = cli(sim, state, root, "status")
    assert code == 0, err
    return next(r for r in doc["vms"] if r["name"] == VM)


def audited(state: Path, action: str) -> list[dict[str, Any]]:
    with AuditLog.open(state) as log:
        return [dict(e.details) for e in log.entries() if e.action == action]


def test_names_with_control_characters_and_invalid_utf8_are_scanned(sim, tmp_path):
    names = [b"/names/esc\x1b[0m.com", b"/names/bel\x07.com", b"/names/bad\xff\xfe.com",
             b"/names/mixed\xc3(\x1b.com"]
    for name in names:
        plant(sim, name, EICAR)
    plant(sim, "/names/clean.txt", b"nothing")
    code, vm = scan(sim, tmp_path / "state", "/names")
    assert vm["status"] == "infected", (vm["incomplete_files"], vm["vanished"])
    assert code == 1, vm
    assert len(vm["detections"]) == len(names), vm
    assert (vm["vanished"], vm["incomplete"], vm["errors"]) == (0, 0, 0)
    assert vm["scanned"] == len(names) + 1


def test_over_max_file_size_is_incomplete_unless_skipping_is_the_policy(sim, tmp_path):
    plant(sim, "/big/padded.bin", EICAR + b"\0" * (65 * MiB - len(EICAR)))
    plant(sim, "/big/small.txt", b"fine")
    state = tmp_path / "state"
    code, vm = scan(sim, state, "/big")
    assert code == 2, vm
    assert vm["status"] == "incomplete"
    assert vm["incomplete"] == 1
    reason = f"larger than max file size ({65 * MiB} > {64 * MiB} bytes)"
    assert vm["incomplete_files"] == [{"path": "/big/padded.bin", "kind": "incomplete",
                                       "reason": reason}]
    row = status_row(sim, state, "/big")
    assert row["state"] == "unprotected"
    assert "incomplete" in row["reason"]
    assert row["incomplete_files"] == vm["incomplete_files"]
    (entry,) = audited(state, "scan.incomplete")
    assert (entry["path"], entry["reason"]) == ("/big/padded.bin", reason)

    code, vm = scan(sim, state, "/big", toml="skip_large = true\n")
    assert code == 0, vm
    assert vm["status"] == "clean"
    assert (vm["incomplete"], vm["skipped_by_policy"]) == (0, 1)
    assert vm["skipped_files"] == [{"path": "/big/padded.bin", "kind": "skipped",
                                    "reason": reason}]
    row = status_row(sim, state, "/big")
    assert row["state"] == "protected"
    assert row["skipped_files"] == vm["skipped_files"]
    assert audited(state, "scan.skipped_file")[-1]["path"] == "/big/padded.bin"


def _nested(depth: int) -> bytes:
    data = EICAR
    name = "eicar.com"
    for level in range(depth):
        data = zipped({name: data})
        name = f"level{level}.zip"
    return data


ARCHIVES = {
    "deep.zip": ("MaxDepth", lambda: _nested(4)),
    "many.zip": ("MaxMembers", lambda: zipped(
        {**{f"m{i:05}.txt": b"" for i in range(10_000)}, "z.com": EICAR})),
    "zeros.zip": ("MaxRatio", lambda: zipped({"zeros.bin": bytes(256 * MiB), "z.com": EICAR})),
}


@pytest.fixture(scope="module")
def archives(sim: simulator.Simulator) -> str:
    for name, (_, make) in ARCHIVES.items():
        plant(sim, f"/archives/{name}", make())
    return "/archives"


def test_archives_over_a_limit_are_detections_by_default(sim, archives, tmp_path):
    code, vm = scan(sim, tmp_path / "state", archives)
    assert code == 1, vm
    found = {d["path"].rsplit("/", 1)[-1]: d["threat"] for d in vm["detections"]}
    assert found == {name: f"Heuristics.Limits.Exceeded.{limit}"
                     for name, (limit, _) in ARCHIVES.items()}


def test_archives_over_a_limit_without_alerts_are_incomplete(sim, archives, tmp_path):
    state = tmp_path / "state"
    code, vm = scan(sim, state, archives, toml="[engine]\nalert_exceeds_max = false\n")
    assert code == 2, vm
    assert vm["status"] == "incomplete"
    listed = {f["path"]: f["reason"] for f in vm["incomplete_files"]}
    assert set(listed) == {f"{archives}/{name}" for name in ARCHIVES}
    assert "depth limit (3)" in listed[f"{archives}/deep.zip"]
    assert "member limit (10000)" in listed[f"{archives}/many.zip"]
    assert "compression ratio limit (100:1)" in listed[f"{archives}/zeros.zip"]
    assert status_row(sim, state, archives)["state"] == "unprotected"


def test_directory_the_walk_does_not_enter_makes_the_scan_incomplete(sim, tmp_path):
    # The walk stops 64 levels down (vsphere.guest.MAX_DEPTH): what lies below is not read.
    deep = "/deep" + "/d" * 65
    plant(sim, f"{deep}/eicar.com", EICAR)
    plant(sim, "/deep/open.txt", b"fine")
    code, vm = scan(sim, tmp_path / "state", "/deep")
    assert code == 2, vm
    assert vm["status"] == "incomplete"
    (entry,) = vm["incomplete_files"]
    assert entry["path"] == deep
    assert entry["reason"] == "cannot list directory: deeper than 64 levels: not walked"
