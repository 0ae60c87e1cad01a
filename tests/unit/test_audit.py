"""Audit log: the chain verifies, and every kind of tampering is caught and located."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from vsphere_av.errors import AuditIntegrityError, StoreError
from vsphere_av.store.audit import AuditLog, to_cef, to_jsonl


def _log_with(tmp_path: Path, n: int = 5) -> AuditLog:
    log = AuditLog.open(tmp_path)
    for i in range(n):
        log.append(actor="alice", action="scan.end", details={"vm": f"vm-{i}", "files": i})
    return log


def _sql(tmp_path: Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(tmp_path / "audit.sqlite")
    db.execute(statement, args)
    db.commit()
    db.close()


def test_intact_chain_verifies(tmp_path: Path) -> None:
    log = _log_with(tmp_path)
    result = log.verify()
    assert result.ok
    assert result.entries == 5
    log.require_intact()


def test_empty_log_verifies(tmp_path: Path) -> None:
    assert AuditLog.open(tmp_path).verify().ok


def test_entries_survive_reopen_and_keep_chaining(tmp_path: Path) -> None:
    _log_with(tmp_path, 3).close()
    log = AuditLog.open(tmp_path)
    entry = log.append(actor="bob", action="quarantine.purge", details={"id": 7})
    assert entry.seq == 4
    assert log.verify().ok


@pytest.mark.parametrize(
    ("tamper", "bad_seq"),
    [
        ('UPDATE audit SET details = \'{"vm": "vm-9", "files": 2}\' WHERE seq = 3', 3),
        ("UPDATE audit SET actor = 'mallory' WHERE seq = 1", 1),
        ("UPDATE audit SET time = '2020-01-01T00:00:00+00:00' WHERE seq = 5", 5),
        ("DELETE FROM audit WHERE seq = 2", 2),
    ],
)
def test_tampering_is_located(tmp_path: Path, tamper: str, bad_seq: int) -> None:
    log = _log_with(tmp_path)
    _sql(tmp_path, tamper)
    result = log.verify()
    assert not result.ok
    assert result.first_bad_seq == bad_seq
    with pytest.raises(AuditIntegrityError, match=f"entry {bad_seq}"):
        log.require_intact()


def test_reordering_is_caught(tmp_path: Path) -> None:
    log = _log_with(tmp_path)
    # swap the contents of entries 2 and 3, keeping their seq numbers
    db = sqlite3.connect(tmp_path / "audit.sqlite")
    rows = {
        r[0]: r[1:]
        for r in db.execute(
            "SELECT seq, time, actor, action, details, prev_hash, hash FROM audit"
            " WHERE seq IN (2, 3)"
        )
    }
    for seq, other in ((2, 3), (3, 2)):
        db.execute(
            "UPDATE audit SET time=?, actor=?, action=?, details=?, prev_hash=?, hash=? "
            "WHERE seq=?",
            (*rows[other], seq),
        )
    db.commit()
    db.close()
    result = log.verify()
    assert not result.ok
    assert result.first_bad_seq == 2


def test_truncated_tail_is_caught(tmp_path: Path) -> None:
    log = _log_with(tmp_path)
    _sql(tmp_path, "DELETE FROM audit WHERE seq >= 4")
    _sql(tmp_path, "UPDATE audit_head SET seq = 3, hash = (SELECT hash FROM audit WHERE seq = 3)")
    result = log.verify()
    assert not result.ok
    assert "ends at entry 5" in result.message


def test_secrets_are_refused(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path)
    with pytest.raises(StoreError, match="secrets"):
        log.append(actor="a", action="config.change", details={"guest": {"password": "x"}})
    assert log.verify().entries == 0


def test_exports(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path)
    entry = log.append(
        actor="ctl",
        action="detection",
        details={"vm": "web|01", "path": "/tmp/a=b", "threat": "EICAR", "sha256": "ab" * 32},
    )
    line = to_cef(entry, version="1.0")
    assert line.startswith("CEF:0|vsphere-av|vsphere-av|1.0|detection|detection: EICAR|8|")
    assert "dhost=web|01" in line  # pipes are only escaped in the header
    assert "filePath=/tmp/a\\=b" in line  # '=' is escaped in extensions
    assert json.loads(to_jsonl(entry))["hash"] == entry.hash


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    _log_with(tmp_path).close()
    env = {"VSPHERE_AV_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "vsphere_av", "audit", "verify"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "5 entries" in ok.stdout
    _sql(tmp_path, "UPDATE audit SET action = 'scan.start' WHERE seq = 4")
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip() == "vsphere-av: error: audit log broken at entry 4: entry 4 was altered"
    )


def _append_many(state_dir: str, actor: str, n: int) -> None:
    log = AuditLog.open(state_dir)
    for i in range(n):
        log.append(actor=actor, action="scan.end", details={"i": i})
    log.close()


def test_processes_appending_at_once_keep_a_verifiable_log(tmp_path: Path) -> None:
    """`serve` and CLI commands write the same log from different processes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), f"p{k}", 150))
             for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    log = AuditLog.open(tmp_path)
    result = log.verify()
    assert result.ok, result.message
    assert result.entries == 450


def test_a_stale_head_file_write_never_moves_the_head_back(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 3)
    other = AuditLog.open(tmp_path)           # a second writer (another process in real life)
    first = other.append(actor="x", action="a", details={})
    log.append(actor="y", action="b", details={})
    other._write_head(first.seq, first.hash)  # the slower writer finishes last
    assert log.verify().ok
    assert (tmp_path / "audit.head").read_text().split()[0] == "5"


def test_head_file_behind_after_a_crash_is_not_tampering(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 3)
    head = (tmp_path / "audit.head").read_text()
    log.append(actor="y", action="b", details={})
    (tmp_path / "audit.head").write_text(head)   # crash between commit and head write
    assert log.verify().ok
    (tmp_path / "audit.head").write_text("2 " + "0" * 64 + "\n")   # but it must be a real entry
    result = log.verify()
    assert not result.ok
    assert "head file" in result.message


def _cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"VSPHERE_AV_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "vsphere_av", *args], env=env,
                          capture_output=True, text=True, check=False, timeout=60)


def _cut_tail_and_both_heads(state_dir: Path, keep: int) -> None:
    """The attack: remove the last entries and rewrite both head records to match."""
    _sql(state_dir, "DELETE FROM audit WHERE seq > ?", keep)
    _sql(state_dir, "UPDATE audit_head SET seq = ?, hash = (SELECT hash FROM audit WHERE seq = ?)",
         keep, keep)
    db = sqlite3.connect(state_dir / "audit.sqlite")
    digest = db.execute("SELECT hash FROM audit WHERE seq = ?", (keep,)).fetchone()[0]
    db.close()
    (state_dir / "audit.head").write_text(f"{keep} {digest}\n")


def test_a_cut_tail_with_both_heads_rewritten_fails_against_a_kept_head(tmp_path: Path) -> None:
    _log_with(tmp_path, 6).close()
    head = _cli(tmp_path, "audit", "head")
    assert head.returncode == 0, head.stderr
    kept = head.stdout.strip()
    seq, digest = kept.split(":")
    assert seq == "6"
    assert len(digest) == 64
    as_json = json.loads(_cli(tmp_path, "audit", "head", "--json").stdout)
    assert as_json == {"seq": 6, "hash": digest, "head": kept}
    assert _cli(tmp_path, "audit", "verify", "--head", kept).returncode == 0

    _cut_tail_and_both_heads(tmp_path, 4)
    assert _cli(tmp_path, "audit", "verify").returncode == 0     # what the box alone can tell
    cut = _cli(tmp_path, "audit", "verify", "--head", kept)
    assert cut.returncode == 2
    assert cut.stderr.strip() == ("vsphere-av: error: audit log broken at entry 5: the kept "
                                  "head names entry 6, but the log ends at entry 4: entries "
                                  "were removed")


def test_a_rewritten_log_fails_against_a_kept_head(tmp_path: Path) -> None:
    _log_with(tmp_path, 3).close()
    kept = _cli(tmp_path, "audit", "head").stdout.strip()
    for name in ("audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm", "audit.head"):
        (tmp_path / name).unlink(missing_ok=True)
    with AuditLog.open(tmp_path) as log:                # a whole new chain, as long as the old
        for i in range(4):
            log.append(actor="mallory", action="scan.end", details={"vm": f"x{i}"})
    assert _cli(tmp_path, "audit", "verify").returncode == 0
    bad = _cli(tmp_path, "audit", "verify", "--head", kept)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("vsphere-av: error: audit log broken at entry 3: entry 3 "
                                  "differs from the kept head: the log was rewritten")


@pytest.mark.parametrize("head", ["6", "6:abc", "x:" + "0" * 64, "6:" + "g" * 64,
                                  "\u0663:" + "0" * 64])
def test_a_malformed_kept_head_is_one_line(tmp_path: Path, head: str) -> None:
    _log_with(tmp_path, 2).close()
    out = _cli(tmp_path, "audit", "verify", "--head", head)
    assert out.returncode == 2
    assert out.stderr.startswith("vsphere-av: error: --head must be SEQ:HASH")
    assert len(out.stderr.strip().splitlines()) == 1


def test_head_of_a_broken_log_is_refused(tmp_path: Path) -> None:
    _log_with(tmp_path, 3).close()
    _sql(tmp_path, "UPDATE audit SET actor = 'mallory' WHERE seq = 2")
    out = _cli(tmp_path, "audit", "head")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "entry 2 was altered" in out.stderr


def test_checkpoint_names_the_head_and_never_follows_a_checkpoint(tmp_path: Path) -> None:
    log = _log_with(tmp_path, 2)
    before = log.head()
    first = log.checkpoint(actor="ctl")
    assert (first.seq, first.action) == (3, "audit.checkpoint")
    assert dict(first.details) == {"head_seq": before[0], "head_hash": before[1]}
    assert log.checkpoint(actor="ctl") == first          # nothing new: the same one
    assert not log.news_after(2)
    log.append(actor="a", action="scan.end", details={})
    assert log.news_after(3)
    assert log.checkpoint(actor="ctl").seq == 5
    assert log.verify().ok


def _state_with_history(state_dir: Path) -> None:
    from vsphere_av.models import VmId, VmInfo
    from vsphere_av.store.state import StateStore

    vm = VmInfo(moref=VmId("vm-1"), name="web01", instance_uuid="u-1", power_state="poweredOn",
                tools_running=True, guest_id="otherLinux64Guest", host=None)
    with StateStore.open(state_dir) as store:
        store.begin_scan(vm, full=True, signature_version=1)


def test_an_emptied_log_in_a_state_directory_with_history_is_not_intact(tmp_path: Path) -> None:
    fresh = _cli(tmp_path / "new", "audit", "verify")
    assert fresh.returncode == 0, fresh.stderr            # a new installation: nothing yet
    _log_with(tmp_path, 3).close()
    _state_with_history(tmp_path)
    assert _cli(tmp_path, "audit", "verify").returncode == 0
    _sql(tmp_path, "DELETE FROM audit")
    _sql(tmp_path, "DELETE FROM audit_head")
    (tmp_path / "audit.head").unlink()
    out = _cli(tmp_path, "audit", "verify")
    assert out.returncode == 2
    assert out.stderr.strip() == ("vsphere-av: error: audit log broken at entry 1: the log is "
                                  "empty but the state directory has history (state.sqlite "
                                  "holds 1 VMs, 1 scans)")


def test_a_missing_log_with_a_siem_cursor_or_quarantine_is_not_intact(tmp_path: Path) -> None:
    (tmp_path / "siem-cursor.json").write_text('{"seq": 7, "hash": "ab"}')
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "0a1b2c.qbin").write_bytes(b"x")
    out = _cli(tmp_path, "audit", "verify", "--json")
    assert out.returncode == 2
    assert json.loads(out.stdout) == {
        "ok": False, "entries": 0, "first_bad_entry": 1,
        "message": "the log is missing but the state directory has history (siem-cursor.json "
                   "says entry 7 was forwarded, quarantined files)"}


def test_a_log_truncated_to_nothing_beside_its_head_file_is_not_intact(tmp_path: Path) -> None:
    _log_with(tmp_path, 3).close()
    (tmp_path / "audit.sqlite").write_bytes(b"")        # SQLite reads this as a new database
    out = _cli(tmp_path, "audit", "verify")
    assert out.returncode == 2
    assert out.stderr.strip() == ("vsphere-av: error: audit log broken at entry 1: the log is "
                                  "empty but the state directory has history (audit.head "
                                  "names entry 3)")
