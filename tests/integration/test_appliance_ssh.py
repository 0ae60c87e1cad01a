"""SSH management against a real OpenSSH server (Debian ``/usr/sbin/sshd``) on 127.0.0.N.

Each test module run starts sshd with its own host key and authorized key in a tmp dir and
stops it at teardown. The "appliance" filesystem is a tmp dir on this machine, so the test can
check what arrived; the engine service runs on loopback and is reached through the SSH
connection, exactly as on an appliance.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from appliance_support import EICAR, Sshd, start_sshd

from vsphere_av import config
from vsphere_av.engine import Engine
from vsphere_av.errors import ApplianceError, HostKeyMismatch
from vsphere_av.fleet import ssh as ssh_mod
from vsphere_av.fleet.ssh import ApplianceSsh
from vsphere_av.store.audit import AuditLog, AuditOnUse

TOKEN = "ssh-test-token-0123456789abcdef"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    server = start_sshd(tmp_path / "sshd", "127.0.0.21")
    yield server
    server.stop()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "controller-state"
    path.mkdir()
    return path


@pytest.fixture
def audit(state: Path) -> Iterator[AuditLog]:
    with AuditLog.open(state) as log:
        yield log


def conn(sshd: Sshd, state: Path, audit: AuditLog, *, key: Path | None = None) -> ApplianceSsh:
    return ApplianceSsh(host=sshd.host, port=sshd.port, user=sshd.user,
                        key_file=key or sshd.client_key, state_dir=state, audit=audit,
                        actor="tester", appliance="vsphere-av-appliance-esx1")


def actions(audit: AuditLog) -> list[str]:
    return [e.action for e in audit.entries()]


def test_first_contact_pins_the_host_key(sshd: Sshd, state: Path, audit: AuditLog) -> None:
    with conn(sshd, state, audit) as c:
        assert c.run(["echo", "hello world"]).stdout == "hello world\n"
        assert c.run("exit 3").status == 3
    known = (state / "known_hosts").read_text()
    assert known.startswith(f"[127.0.0.21]:{sshd.port} ssh-ed25519 ")
    assert (state / "known_hosts").stat().st_mode & 0o077 == 0
    host_pub = sshd.host_key.with_suffix(".pub").read_text().split()[1]
    assert host_pub in known
    (entry,) = [e for e in audit.entries() if e.action == "appliance.ssh.host_key_pinned"]
    assert entry.details["fingerprint"].startswith("SHA256:")
    with conn(sshd, state, audit) as c:          # second contact: no new pin
        c.run(["true"])
    assert actions(audit).count("appliance.ssh.host_key_pinned") == 1
    pub = str(sshd.host_key.with_suffix(".pub"))
    ssh_keygen_fp = subprocess.run(["ssh-keygen", "-l", "-f", pub], capture_output=True,
                                   text=True, check=True).stdout.split()[1]
    assert entry.details["fingerprint"] == ssh_keygen_fp


def test_changed_host_key_is_refused_and_audited(sshd: Sshd, state: Path,
                                                 audit: AuditLog) -> None:
    with conn(sshd, state, audit):
        pass
    pinned = (state / "known_hosts").read_text()
    sshd.regenerate_host_key()
    with pytest.raises(HostKeyMismatch, match=r"SSH host key of appliance "
                       r"vsphere-av-appliance-esx1 .* changed: pinned SHA256:.*presented SHA256:"):
        conn(sshd, state, audit).connect()
    assert (state / "known_hosts").read_text() == pinned   # nothing re-pinned
    mismatch = [e for e in audit.entries() if e.action == "appliance.ssh.host_key_mismatch"]
    assert len(mismatch) == 1
    assert mismatch[0].details["expected"] != mismatch[0].details["presented"]
    assert audit.verify().ok


def test_wrong_client_key_fails_without_password_fallback(sshd: Sshd, state: Path,
                                                          audit: AuditLog, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(ApplianceError, match=r"SSH key authentication to .* failed"):
        conn(sshd, state, audit, key=other).connect()
    with pytest.raises(ApplianceError, match="SSH key file not found"):
        conn(sshd, state, audit, key=tmp_path / "missing").connect()


def test_unreachable_appliance(state: Path, audit: AuditLog, tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    c = ApplianceSsh(host="127.0.0.22", port=1, user="x", key_file=key, state_dir=state,
                     audit=audit, actor="t", timeout=2)
    with pytest.raises(ApplianceError, match=r"SSH connection to 127\.0\.0\.22:1 failed"):
        c.connect()


def _engine(state_dir: Path) -> Engine:
    return Engine.open(config.Settings(state_dir=state_dir), use_cache=False,
                       audit=AuditOnUse(state_dir), actor="tester")


def test_push_signatures_verifies_and_activates(sshd: Sshd, state: Path, audit: AuditLog,
                                                tmp_path: Path) -> None:
    local = _engine(state)          # the controller's store: built-in bundle = v1
    v1 = local.store.root / "v0001"
    remote = tmp_path / "appliance-state"
    with conn(sshd, state, audit) as c:
        first = c.push_signatures(version_dir=v1, remote_state_dir=str(remote))
        assert first.installed
        assert first.version == 1
        again = c.push_signatures(version_dir=v1, remote_state_dir=str(remote))
        assert not again.installed          # already there: nothing copied twice
        assert again.sha256 == first.sha256  # deterministic packing

        for name in ("manifest.json", "rules.yarc", "hashes.tsv"):
            assert (remote / "signatures/v0001" / name).read_bytes() == (v1 / name).read_bytes()
        assert json.loads((remote / "signatures/state.json").read_text())["active"] == 1
        assert list((remote / "signatures/incoming").iterdir()) == []   # no leftovers
        appliance = _engine(remote)         # what the appliance's engine now sees
        with appliance.session() as s:
            assert s.version == 1
            assert s.scan_stream([EICAR], path="/x").status == "infected"

        bundle = tmp_path / "bundle"
        bundle.mkdir()
        (bundle / "extra.yar").write_text('rule Extra { strings: $a = "vsphere-av-test-marker" '
                                          'condition: $a }\n')
        local.store.import_bundle(bundle)   # v2 on the controller
        second = c.push_signatures(version_dir=local.store.root / "v0002",
                                   remote_state_dir=str(remote))
        assert second.version == 2
        state_json = json.loads((remote / "signatures/state.json").read_text())
        assert state_json == {"active": 2, "history": [1]}
        with appliance.session() as s:      # picked up without a restart
            assert s.version == 2
            assert s.scan_stream([b"xx vsphere-av-test-marker xx"], path="/y").status == "infected"
    pushed = [e.details for e in audit.entries() if e.action == "appliance.signatures.pushed"]
    assert [(d["version"], d["installed"]) for d in pushed] == [(1, True), (1, False), (2, True)]


def test_damaged_upload_is_detected(sshd: Sshd, state: Path, audit: AuditLog, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Bytes cannot be damaged inside a real SSH channel from here, so the local digest is
    # made to disagree with what really arrived: the remote sha256sum must catch it.
    local = _engine(state)
    real_pack = ssh_mod._pack
    monkeypatch.setattr(ssh_mod, "_pack", lambda d, n, out: ("0" * 64, real_pack(d, n, out)[1]))
    remote = tmp_path / "appliance-state"
    with conn(sshd, state, audit) as c, pytest.raises(ApplianceError, match="arrived damaged"):
        c.push_signatures(version_dir=local.store.root / "v0001", remote_state_dir=str(remote))
    assert not (remote / "signatures/v0001").exists()
    assert not (remote / "signatures/state.json").exists()
    assert list((remote / "signatures/incoming").iterdir()) == []
    assert "appliance.signatures.checksum_mismatch" in actions(audit)


def test_conflicting_remote_version_is_not_activated(sshd: Sshd, state: Path, audit: AuditLog,
                                                     tmp_path: Path) -> None:
    local = _engine(state)
    remote = tmp_path / "appliance-state"
    other = tmp_path / "other-store"
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "x.yar").write_text('rule X { strings: $a = "zzz-other" condition: $a }\n')
    _engine(other)
    (remote / "signatures").mkdir(parents=True)
    # The appliance already holds a *different* v0001.
    import shutil
    shutil.copytree(other / "signatures/v0001", remote / "signatures/v0001")
    manifest = json.loads((remote / "signatures/v0001/manifest.json").read_text())
    manifest["hash"] = "f" * 64
    (remote / "signatures/v0001/manifest.json").write_text(json.dumps(manifest))
    with conn(sshd, state, audit) as c, pytest.raises(ApplianceError, match="content hash"):
        c.push_signatures(version_dir=local.store.root / "v0001", remote_state_dir=str(remote))
    assert not (remote / "signatures/state.json").exists()


def test_restart_engine(sshd: Sshd, state: Path, audit: AuditLog, tmp_path: Path) -> None:
    marker = tmp_path / "restarted"
    with conn(sshd, state, audit) as c:
        c.restart_engine(command=f"echo restarted >> {marker}")
        assert marker.read_text() == "restarted\n"
        with pytest.raises(ApplianceError, match=r"engine restart .* failed \(exit 5\): boom"):
            c.restart_engine(command="echo boom >&2; exit 5")
    assert actions(audit).count("appliance.engine.restarted") == 1
